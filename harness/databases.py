"""Throw-away databases on the machine's PostgreSQL server (127.0.0.1:5432, trust auth)."""

from __future__ import annotations

import uuid

import psycopg

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def create_postgres(*, port: int = 5432) -> str:
    """A fresh database; its SQLAlchemy URL (through ``port``, e.g. a proxy's)."""
    name = f"sononode_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/{name}"


def drop_postgres(url: str) -> None:
    """Drop the database of ``url`` (closing its connections)."""
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

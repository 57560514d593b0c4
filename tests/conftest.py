"""Shared fixtures: settings on free ports in a temporary data directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.peers import get_port
from node.config import Settings
from node.db import Database, open_database


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        dicom_host="127.0.0.1",
        dicom_port=get_port(),
        http_port=get_port(),
        study_stable_seconds=0.5,
    )


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    database = open_database(settings.effective_database_url, settings.data_dir)
    yield database
    database.dispose()

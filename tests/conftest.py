"""Shared fixtures: settings on free ports in a temporary data directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from harness.peers import Orthanc, get_port, make_orthanc
from node.config import Settings
from node.db import Database, open_database

#: API tokens of the test settings.
ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
READER_TOKEN = "test-reader-token-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
READER = {"Authorization": f"Bearer {READER_TOKEN}"}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        dicom_host="127.0.0.1",
        dicom_port=get_port(),
        http_port=get_port(),
        study_stable_seconds=0.5,
        api_tokens=SecretStr(f"admin:{ADMIN_TOKEN},reader:{READER_TOKEN}"),
    )


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    database = open_database(settings.effective_database_url, settings.data_dir)
    yield database
    database.dispose()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """A real Orthanc PACS on free ports, for the tests of one module."""
    pacs = make_orthanc(tmp_path_factory.mktemp("orthanc"))
    pacs.start()
    yield pacs
    pacs.stop()

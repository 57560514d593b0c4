"""The settings object: environment parsing and validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from node.config import BUNDLED_PACKS_DIR, Settings, parse_destination


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("SONONODE_"):
            monkeypatch.delenv(key)
    s = Settings(data_dir=tmp_path)
    assert s.ae_title == "SONONODE" and s.dicom_port == 11112 and s.http_port == 8000
    assert s.study_stable_seconds == 10
    assert s.broker_url is None and s.destinations == []
    assert s.effective_database_url == f"sqlite:///{(tmp_path / 'sononode.db').resolve()}"


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SONONODE_DESTINATIONS", "PACS1@10.0.0.5:104, ORTHANC@localhost:4242")
    monkeypatch.setenv("SONONODE_MODEL_PACKS", "/packs/a,/packs/b")
    monkeypatch.setenv("SONONODE_AE_TITLE", "MYNODE")
    s = Settings()
    assert [str(d) for d in s.destinations] == ["PACS1@10.0.0.5:104", "ORTHANC@localhost:4242"]
    assert s.effective_model_packs == [Path("/packs/a"), Path("/packs/b")]
    assert s.ae_title == "MYNODE"


@pytest.mark.parametrize("text", ["PACS", "PACS@host", "@host:1", "PACS@host:0",
                                  "PACS@host:70000", "A_VERY_LONG_AE_TITLE@h:1"])
def test_bad_destination(text: str) -> None:
    with pytest.raises(ValueError):
        parse_destination(text)


def test_bad_destination_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SONONODE_DESTINATIONS", "nonsense")
    with pytest.raises(ValidationError, match="AET@host:port"):
        Settings()


def test_bad_ae_title() -> None:
    with pytest.raises(ValidationError):
        Settings(ae_title="THIS_AE_TITLE_IS_TOO_LONG")


def test_bundled_packs_are_found(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path)
    expected = sorted(p for p in BUNDLED_PACKS_DIR.iterdir() if (p / "manifest.json").is_file())
    assert s.effective_model_packs == expected

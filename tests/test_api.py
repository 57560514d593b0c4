"""The HTTP API over a real index (FastAPI's test client, no server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ADMIN, READER
from fastapi.testclient import TestClient
from fixtures import make_us_dataset
from test_scheduler import Recorder

from node.api import create_app
from node.config import Settings
from node.db import (
    Database,
    Export,
    ExportState,
    Job,
    JobState,
)
from node.index import InstanceMeta, register_instance


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def client(settings: Settings, db: Database, recorder: Recorder) -> TestClient:
    """An admin's client."""
    return TestClient(create_app(settings, db, dispatcher=recorder.dispatcher()),
                      headers=ADMIN)


def _study_with_export(db: Database, state: ExportState) -> int:
    ds = make_us_dataset(study_uid="1.2.840.99.1")
    register_instance(db, InstanceMeta.from_dataset(ds, "1.2.840.10008.1.2.1"), path="a.dcm",
                      size_bytes=10, calling_ae_title="US1")
    with db.session() as session:
        job = Job(study_instance_uid="1.2.840.99.1", revision=1, state=JobState.REPORTED,
                  result={"needs_review": True, "images": []})
        session.add(job)
        session.flush()
        export = Export(job_id=job.id, study_instance_uid="1.2.840.99.1",
                        destination="PACS@127.0.0.1:104", state=state, attempts=9,
                        last_error="association rejected")
        session.add(export)
        session.flush()
        return export.id


def test_health_and_ready(client: TestClient, db: Database) -> None:
    """Ready only while a live worker can analyse; not ready, with the reason, otherwise."""
    from node import heartbeats

    assert client.get("/health").json() == {"status": "ok"}
    response = client.get("/ready")
    assert response.status_code == 503
    assert response.json()["checks"]["analysis"].startswith("error: no live worker")
    with db.session() as session:
        heartbeats.beat(session, "host:1", queues=["gpu"], pool_pids=[], can_analyse=False,
                        device=None, packs=[], problem="SONONODE_DEVICE=cuda: no CUDA")
    assert "no CUDA" in client.get("/ready").json()["checks"]["analysis"]
    with db.session() as session:
        heartbeats.beat(session, "host:2", queues=["cpu", "gpu"], pool_pids=[],
                        can_analyse=True, device="cpu", packs=[], problem=None)
    body = client.get("/ready").json()
    assert body["ready"] is True and body["checks"]["database"] == "ok"


def test_ready_reports_an_unreachable_broker(settings: Settings, db: Database) -> None:
    app = create_app(settings, db, redis_url="unix:///nonexistent/redis.sock")
    response = TestClient(app, headers=ADMIN).get("/ready")
    assert response.status_code == 503
    assert response.json()["checks"]["broker"].startswith("error")


def test_studies(client: TestClient, db: Database) -> None:
    _study_with_export(db, ExportState.SENT)
    studies = client.get("/studies").json()["studies"]
    assert [s["study_instance_uid"] for s in studies] == ["1.2.840.99.1"]
    assert studies[0]["instances"] == 1
    detail = client.get("/studies/1.2.840.99.1").json()
    assert detail["vendors"] == ["Test Vendor"]
    assert detail["needs_review"] is True
    assert detail["jobs"][0]["exports"][0]["state"] == "sent"
    assert client.get("/studies?state=receiving").json()["studies"]
    assert client.get("/studies?state=exported").json()["studies"] == []


def test_unknown_study_is_404(client: TestClient) -> None:
    response = client.get("/studies/9.9.9")
    assert response.status_code == 404
    assert "not found" in response.json()["detail"]


def test_bad_query_is_422(client: TestClient) -> None:
    assert client.get("/studies?state=nonsense").status_code == 422
    assert client.get("/studies?limit=0").status_code == 422


def test_dead_letter_listed_and_replayed(client: TestClient, db: Database,
                                         recorder: Recorder) -> None:
    export_id = _study_with_export(db, ExportState.DEAD)
    dead = client.get("/exports?state=dead").json()["exports"]
    assert [e["id"] for e in dead] == [export_id]
    response = client.post(f"/exports/{export_id}/replay")
    assert response.status_code == 202
    assert response.json()["state"] == "pending" and response.json()["attempts"] == 0
    assert recorder.exports == [export_id]
    assert client.post("/exports/999/replay").status_code == 404


def test_sent_export_cannot_be_replayed(client: TestClient, db: Database) -> None:
    export_id = _study_with_export(db, ExportState.SENT)
    assert client.post(f"/exports/{export_id}/replay").status_code == 409


def test_metrics(client: TestClient, db: Database) -> None:
    _study_with_export(db, ExportState.DEAD)
    text = client.get("/metrics").text
    assert 'sononode_exports{state="dead"} 1.0' in text
    assert 'sononode_studies{state="receiving"} 1.0' in text
    assert "sononode_instances_received_total" in text or "sononode_store_seconds" in text


def test_models_lists_configured_packs(settings: Settings, db: Database, tmp_path: Path) -> None:
    """The catalogue the CLI wires in: each pack's validated manifest, or why it is unusable."""
    from workers.models.manifest import describe_packs

    bundled = settings.effective_model_packs[0]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text(json.dumps({"name": "demo", "version": "1"}))
    paths = [bundled, broken, tmp_path / "missing"]
    app = create_app(settings, db, models_catalogue=lambda: describe_packs(paths))
    models = TestClient(app, headers=ADMIN).get("/models").json()["models"]
    assert models[0]["name"] == json.loads((bundled / "manifest.json").read_text())["name"]
    assert len(models[0]["manifest_sha256"]) == 64
    assert "format_version" in models[1]["error"]
    assert "no manifest.json" in models[2]["error"]


def test_openapi(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/health", "/ready", "/metrics", "/studies", "/studies/{study_uid}",
                 "/exports", "/exports/{export_id}/replay", "/models", "/drift"):
        assert path in paths


def test_no_token_no_patient_data(settings: Settings, db: Database) -> None:
    anonymous = TestClient(create_app(settings, db))
    for path in ("/studies", "/studies/1.2.3", "/exports", "/models", "/drift", "/metrics"):
        response = anonymous.get(path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == "Bearer"
    assert anonymous.get("/studies", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert anonymous.get("/health").status_code == 200
    assert anonymous.post("/exports/1/replay").status_code == 401


def test_a_reader_reads_but_does_not_act(settings: Settings, db: Database,
                                         recorder: Recorder) -> None:
    export_id = _study_with_export(db, ExportState.DEAD)
    reader = TestClient(create_app(settings, db, dispatcher=recorder.dispatcher()),
                        headers=READER)
    assert reader.get("/studies").status_code == 200
    response = reader.post(f"/exports/{export_id}/replay")
    assert response.status_code == 403
    assert recorder.exports == []


def test_metrics_can_be_opened_for_a_scraper(settings: Settings, db: Database) -> None:
    opened = settings.model_copy(update={"metrics_open": True})
    assert TestClient(create_app(opened, db)).get("/metrics").status_code == 200


def test_without_configured_tokens_an_admin_token_is_generated(settings: Settings,
                                                               db: Database) -> None:
    from pydantic import SecretStr

    bare = settings.model_copy(update={"api_tokens": SecretStr("")})
    app = create_app(bare, db)
    path = bare.data_dir / "api-token"
    assert path.stat().st_mode & 0o777 == 0o600
    token = path.read_text().strip()
    assert len(token) >= 32
    client = TestClient(app)
    assert client.get("/studies").status_code == 401
    assert client.get("/studies", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    # The same token on the next start.
    create_app(bare, db)
    assert path.read_text().strip() == token


def test_placeholder_tokens_are_refused_outside_development() -> None:
    from node.auth import TokenError, parse_tokens

    with pytest.raises(TokenError, match="placeholder"):
        parse_tokens("admin:change-me")
    with pytest.raises(TokenError, match="role must be"):
        parse_tokens("root:0123456789abcdef0123")
    assert len(parse_tokens("admin:change-me", development=True)) == 1

"""The audit trail through the API and retention of spooled pixel data."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from conftest import ADMIN, READER
from fastapi.testclient import TestClient
from fixtures import make_us_dataset
from sqlalchemy import select

from node.api import create_app
from node.config import Settings
from node.db import AuditEvent, Database, PurgedStudy, Study, StudyState, utcnow
from node.index import InstanceMeta, register_instance
from node.retention import purge
from node.spool import Spool


def _stored_study(db: Database, settings: Settings, uid: str, *, age_days: float,
                  state: StudyState) -> Path:
    spool = Spool(settings.spool_dir, settings.incoming_dir)
    ds = make_us_dataset(study_uid=uid)
    relative = spool.relative_path(uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    path = spool.write_bytes(b"pixels" * 100, relative)
    register_instance(db, InstanceMeta.from_dataset(ds, "1.2.840.10008.1.2.1"),
                      path=str(relative), size_bytes=600, calling_ae_title="US1")
    with db.session() as session:
        study = session.get(Study, uid)
        assert study is not None
        study.state = state
        study.last_received_at = utcnow() - timedelta(days=age_days)
    return path


def test_api_requests_are_audited_and_only_an_admin_reads_the_trail(
    settings: Settings, db: Database
) -> None:
    _stored_study(db, settings, "1.2.840.99.20", age_days=0, state=StudyState.EXPORTED)
    app = create_app(settings, db)
    reader = TestClient(app, headers=READER)
    assert reader.get("/studies/1.2.840.99.20").status_code == 200
    assert reader.get("/audit").status_code == 403
    events = TestClient(app, headers=ADMIN).get(
        "/audit", params={"study": "1.2.840.99.20"}).json()["events"]
    (event,) = events
    assert event["action"] == "api" and event["actor"].startswith("api:reader:")
    assert event["detail"]["route"] == "/studies/{study_uid}"
    assert event["detail"]["status"] == 200
    assert "test-reader-token" not in str(event)  # the token is named, never shown
    admin = TestClient(app, headers=ADMIN)
    assert admin.get("/audit", params={"since": "0.5"}).status_code == 422  # found by schemathesis
    since = admin.get("/audit", params={"since": "2000-01-01T00:00:00+02:00"})
    assert since.status_code == 200 and since.json()["events"]


def test_monitoring_polls_are_not_audited_unless_refused(settings: Settings,
                                                         db: Database) -> None:
    app = create_app(settings, db)
    reader = TestClient(app, headers=READER)
    for path in ("/metrics", "/drift", "/dashboard/data"):
        assert reader.get(path).status_code == 200, path
    assert TestClient(app).get("/drift").status_code == 401  # no principal: nobody to name
    assert reader.get("/drift/nobody").status_code == 404  # refused: audited
    events = TestClient(app, headers=ADMIN).get("/audit").json()["events"]
    routes = [e["detail"]["route"] for e in events if e["action"] == "api"]
    assert routes == ["/drift/{vendor}"]


def test_retention_deletes_old_pixel_data_and_keeps_the_rest(settings: Settings,
                                                             db: Database) -> None:
    old = _stored_study(db, settings, "1.2.840.99.21", age_days=40, state=StudyState.EXPORTED)
    busy = _stored_study(db, settings, "1.2.840.99.22", age_days=40,
                         state=StudyState.PROCESSING)
    recent = _stored_study(db, settings, "1.2.840.99.23", age_days=2,
                           state=StudyState.EXPORTED)
    spool = Spool(settings.spool_dir, settings.incoming_dir)
    dry = purge(db, spool, days=30, dry_run=True)
    assert (dry.studies, dry.files) == (1, 1) and old.exists()
    report = purge(db, spool, days=30)
    assert (report.studies, report.files, report.bytes) == (1, 1, 600)
    assert not old.exists() and busy.exists() and recent.exists()
    assert purge(db, spool, days=30).studies == 0  # done once
    with db.session() as session:
        assert session.get(Study, "1.2.840.99.21") is not None  # the results stay
        purged = session.get(PurgedStudy, "1.2.840.99.21")
        assert purged is not None and purged.files == 1
        (event,) = session.scalars(select(AuditEvent).where(AuditEvent.action == "purged"))
        assert event.study_instance_uid == "1.2.840.99.21"

"""Study completion and the reconciler, with a recording dispatcher instead of Celery."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from fixtures import make_us_dataset

from node.db import Database, Export, ExportState, Job, JobState, Study, StudyState, utcnow
from node.index import InstanceMeta, register_instance
from node.scheduler import (
    MAX_JOB_ATTEMPTS,
    Dispatcher,
    reconcile,
    run_scheduler,
    seconds_to_next_completion,
    start_complete_studies,
)


@dataclass
class Recorder:
    jobs: list[tuple[int, str]] = field(default_factory=list)
    exports: list[int] = field(default_factory=list)
    broken: bool = False

    def dispatcher(self) -> Dispatcher:
        def job(job_id: int, state: str) -> None:
            if self.broken:
                raise ConnectionError("broker down")
            self.jobs.append((job_id, state))

        return Dispatcher(job=job, export=self.exports.append)


def _receive(db: Database, study_uid: str, *, seed: int = 0, age: float = 60.0) -> None:
    ds = make_us_dataset(study_uid=study_uid, seed=seed)
    register_instance(db, InstanceMeta.from_dataset(ds, "1.2.840.10008.1.2.1"),
                      path=f"{seed}.dcm", size_bytes=1, calling_ae_title="T")
    with db.session() as session:
        study = session.get(Study, study_uid)
        assert study is not None
        study.last_received_at = utcnow() - timedelta(seconds=age)


def _age_jobs(db: Database, seconds: float) -> None:
    with db.session() as session:
        for job in session.query(Job).all():
            job.updated_at = utcnow() - timedelta(seconds=seconds)


def test_stable_study_gets_one_job(db: Database) -> None:
    rec = Recorder()
    _receive(db, "1.2.3", seed=1)
    _receive(db, "1.2.3", seed=2)
    assert start_complete_studies(db, rec.dispatcher(), stable_seconds=10) == 1
    assert start_complete_studies(db, rec.dispatcher(), stable_seconds=10) == 0
    assert len(rec.jobs) == 1 and rec.jobs[0][1] == "queued"
    with db.session() as session:
        study = session.get(Study, "1.2.3")
        assert study is not None and study.state == StudyState.PROCESSING
        job = session.query(Job).one()
        assert job.revision == 2 and job.attempts == 1


def test_unstable_study_waits(db: Database) -> None:
    rec = Recorder()
    _receive(db, "1.2.4", age=1.0)
    assert start_complete_studies(db, rec.dispatcher(), stable_seconds=10) == 0
    assert rec.jobs == []


def test_late_instance_starts_reanalysis_after_the_running_job(db: Database) -> None:
    rec = Recorder()
    _receive(db, "1.2.5", seed=1)
    start_complete_studies(db, rec.dispatcher(), stable_seconds=10)
    _receive(db, "1.2.5", seed=2)  # arrives while the first job runs
    assert start_complete_studies(db, rec.dispatcher(), stable_seconds=10) == 0
    with db.session() as session:
        first = session.query(Job).one()
        first.state = JobState.REPORTED
    assert start_complete_studies(db, rec.dispatcher(), stable_seconds=10) == 1
    with db.session() as session:
        jobs = session.query(Job).order_by(Job.id).all()
        assert [j.revision for j in jobs] == [1, 2]


def test_broker_down_at_dispatch_is_retried_by_the_reconciler(db: Database) -> None:
    rec = Recorder(broken=True)
    _receive(db, "1.2.6")
    start_complete_studies(db, rec.dispatcher(), stable_seconds=10)
    with db.session() as session:
        assert session.query(Job).one().attempts == 0
    rec.broken = False
    # A never-dispatched job is due at once, whatever the stale limit.
    assert reconcile(db, rec.dispatcher(), stale_seconds=3600, export_grace_seconds=0) == 1
    assert rec.jobs == [(1, "queued")]


def test_stale_job_is_redispatched_from_its_stage_then_failed(db: Database) -> None:
    rec = Recorder()
    _receive(db, "1.2.7")
    start_complete_studies(db, rec.dispatcher(), stable_seconds=10)
    with db.session() as session:
        session.query(Job).one().state = JobState.QC_DONE
    assert reconcile(db, rec.dispatcher(), stale_seconds=60, export_grace_seconds=0) == 0
    _age_jobs(db, 120)
    assert reconcile(db, rec.dispatcher(), stale_seconds=60, export_grace_seconds=0) == 1
    assert rec.jobs[-1] == (1, "qc_done")
    for _ in range(MAX_JOB_ATTEMPTS):
        _age_jobs(db, 120)
        reconcile(db, rec.dispatcher(), stale_seconds=60, export_grace_seconds=0)
    with db.session() as session:
        job = session.query(Job).one()
        assert job.state == JobState.FAILED and "stalled" in (job.error or "")
        study = session.get(Study, "1.2.7")
        assert study is not None and study.state == StudyState.FAILED


def test_stale_export_is_redispatched(db: Database) -> None:
    rec = Recorder()
    _receive(db, "1.2.8")
    start_complete_studies(db, rec.dispatcher(), stable_seconds=10)
    with db.session() as session:
        job = session.query(Job).one()
        job.state = JobState.REPORTED
        session.add(Export(job_id=job.id, study_instance_uid="1.2.8", destination="A@h:1",
                           state=ExportState.RETRYING,
                           updated_at=utcnow() - timedelta(seconds=500)))
    assert reconcile(db, rec.dispatcher(), stale_seconds=60, export_grace_seconds=60) == 1
    assert rec.exports == [1]
    # Just re-dispatched: not again on the next pass.
    assert reconcile(db, rec.dispatcher(), stale_seconds=60, export_grace_seconds=60) == 0


@pytest.mark.parametrize("sop_class", ["1.2.840.10008.5.1.4.1.1.88.33",
                                       "1.2.840.10008.5.1.4.1.1.104.1"])
def test_documents_do_not_trigger_analysis(db: Database, sop_class: str) -> None:
    rec = Recorder()
    ds = make_us_dataset(study_uid="1.2.9", sop_class=sop_class, modality="SR")
    register_instance(db, InstanceMeta.from_dataset(ds, "1.2.840.10008.1.2.1"), path="x",
                      size_bytes=1, calling_ae_title="PACS")
    with db.session() as session:
        study = session.get(Study, "1.2.9")
        assert study is not None and study.revision == 0
    assert start_complete_studies(db, rec.dispatcher(), stable_seconds=0) == 0


def test_next_completion_is_the_earliest_stable_moment(db: Database) -> None:
    assert seconds_to_next_completion(db, stable_seconds=10) is None
    _receive(db, "1.2.20", seed=1, age=3)
    _receive(db, "1.2.21", seed=2, age=1)
    due = seconds_to_next_completion(db, stable_seconds=10)
    assert due is not None and 6.5 < due <= 7.0
    _receive(db, "1.2.22", seed=3, age=60)  # stable already: started by a pass, not waited for
    due = seconds_to_next_completion(db, stable_seconds=10)
    assert due is not None and 6.5 < due <= 7.0


def test_running_scheduler_starts_a_study_at_its_stable_moment(db: Database) -> None:
    """With a long interval the loop still wakes for the study's stable moment."""
    started = threading.Event()
    dispatched_at: list[float] = []

    def job(job_id: int, state: str) -> None:
        dispatched_at.append(time.monotonic())
        started.set()

    stop = threading.Event()
    loop = threading.Thread(target=run_scheduler, args=(db, Dispatcher(job=job, export=print)),
                            kwargs={"stable_seconds": 1.0, "interval_seconds": 30.0,
                                    "stale_seconds": 900, "export_grace_seconds": 60,
                                    "stop": stop}, daemon=True)
    loop.start()
    try:
        _receive(db, "1.2.30", seed=1, age=0)
        received = time.monotonic()
        assert started.wait(timeout=20), "the study was not started before the interval ended"
    finally:
        stop.set()
        loop.join(timeout=10)
    # Not before it was stable; well before the 30 s interval would have come round.
    assert dispatched_at[0] - received >= 0.9

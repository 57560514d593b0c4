"""The Celery job stages run in-process (``Task.apply``) against a real database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fixtures import make_job

from node.config import Settings
from node.db import Database, Job, JobState, Study, StudyState
from node.spool import Spool
from workers import pipeline, tasks

STAGES = (tasks.qc, tasks.infer, tasks.report, tasks.export_all)


@pytest.fixture
def worker(settings: Settings, db: Database, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    ctx = pipeline.WorkerContext(
        settings=settings, db=db, spool=Spool(settings.spool_dir, settings.incoming_dir)
    )
    monkeypatch.setattr(tasks, "_context", ctx)
    yield


def _job(db: Database, state: JobState) -> int:
    return make_job(db, state, study_uid="1.2.840.99.7")


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_a_stage_for_a_job_that_no_longer_exists_ends_quietly(stage: tasks.JobTask) -> None:
    result = stage.apply(args=(424242,))
    assert result.successful(), result.traceback


@pytest.mark.usefixtures("worker")
def test_a_stage_for_a_failed_job_does_nothing(db: Database) -> None:
    job_id = _job(db, JobState.FAILED)
    assert tasks.infer.apply(args=(job_id,)).successful()
    with db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert job.state == JobState.FAILED and job.result is None


@pytest.mark.usefixtures("worker")
def test_a_permanent_error_marks_the_job_and_its_study_failed(db: Database) -> None:
    """Inference without QC results is a bug, not a transient error: no retry, the job
    and its study are marked failed with the reason, which the API shows."""
    job_id = _job(db, JobState.QC_DONE)
    result = tasks.infer.apply(args=(job_id,))
    assert result.failed()
    with db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert job.state == JobState.FAILED
        assert job.error is not None
        assert "sononode.infer" in job.error and "without QC results" in job.error
        study = session.get(Study, "1.2.840.99.7")
        assert study is not None and study.state == StudyState.FAILED

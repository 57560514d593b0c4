"""The job lifecycle: the one module that changes the state of jobs, their studies and exports.

A job analyses one revision of a study in stages (:data:`STAGES`, in order)::

    queued -> qc_done -> inferred -> reported -> done          (failed: at any stage)

Each stage (in ``workers/pipeline.py``) asks :func:`pending` whether its work is still to
do, works without holding a transaction, and records its output with a conditional state
change (:func:`advance`), so that two copies of one stage (a redelivered message beside a
reconciler re-dispatch) cannot both record their work. Exports move
``pending -> retrying -> sent | dead``; once every export of the job has an outcome,
:func:`settle` moves the job to ``done`` and its study to ``exported`` or
``export_failed``. The scheduler (``node/scheduler.py``) creates jobs and the API replays
dead letters through this module too; nothing else writes these state columns.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pydicom.uid import generate_uid
from sqlalchemy import CursorResult, delete, func, select, update
from sqlalchemy.orm import Session

from dicom_sr.model import StudyResult
from node import audit
from node.db import (
    Export,
    ExportState,
    ImageResultRow,
    Job,
    JobState,
    Study,
    StudyState,
    utcnow,
)
from node.metrics import STUDIES_FAILED

logger = logging.getLogger(__name__)

#: The stages of a job in order; a job in one of these states has done everything before it.
STAGES: tuple[JobState, ...] = (
    JobState.QUEUED,
    JobState.QC_DONE,
    JobState.INFERRED,
    JobState.REPORTED,
    JobState.DONE,
)
#: States in which the analysis itself still runs (a new job for the study waits for them).
RUNNING: tuple[JobState, ...] = (JobState.QUEUED, JobState.QC_DONE, JobState.INFERRED)
#: Export states that still expect an outcome.
OPEN_EXPORTS: tuple[ExportState, ...] = (ExportState.PENDING, ExportState.RETRYING)
#: Longest error text kept on a job or an export.
MAX_ERROR_CHARS = 4000


class JobGone(Exception):
    """The job does not exist (deleted) or failed for good: a stage has nothing to do."""


class NotFound(LookupError):
    """The job or export named does not exist."""


class Conflict(Exception):
    """The requested change does not apply to the row's current state."""


def reached(job: Job, state: JobState) -> bool:
    """True when ``job`` has done everything up to and including ``state``.

    Raises
    ------
    JobGone
        If the job has failed for good.
    """
    if job.state is JobState.FAILED:
        raise JobGone(f"job {job.id} has failed")
    return STAGES.index(job.state) >= STAGES.index(state)


def load(session: Session, job_id: int) -> Job:
    """The job row ``job_id``.

    Raises
    ------
    JobGone
        If it does not exist.
    """
    job = session.get(Job, job_id)
    if job is None:
        raise JobGone(f"job {job_id} does not exist")
    return job


def pending(session: Session, job_id: int, stage: JobState) -> Job | None:
    """The job when the stage that ends in ``stage`` still has to run, else ``None``."""
    job = load(session, job_id)
    return None if reached(job, stage) else job


def previous_state(stage: JobState) -> JobState:
    """The state a job is in while the stage that ends in ``stage`` runs."""
    return STAGES[STAGES.index(stage) - 1]


def advance(session: Session, job_id: int, stage: JobState, *, seconds: float | None = None,
            to: JobState | None = None, **values: Any) -> Job | None:
    """Record a stage's output: move the job from the state before ``stage`` to ``to``
    (default ``stage``) and set ``values`` on it, if no other copy of the stage did.

    A conditional UPDATE, issued as the first statement of its transaction: SQLite
    serialises the writers, PostgreSQL locks the row, so exactly one copy wins. Returns the
    job when this call recorded the stage, ``None`` when another did.
    """
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == previous_state(stage))
        .values(state=to or stage, updated_at=utcnow())
    )
    claimed = cast("CursorResult[Any]", result).rowcount
    if not claimed:
        return None
    job = load(session, job_id)
    for key, value in values.items():
        setattr(job, key, value)
    if seconds is not None:
        timings = dict(job.stage_seconds or {})
        timings[stage.value] = round(seconds, 4)
        job.stage_seconds = timings
    return job


# ----------------------------------------------------------------------------------------
# Creation and dispatch (the scheduler)
# ----------------------------------------------------------------------------------------
def study_is_busy(session: Session, study_uid: str) -> bool:
    """True while a job of the study is still analysing (a new one waits for it)."""
    return session.scalars(
        select(Job.id).where(Job.study_instance_uid == study_uid, Job.state.in_(RUNNING))
    ).first() is not None


def create(session: Session, study: Study) -> Job:
    """A queued job for the study's current revision; the study is ``processing``."""
    job = Job(study_instance_uid=study.study_instance_uid, revision=study.revision,
              state=JobState.QUEUED, attempts=0)
    session.add(job)
    study.analysed_revision = study.revision
    study.state = StudyState.PROCESSING
    session.flush()
    return job


def reanalyse(session: Session, study_uid: str) -> Job:
    """A new job for a study that was analysed before (failed or not): its SR will
    supersede the study's latest one. The scheduler's reconciler dispatches a job that was
    never dispatched, so a caller without a broker may leave that to it.

    Raises
    ------
    NotFound
        No such study.
    Conflict
        The study has nothing to analyse, is still receiving, or a job of it is running.
    """
    study = session.get(Study, study_uid, with_for_update=True)
    if study is None:
        raise NotFound(f"study {study_uid} not found")
    if study.state is StudyState.STORED:
        raise Conflict(f"study {study_uid} has no ultrasound image to analyse")
    if study.state is StudyState.RECEIVING:
        raise Conflict(f"study {study_uid} is still receiving; it is analysed once complete")
    if study_is_busy(session, study_uid):
        raise Conflict(f"a job of study {study_uid} is running; try again once it reported")
    return create(session, study)


def dispatched(session: Session, job_id: int) -> None:
    """Count one more dispatch of the job's chain (the reconciler reads ``attempts``)."""
    job = session.get(Job, job_id)
    if job is not None:
        job.attempts += 1
        job.updated_at = utcnow()


# ----------------------------------------------------------------------------------------
# Failure
# ----------------------------------------------------------------------------------------
def fail(session: Session, job: Job, error: str) -> None:
    """Mark ``job`` failed for good, and its study when this job was analysing it."""
    if job.state is JobState.DONE:
        return
    job.state = JobState.FAILED
    job.error = error[:MAX_ERROR_CHARS]
    job.updated_at = utcnow()
    study = session.get(Study, job.study_instance_uid)
    if study is not None and study.state is StudyState.PROCESSING:
        study.state = StudyState.FAILED
        STUDIES_FAILED.inc()
    logger.error("job %d failed: %s", job.id, job.error)


def fail_by_id(session: Session, job_id: int, error: str) -> None:
    """:func:`fail` the job ``job_id`` if it exists."""
    job = session.get(Job, job_id)
    if job is not None:
        fail(session, job, error)


# ----------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------
def record_result(session: Session, job_id: int, result: StudyResult, *,
                  vendors: Mapping[str, str], stats: Mapping[str, Mapping[str, float]],
                  seconds: float) -> bool:
    """Record the study result and one row per analysed image (what drift monitoring reads).

    A re-analysis replaces the rows of the same images, so that drift counts each image
    once. Returns False when another copy of the stage recorded first.
    """
    job = advance(session, job_id, JobState.INFERRED, seconds=seconds, result=result.to_json())
    if job is None:
        return False
    audit.record(session, "worker", audit.Action.ANALYSED, study=job.study_instance_uid,
                 detail={"job": job_id, "images": len(result.images),
                         "needs_review": result.needs_review,
                         "packs": [{"name": a.name, "version": a.version, "sha256": a.sha256}
                                   for a in result.algorithms]})
    uids = [image.sop_instance_uid for image in result.images]
    session.execute(delete(ImageResultRow).where(ImageResultRow.sop_instance_uid.in_(uids),
                                                 ImageResultRow.job_id != job_id))
    model_names = ", ".join(a.name for a in result.algorithms)[:128]
    for image in result.images:
        image_stats = stats.get(image.sop_instance_uid, {})
        session.add(ImageResultRow(
            job_id=job_id,
            sop_instance_uid=image.sop_instance_uid,
            manufacturer=vendors.get(image.sop_instance_uid, "unknown"),
            model_name=model_names,
            qc_outcome=image.qc_outcome.value,
            view_label=image.view.label if image.view else None,
            view_probability=image.view.probability if image.view else None,
            finding_label=image.finding.label if image.finding else None,
            finding_probability=image.finding.probability if image.finding else None,
            ood_score=image.ood_score,
            needs_review=image.needs_review,
            mean_intensity=image_stats.get("mean"),
            std_intensity=image_stats.get("std"),
        ))
    return True


# ----------------------------------------------------------------------------------------
# Reports and exports
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReportPlan:
    """Where a job's SR goes: the study's AI series, its instance number, its predecessor."""

    series_instance_uid: str
    instance_number: int
    previous_sr_path: Path | None
    """The SR of the latest earlier job of the study, which the new one supersedes."""


def plan_report(session: Session, job: Job) -> ReportPlan:
    """The AI series of the job's study (created on the study's first report), the next
    instance number in it and the SR it supersedes."""
    study = session.get(Study, job.study_instance_uid, with_for_update=True)
    if study is None:
        raise JobGone(f"job {job.id}: study {job.study_instance_uid} does not exist")
    if study.sr_series_instance_uid is None:
        study.sr_series_instance_uid = generate_uid()
    previous = session.scalars(
        select(Job)
        .where(Job.study_instance_uid == job.study_instance_uid, Job.id < job.id,
               Job.sr_path.is_not(None))
        .order_by(Job.id.desc())
    ).first()
    reported = sum(1 for j in study.jobs if j.sr_sop_instance_uid is not None and j.id != job.id)
    return ReportPlan(
        series_instance_uid=study.sr_series_instance_uid,
        instance_number=1 + reported,
        previous_sr_path=Path(previous.sr_path) if previous and previous.sr_path else None,
    )


def record_report(session: Session, job_id: int, *, sop_instance_uid: str, sr_path: str,
                  destinations: Sequence[str], seconds: float) -> list[int] | None:
    """Record the durable SR of the job and create one export per destination.

    Without destinations the job is ``done`` at once. Returns the new exports' ids, or
    ``None`` when another copy of the stage reported first.
    """
    job = advance(session, job_id, JobState.REPORTED, seconds=seconds,
                  to=JobState.REPORTED if destinations else JobState.DONE,
                  sr_sop_instance_uid=sop_instance_uid, sr_path=sr_path)
    if job is None:
        return None
    audit.record(session, "worker", audit.Action.REPORTED, study=job.study_instance_uid,
                 detail={"job": job_id, "sr_sop_instance_uid": sop_instance_uid,
                         "destinations": list(destinations)})
    study = session.get(Study, job.study_instance_uid)
    exports = [Export(job_id=job.id, study_instance_uid=job.study_instance_uid,
                      destination=destination, state=ExportState.PENDING)
               for destination in destinations]
    session.add_all(exports)
    if study is not None:
        if exports:
            study.state = StudyState.REPORTED
        elif study.revision <= job.revision:
            study.state = StudyState.EXPORTED
    session.flush()
    return [export.id for export in exports]


def open_exports(session: Session, job_id: int) -> list[int]:
    """Ids of the job's exports that still have to be sent."""
    return list(session.scalars(
        select(Export.id).where(Export.job_id == job_id, Export.state.in_(OPEN_EXPORTS))
        .order_by(Export.id)
    ))


def begin_attempt(session: Session, export_id: int) -> tuple[Export, Job] | None:
    """Count an attempt of an open export; ``None`` when it has an outcome already."""
    export = session.get(Export, export_id)
    if export is None or export.state not in OPEN_EXPORTS:
        return None
    job = load(session, export.job_id)
    export.attempts += 1
    export.updated_at = utcnow()
    return export, job


def export_sent(session: Session, export_id: int) -> None:
    """The destination stored the SR."""
    export = session.get(Export, export_id)
    if export is None:
        return
    export.state = ExportState.SENT
    export.sent_at = export.updated_at = utcnow()
    export.last_error = None
    audit.record(session, "worker", audit.Action.EXPORTED, study=export.study_instance_uid,
                 detail={"export": export_id, "destination": export.destination,
                         "attempts": export.attempts})
    settle(session, export.job_id)


def export_failed(session: Session, export_id: int, state: ExportState,
                  error: str) -> str | None:
    """Record a failed attempt (``retrying``) or the dead letter (``dead``); returns the
    export's destination (``None`` when there is no such export)."""
    export = session.get(Export, export_id)
    if export is None:
        return None
    if export.state is not ExportState.SENT:
        export.state = state
        export.last_error = error[:MAX_ERROR_CHARS]
        export.updated_at = utcnow()
        if state is ExportState.DEAD:
            audit.record(session, "worker", audit.Action.DEAD_LETTERED,
                         study=export.study_instance_uid,
                         detail={"export": export_id, "destination": export.destination})
        settle(session, export.job_id)
    return export.destination


def settle(session: Session, job_id: int) -> None:
    """Move the job and its study on once every export has an outcome."""
    # Lock the job row: two exports of one job finishing together must not both see the
    # other still pending (PostgreSQL read committed) and leave the job unsettled.
    job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
    if job is None or job.state is JobState.DONE:
        return
    states = set(session.scalars(select(Export.state).where(Export.job_id == job_id)).all())
    if not states or states & set(OPEN_EXPORTS):
        return
    job.state = JobState.DONE
    job.updated_at = utcnow()
    study = session.get(Study, job.study_instance_uid)
    latest = session.scalar(
        select(func.max(Job.id)).where(Job.study_instance_uid == job.study_instance_uid)
    )
    if study is not None and latest == job.id and study.state is not StudyState.RECEIVING:
        study.state = (
            StudyState.EXPORT_FAILED if ExportState.DEAD in states else StudyState.EXPORTED
        )


def replay(session: Session, export_id: int) -> Export:
    """Make a dead-lettered export pending again (and its job ``reported``).

    Raises
    ------
    NotFound
        If there is no such export.
    Conflict
        If the export is not a dead letter.
    """
    export = session.get(Export, export_id)
    if export is None:
        raise NotFound(f"export {export_id} not found")
    if export.state is not ExportState.DEAD:
        raise Conflict(f"export {export_id} is {export.state.value}; only dead letters are "
                       "replayed")
    export.state = ExportState.PENDING
    export.attempts = 0
    export.updated_at = utcnow()
    job = session.get(Job, export.job_id)
    if job is not None and job.state is JobState.DONE:
        job.state = JobState.REPORTED
    return export

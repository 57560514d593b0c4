"""Study completion and reconciliation: the loop that turns index rows into Celery work.

A study is complete when no image arrived for ``study_stable_seconds``; each
completion creates a job row *before* its chain is sent to the broker, so the database
always knows about the work. The loop sleeps until the next study's stable moment (at most
``scheduler_interval_seconds``, and half the stable time so that it learns of a new study
before that study is stable), so a study is started the moment it becomes complete, not up
to one polling interval later. The reconciler re-dispatches jobs and exports whose row
has not moved for ``stale_job_seconds`` (a lost broker message, a worker killed
mid-task), so losing the broker never loses a study.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select

from node import heartbeats, jobs
from node.db import Database, Export, Job, JobState, Study, utcnow
from node.metrics import SCHEDULER_RECONCILED, STUDIES_COMPLETED

logger = logging.getLogger(__name__)

#: A job re-dispatched this many times is failed instead.
MAX_JOB_ATTEMPTS = 5
#: A job whose worker process died this many times is failed (a study that crashes the
#: decoder or the models must not take down worker after worker).
MAX_LOST_RUNS = 3
#: Added to the wait for a stable moment, so that the pass it wakes finds the study stable
#: (the database's clock and this process's timer round differently).
_CLOCK_SLACK_SECONDS = 0.005


@dataclass(frozen=True)
class Dispatcher:
    """How the scheduler hands work to the workers (Celery in production, fakes in tests)."""

    job: Callable[[int, JobState], None]
    """``job(job_id, from_state)``: send the rest of the job's chain."""
    export: Callable[[int], None]
    """``export(export_id)``: send one export task."""
    backlog: Callable[[], int] = lambda: 0
    """Messages waiting in the broker; stale jobs are not re-dispatched behind a backlog."""


def start_complete_studies(db: Database, dispatcher: Dispatcher, *, stable_seconds: float) -> int:
    """Create and dispatch a job for every study that became stable. Returns how many."""
    cutoff = utcnow() - timedelta(seconds=stable_seconds)
    created: list[int] = []
    with db.session() as session:
        candidates = session.scalars(
            select(Study).where(
                Study.revision > Study.analysed_revision, Study.last_received_at <= cutoff
            )
        ).all()
        for study in candidates:
            if jobs.study_is_busy(session, study.study_instance_uid):
                continue  # re-analysis starts once the running job has reported
            created.append(jobs.create(session, study).id)
    for job_id in created:
        _dispatch_job(db, dispatcher, job_id, JobState.QUEUED)
        STUDIES_COMPLETED.inc()
    return len(created)


def seconds_to_next_completion(db: Database, *, stable_seconds: float) -> float | None:
    """Seconds until the earliest study still receiving becomes stable, ``None`` if none is.

    A study that is stable but waits for its running job is not counted: it is started when
    that job has reported, which the next regular pass finds.
    """
    with db.session() as session:
        latest = session.scalars(
            select(Study.last_received_at).where(
                Study.revision > Study.analysed_revision,
                Study.last_received_at > utcnow() - timedelta(seconds=stable_seconds),
            ).order_by(Study.last_received_at).limit(1)
        ).first()
    if latest is None:
        return None
    return max(0.0, (latest + timedelta(seconds=stable_seconds) - utcnow()).total_seconds())


def _dispatch_job(db: Database, dispatcher: Dispatcher, job_id: int, state: JobState) -> None:
    try:
        dispatcher.job(job_id, state)
    except Exception:
        # The row stays with attempts == 0; the reconciler retries it on its next pass.
        logger.exception("cannot dispatch job %d (broker down?)", job_id)
        return
    with db.session() as session:
        jobs.dispatched(session, job_id)
    logger.info("job %d dispatched from state %s", job_id, state.value)


def reconcile(
    db: Database,
    dispatcher: Dispatcher,
    *,
    stale_seconds: float,
    export_grace_seconds: float,
) -> int:
    """Re-dispatch stale jobs and exports. Returns how many were re-dispatched."""
    now = utcnow()
    stale = now - timedelta(seconds=stale_seconds)
    stale_jobs: list[tuple[int, JobState]] = []
    exports: list[int] = []
    try:
        backlog = dispatcher.backlog()
    except Exception:
        logger.warning("broker unavailable for the backlog check")
        backlog = 0
    with db.session() as session:
        for job in session.scalars(
            select(Job).where(Job.state.in_([*jobs.RUNNING, JobState.REPORTED]))
        ).all():
            never_sent = job.attempts == 0
            if not never_sent and job.updated_at > stale:
                continue
            if job.state is JobState.REPORTED:
                # Its exports are reconciled one by one below; a job whose exports all
                # have an outcome but was never settled is settled here.
                jobs.settle(session, job.id)
                continue
            if not never_sent and backlog > 0:
                # Old because it waits behind other work, not because it was lost.
                continue
            if job.attempts >= MAX_JOB_ATTEMPTS:
                jobs.fail(session, job, f"stalled in state {job.state.value} after "
                          f"{job.attempts} dispatches")
                continue
            stale_jobs.append((job.id, job.state))
        export_stale = now - timedelta(seconds=stale_seconds + export_grace_seconds)
        for export in session.scalars(
            select(Export).where(
                Export.state.in_(jobs.OPEN_EXPORTS),
                Export.updated_at <= export_stale,
            )
        ).all():
            export.updated_at = now
            exports.append(export.id)
    for job_id, state in stale_jobs:
        logger.warning("re-dispatching stale job %d from state %s", job_id, state.value)
        SCHEDULER_RECONCILED.labels(kind="job").inc()
        _dispatch_job(db, dispatcher, job_id, state)
    for export_id in exports:
        logger.warning("re-dispatching stale export %d", export_id)
        SCHEDULER_RECONCILED.labels(kind="export").inc()
        try:
            dispatcher.export(export_id)
        except Exception:
            logger.exception("cannot dispatch export %d", export_id)
    return len(stale_jobs) + len(exports)


def recover_lost_runs(db: Database, dispatcher: Dispatcher) -> int:
    """Re-dispatch, within seconds, the jobs whose worker process died mid-stage.

    Returns how many were re-dispatched (failed poison jobs not counted).
    """
    redispatch: list[tuple[int, JobState]] = []
    with db.session() as session:
        for run in heartbeats.lost_runs(session):
            lost = heartbeats.mark_lost(session, run)
            job = session.get(Job, run.job_id)
            if job is None or job.state not in (*jobs.RUNNING, JobState.REPORTED):
                continue
            logger.warning("job %d: the process running %s on %s died (%d lost run(s))",
                           job.id, run.stage, run.worker, lost)
            if lost >= MAX_LOST_RUNS:
                jobs.fail(session, job, f"the worker process died {lost} times running "
                          f"{run.stage} on this study")
                continue
            redispatch.append((job.id, job.state))
    for job_id, state in dict(redispatch).items():
        SCHEDULER_RECONCILED.labels(kind="lost_run").inc()
        _dispatch_job(db, dispatcher, job_id, state)
    return len(set(dict(redispatch)))


def run_scheduler(
    db: Database,
    dispatcher: Dispatcher,
    *,
    stable_seconds: float,
    interval_seconds: float,
    stale_seconds: float,
    export_grace_seconds: float,
    stop: threading.Event | None = None,
    retention: Callable[[], object] | None = None,
) -> None:
    """Loop until ``stop`` is set: start complete studies at each study's stable moment (and
    at least every interval), recover lost runs every 5 passes of an interval, reconcile every
    10, and run ``retention`` (if any) once an hour."""
    stop = stop or threading.Event()
    passes = 0
    next_retention = time.monotonic()
    next_pass = time.monotonic()
    logger.info("scheduler: stable after %.1f s, stale after %.0f s", stable_seconds,
                stale_seconds)
    while not stop.is_set():
        periodic = time.monotonic() >= next_pass
        if periodic:
            next_pass = time.monotonic() + interval_seconds
        try:
            start_complete_studies(db, dispatcher, stable_seconds=stable_seconds)
            if periodic:
                if passes % 5 == 0:
                    recover_lost_runs(db, dispatcher)
                if retention is not None and time.monotonic() >= next_retention:
                    next_retention = time.monotonic() + 3600
                    retention()
                if passes % 10 == 0:
                    reconcile(db, dispatcher, stale_seconds=stale_seconds,
                              export_grace_seconds=export_grace_seconds)
                passes += 1
            due = seconds_to_next_completion(db, stable_seconds=stable_seconds)
        except Exception:
            # The database may be briefly unavailable; the next pass tries again.
            logger.exception("scheduler pass failed")
            due = None
        # A study first seen within half its stable time is still started on the moment.
        wait = min(max(0.0, next_pass - time.monotonic()), stable_seconds / 2 or interval_seconds)
        if due is not None:
            wait = min(wait, due + _CLOCK_SLACK_SECONDS)
        stop.wait(wait)

"""Sending work to the Celery workers by task name: what the scheduler and the API use.

Signatures by name (``app.signature``) rather than the task objects, so that sending a job
never imports the stages, their models or torch; the task names and the stage each one ends
in are declared here once and the tasks (:mod:`workers.tasks`) register under them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from enum import StrEnum

from celery import chain

from node import heartbeats
from node.broker import Queue, queue_depths, redis_client_url
from node.config import get_settings
from node.db import Database, JobState, open_database
from node.jobs import STAGES
from node.scheduler import Dispatcher
from workers.celery_app import app

logger = logging.getLogger(__name__)


class TaskName(StrEnum):
    """Names under which the node's Celery tasks are registered."""

    QC = "sononode.qc"
    """Quality control of every image of the study (CPU queue)."""
    INFER = "sononode.infer"
    """Model inference on the usable frames (GPU queue)."""
    ANALYSE = "sononode.analyse"
    """QC and inference in one task, on the inference queue where its workers also serve the
    CPU queue (``sononode up``, a single host): each image decoded once, no hop between."""
    REPORT = "sononode.report"
    """Build and store the SR, create the exports and send one export task for each
    (CPU queue)."""
    EXPORT_ALL = "sononode.export_all"
    """Send one export task per destination still to serve (CPU queue): a job resumed
    from ``reported``."""
    EXPORT = "sononode.export"
    """C-STORE one SR to one destination, with retries (CPU queue)."""


#: The task that moves a job out of each state (the chain from a state is the tasks of
#: every state from there on, in :data:`node.jobs.STAGES` order).
NEXT_TASK: Mapping[JobState, TaskName] = {
    JobState.QUEUED: TaskName.QC,
    JobState.QC_DONE: TaskName.INFER,
    JobState.INFERRED: TaskName.REPORT,
    JobState.REPORTED: TaskName.EXPORT_ALL,
}


@functools.cache
def _index() -> Database:
    settings = get_settings()
    return open_database(settings.effective_database_url, settings.data_dir)


def _inference_route() -> tuple[str, bool]:
    """The inference queue, and whether QC runs with inference on it
    (:func:`node.heartbeats.inference_route`)."""
    try:
        with _index().session() as session:
            return heartbeats.inference_route(session)
    except Exception:
        logger.warning("inference queue unknown (index unavailable); using gpu", exc_info=True)
        return Queue.GPU.value, False


def dispatch_job(job_id: int, from_state: JobState = JobState.QUEUED) -> None:
    """Send the rest of the job's chain, starting with the task that leaves ``from_state``.

    Inference goes to the queue :func:`node.heartbeats.inference_route` names now: the GPU
    worker's when one can analyse, else the CPU worker's. Where the workers of that queue
    also serve the CPU queue, QC and inference run there as one task
    (:data:`TaskName.ANALYSE`). The report task sends the exports itself, so the
    chain ends with it; a job resumed from ``reported`` gets the export fan-out alone.
    """
    if from_state not in NEXT_TASK:
        return
    names = [NEXT_TASK[s] for s in STAGES[STAGES.index(from_state):] if s in NEXT_TASK]
    if TaskName.REPORT in names:
        names.remove(TaskName.EXPORT_ALL)
    queue, together = (_inference_route() if TaskName.INFER in names
                       else (Queue.GPU.value, False))
    if together and names[:2] == [TaskName.QC, TaskName.INFER]:
        names[:2] = [TaskName.ANALYSE]
    routed = {TaskName.INFER, TaskName.ANALYSE}
    chain(*(app.signature(name.value, args=(job_id,), immutable=True,
                          **({"queue": queue, "routing_key": queue} if name in routed else {}))
            for name in names)).apply_async()


def dispatch_export(export_id: int) -> None:
    """Send one export task."""
    app.send_task(TaskName.EXPORT.value, args=(export_id,))


def queue_backlog() -> int:
    """Messages waiting in the node's queues (raises when the broker cannot be reached)."""
    return sum(queue_depths(redis_client_url(get_settings())).values())


def celery_dispatcher() -> Dispatcher:
    """The production dispatcher for the scheduler and the API."""
    return Dispatcher(job=dispatch_job, export=dispatch_export, backlog=queue_backlog)

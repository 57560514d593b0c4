"""Celery tasks: thin orchestrators over :mod:`workers.pipeline`.

A study runs as a chain ``qc -> infer -> report`` (sent by :mod:`workers.dispatch`), or
``analyse -> report`` where the inference workers serve the CPU queue too; ``report`` sends one
``export`` task per destination (``export_all`` does it for a job resumed after its report).
Payloads are job and export ids only. Each task runs one stage and hands its outcome to
:mod:`workers.signals` for the metrics.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

from billiard.exceptions import WorkerLostError
from celery import Task
from celery.signals import worker_process_init, worker_ready, worker_shutting_down
from sqlalchemy.exc import OperationalError

from node import heartbeats
from node.config import get_settings
from node.db import ExportState, open_database
from node.jobs import JobGone
from node.spool import Spool
from node.storage import StorageError
from workers import pipeline, signals
from workers.celery_app import GPU_QUEUE, app
from workers.dispatch import TaskName, dispatch_export
from workers.export import ExportTransientError
from workers.heartbeat import Heartbeat, worker_name
from workers.warmup import freeze_long_lived, warm_up

logger = logging.getLogger(__name__)

#: Errors worth retrying for the job stages: the database or the object store was briefly
#: unavailable.
TRANSIENT_JOB_ERRORS = (OperationalError, StorageError)

_context: pipeline.WorkerContext | None = None


def context() -> pipeline.WorkerContext:
    """This process's collaborators (database, spool, models), built once."""
    global _context
    if _context is None:
        settings = get_settings()
        _context = pipeline.WorkerContext(
            settings=settings,
            db=open_database(settings.effective_database_url, settings.data_dir),
            spool=Spool(settings.spool_dir, settings.incoming_dir),
            on_packs_loaded=signals.packs_loaded,
        )
    return _context


@worker_process_init.connect
def _init_process(**_: Any) -> None:
    """Load the model packs once per worker process and warm every stage up, before the
    first task."""
    global _context
    _context = None  # never reuse a parent's engine across fork
    ctx = context()
    analyser = None
    if ctx.settings.preload_models:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.settings.worker_concurrency))
        analyser = ctx.analyser()
    try:
        seconds = warm_up(analyser, max_frames=ctx.settings.max_frames_per_loop)
        logger.debug("warm-up study done in %.2f s", seconds)
    except Exception:
        logger.exception("warm-up failed; the first study is handled cold")
    freeze_long_lived()


_heartbeat: Heartbeat | None = None


@worker_ready.connect
def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    """In the worker's main process: beat with the pool's processes and what it serves."""
    global _heartbeat
    pool = sender.controller.pool
    queues = list(sender.app.amqp.queues.consume_from or ())
    ctx = context()
    _heartbeat = Heartbeat(ctx.db, ctx.settings, queues,
                           lambda: pool.info.get("processes", []))
    if GPU_QUEUE in queues and not _heartbeat.capability.can_analyse:
        # A worker that cannot analyse must not take inference work: the messages wait for
        # one that can, and /ready says why none does.
        sender.cancel_task_queue(GPU_QUEUE)
        _heartbeat.queues = [q for q in queues if q != GPU_QUEUE]
    _heartbeat.start()


@worker_shutting_down.connect
def _stop_heartbeat(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()


class JobTask(Task):  # type: ignore[misc]
    """A job stage: a permanent failure marks the job failed (visible in the API).

    A job that no longer exists or has failed meanwhile (:class:`node.jobs.JobGone`) ends
    the stage quietly. A worker process lost mid-task (killed, out of memory, a crashing
    native decoder) does not fail the job: the message is not requeued (that would loop
    on a poison study), and the reconciler re-dispatches the job, at most
    ``MAX_JOB_ATTEMPTS`` times.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        job_id = int(args[0] if args else kwargs["job_id"])
        ctx = context()
        with ctx.db.session() as session:
            # The pool process's parent is the worker's main process, which beats.
            run_id = heartbeats.start_run(session, job_id, self.name,
                                          worker=worker_name(os.getppid()), pid=os.getpid())
        try:
            outcome = super().__call__(*args, **kwargs)
        except JobGone as exc:
            logger.info("%s: %s", self.name, exc)
            return
        finally:
            if run_id is not None:
                with ctx.db.session() as session:
                    heartbeats.finish_run(session, run_id)
        for result in outcome if isinstance(outcome, tuple) else (outcome,):
            if result is not None:
                signals.stage_finished(result)

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any,
                   einfo: Any) -> None:
        job_id = args[0] if args else kwargs.get("job_id")
        if isinstance(exc, WorkerLostError):
            logger.error("worker lost running %s for job %s; the reconciler will retry",
                         self.name, job_id)
            return
        logger.error("task %s failed for job %s: %s", self.name, job_id, exc)
        if job_id is not None:
            pipeline.fail_job(context(), int(job_id), f"{self.name}: {exc!r}")


_settings = get_settings()

#: Options shared by the job stages: transient errors (broker, database) are retried with
#: exponential backoff by Celery before the job is marked failed.
job_stage = functools.partial(app.task, base=JobTask, autoretry_for=TRANSIENT_JOB_ERRORS,
                              max_retries=5, retry_backoff=2, retry_jitter=True)


@job_stage(name=TaskName.QC.value)
def qc(job_id: int) -> pipeline.QCDone | None:
    """Quality control of every image of the study (CPU queue)."""
    return pipeline.run_qc(context(), job_id)


@job_stage(name=TaskName.INFER.value)
def infer(job_id: int) -> pipeline.Inferred | None:
    """Model inference on the usable frames (GPU queue; CPU when no GPU)."""
    return pipeline.run_inference(context(), job_id)


@job_stage(name=TaskName.ANALYSE.value)
def analyse(job_id: int) -> tuple[pipeline.QCDone | None, pipeline.Inferred | None]:
    """QC and inference in one process, each image decoded once (the inference queue, where
    its workers also serve the CPU queue)."""
    return pipeline.run_analysis(context(), job_id)


@job_stage(name=TaskName.REPORT.value)
def report(job_id: int) -> pipeline.Reported | None:
    """Build and store the SR, create the exports and send them (CPU queue)."""
    reported = pipeline.run_report(context(), job_id)
    for export_id in reported.export_ids if reported is not None else ():
        try:
            dispatch_export(export_id)
        except Exception:
            # The report is durable and the export recorded: the reconciler sends it.
            logger.exception("export %d not dispatched (broker unavailable?)", export_id)
    return reported


@job_stage(name=TaskName.EXPORT_ALL.value)
def export_all(job_id: int) -> None:
    """Dispatch one export task per destination still to be served."""
    for export_id in pipeline.pending_exports(context(), job_id):
        dispatch_export(export_id)


class ExportTask(Task):  # type: ignore[misc]
    """After the retry budget (or a permanent refusal) the export is dead-lettered."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any,
                   einfo: Any) -> None:
        export_id = args[0] if args else kwargs.get("export_id")
        logger.error("export %s dead-lettered: %s", export_id, exc)
        if export_id is not None:
            signals.stage_finished(
                pipeline.export_failed(context(), int(export_id), ExportState.DEAD, str(exc))
            )


@app.task(
    name=TaskName.EXPORT.value,
    base=ExportTask,
    autoretry_for=(ExportTransientError, OperationalError),
    max_retries=_settings.export_max_retries,
    retry_backoff=max(1, round(_settings.export_retry_backoff_seconds)),
    retry_backoff_max=max(1, round(_settings.export_retry_backoff_max_seconds)),
    retry_jitter=False,
)
def export(export_id: int) -> None:
    """C-STORE the SR to one destination; retried with exponential backoff."""
    ctx = context()
    try:
        outcome = pipeline.run_export(ctx, export_id)
    except ExportTransientError as exc:
        signals.stage_finished(
            pipeline.export_failed(ctx, export_id, ExportState.RETRYING, str(exc))
        )
        raise
    if outcome is not None:
        signals.stage_finished(outcome)

"""Worker heartbeats and stage runs: who is alive, who can analyse, what a crash left behind.

Each Celery worker's main process writes a heartbeat every :data:`HEARTBEAT_SECONDS` with
its pool processes, its queues and whether it can analyse (device and model packs usable);
each stage execution is a :class:`~node.db.StageRun` row. The reconciler finds runs whose
process died (:func:`lost_runs`): the process is no longer in its worker's pool, or the
worker itself stopped beating. The API's readiness reads :func:`live_workers`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from node.broker import Queue
from node.db import Job, StageRun, WorkerHeartbeat, utcnow

#: How often a worker beats.
HEARTBEAT_SECONDS = 5.0
#: A worker whose last beat is older than this is taken for dead.
DEAD_AFTER_SECONDS = 4 * HEARTBEAT_SECONDS


def beat(session: Session, name: str, *, queues: Sequence[str], pool_pids: Sequence[int],
         can_analyse: bool, device: str | None, packs: Sequence[dict[str, Any]],
         problem: str | None) -> None:
    """Record that worker ``name`` is alive, with what it serves."""
    row = session.get(WorkerHeartbeat, name)
    if row is None:
        row = WorkerHeartbeat(name=name, started_at=utcnow())
        session.add(row)
    row.queues = ",".join(queues)
    row.pool_pids = [int(p) for p in pool_pids]
    row.can_analyse = can_analyse
    row.device = device
    row.packs = list(packs)
    row.problem = problem
    row.last_seen = utcnow()


def forget(session: Session, name: str) -> None:
    """A worker that stops cleanly removes its heartbeat."""
    session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.name == name))


def live_workers(session: Session, *, now: datetime | None = None) -> list[WorkerHeartbeat]:
    """Workers that beat within :data:`DEAD_AFTER_SECONDS`."""
    cutoff = (now or utcnow()) - timedelta(seconds=DEAD_AFTER_SECONDS)
    return list(session.scalars(select(WorkerHeartbeat).where(WorkerHeartbeat.last_seen >= cutoff)))


def inference_route(session: Session, *, now: datetime | None = None) -> tuple[str, bool]:
    """Where inference goes, and whether QC can run with it there as one task.

    The queue: ``gpu`` while a live worker consuming it can analyse, else ``cpu`` while one
    consuming that can (a host without a GPU worker), else ``gpu`` (it waits there;
    ``/ready`` says why). QC goes with it when every live worker that can analyse from that
    queue also serves ``cpu`` (one host: each image decoded once); not when none can, or
    when a worker of that queue serves inference alone (a GPU host beside CPU hosts).
    """
    able = [set((w.queues or "").split(",")) for w in live_workers(session, now=now)
            if w.can_analyse]
    queues = set().union(*able)
    queue = (Queue.GPU.value if Queue.GPU.value in queues or Queue.CPU.value not in queues
             else Queue.CPU.value)
    serving = [q for q in able if queue in q]
    return queue, bool(serving) and all(Queue.CPU.value in q for q in serving)


def start_run(session: Session, job_id: int, stage: str, *, worker: str,
              pid: int) -> int | None:
    """Record that a pool process started a stage of a job; the run's id (``None``: no
    such job)."""
    if session.get(Job, job_id) is None:
        return None
    run = StageRun(job_id=job_id, stage=stage, worker=worker, pid=pid, started_at=utcnow())
    session.add(run)
    session.flush()
    return run.id


def finish_run(session: Session, run_id: int) -> None:
    """The stage ended (done, nothing to do, or failed with an error it reported)."""
    run = session.get(StageRun, run_id)
    if run is not None and run.finished_at is None:
        run.finished_at = utcnow()


def lost_runs(session: Session, *, now: datetime | None = None) -> list[StageRun]:
    """Unfinished runs whose process died: gone from its worker's pool (seen by a beat
    after the run started), or its worker stopped beating."""
    now = now or utcnow()
    dead_cutoff = now - timedelta(seconds=DEAD_AFTER_SECONDS)
    workers = {w.name: w for w in session.scalars(select(WorkerHeartbeat))}
    lost = []
    for run in session.scalars(select(StageRun).where(StageRun.finished_at.is_(None))):
        worker = workers.get(run.worker)
        if worker is None:
            # Its worker never beat, or stopped and forgot itself.
            dead = run.started_at < dead_cutoff
        else:
            beat_since = worker.last_seen > run.started_at + timedelta(seconds=1)
            dead = worker.last_seen < dead_cutoff or (beat_since
                                                      and run.pid not in worker.pool_pids)
        if dead:
            lost.append(run)
    return lost


def mark_lost(session: Session, run: StageRun) -> int:
    """Close a lost run; how many runs of its job have been lost so far."""
    run.finished_at = utcnow()
    run.lost = True
    return len(session.scalars(select(StageRun.id).where(
        StageRun.job_id == run.job_id, StageRun.lost.is_(True))).all())

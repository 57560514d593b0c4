"""Inference goes where a worker can run it: the GPU worker's queue, else the CPU worker's."""

from __future__ import annotations

from datetime import timedelta

import pytest

from node import heartbeats
from node.db import Database, WorkerHeartbeat, utcnow


def _beat(db: Database, name: str, queues: list[str], *, can: bool, age: float = 0.0) -> None:
    with db.session() as session:
        heartbeats.beat(session, name, queues=queues, pool_pids=[1], can_analyse=can,
                        device="cpu", packs=[], problem=None if can else "no pack")
        if age:
            row = session.get(WorkerHeartbeat, name)
            assert row is not None
            row.last_seen = utcnow() - timedelta(seconds=age)


def _queue(db: Database) -> str:
    with db.session() as session:
        return heartbeats.inference_queue(session)


def test_gpu_queue_while_a_gpu_worker_can_analyse(db: Database) -> None:
    _beat(db, "cpu-host:1", ["cpu"], can=True)
    _beat(db, "gpu-host:1", ["gpu"], can=True)
    assert _queue(db) == "gpu"


def test_cpu_queue_on_a_host_without_gpu_worker(db: Database) -> None:
    _beat(db, "cpu-host:1", ["cpu"], can=True)
    assert _queue(db) == "cpu"
    # A GPU worker that cannot analyse (no CUDA, no pack) does not take inference ...
    _beat(db, "gpu-host:1", ["gpu"], can=False)
    assert _queue(db) == "cpu"
    # ... nor does a dead one.
    _beat(db, "gpu-host:2", ["gpu"], can=True, age=heartbeats.DEAD_AFTER_SECONDS + 5)
    assert _queue(db) == "cpu"


def test_gpu_queue_when_nobody_can_analyse(db: Database) -> None:
    assert _queue(db) == "gpu"
    _beat(db, "cpu-host:1", ["cpu"], can=False)
    assert _queue(db) == "gpu"


@pytest.mark.parametrize("able", [["cpu"], ["cpu", "gpu"]])
def test_the_inference_task_is_routed_to_the_chosen_queue(db: Database, able: list[str],
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          ) -> None:
    """The job's chain as dispatched, resolved by Celery's own router (task_routes send
    inference to ``gpu`` by default; the chain's option must win)."""
    from node.db import JobState
    from workers import dispatch
    from workers.celery_app import app

    sent: list[object] = []

    class Chain:
        def __init__(self, *signatures: object) -> None:
            sent.extend(signatures)

        def apply_async(self) -> None:
            pass

    monkeypatch.setattr(dispatch, "_index", lambda: db)
    monkeypatch.setattr(dispatch, "chain", Chain)
    _beat(db, "host:1", able, can=True)
    dispatch.dispatch_job(7, JobState.QUEUED)
    routes = {sig.task: app.amqp.router.route(dict(sig.options), sig.task)  # type: ignore[attr-defined]
              for sig in sent}
    expected = "gpu" if "gpu" in able else "cpu"
    assert routes["sononode.infer"]["queue"].name == expected
    assert routes["sononode.infer"]["routing_key"] == expected
    assert routes["sononode.qc"]["queue"].name == "cpu"

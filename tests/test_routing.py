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
        return heartbeats.inference_route(session)[0]


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


def _dispatched(db: Database, monkeypatch: pytest.MonkeyPatch,
                state: str = "queued") -> dict[str, dict[str, object]]:
    """The job's chain as dispatched, each task resolved by Celery's own router (task_routes
    send inference to ``gpu`` by default; the chain's option must win)."""
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
    dispatch.dispatch_job(7, JobState(state))
    return {sig.task: app.amqp.router.route(dict(sig.options), sig.task)  # type: ignore[attr-defined]
            for sig in sent}


@pytest.mark.parametrize("able", [["cpu"], ["cpu", "gpu"]])
def test_one_host_runs_qc_and_inference_as_one_task(db: Database, able: list[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker serving both queues (``sononode up``) gets QC and inference as one task, on
    the inference queue; the report follows and sends the exports itself."""
    _beat(db, "host:1", able, can=True)
    routes = _dispatched(db, monkeypatch)
    assert list(routes) == ["sononode.analyse", "sononode.report"]
    expected = "gpu" if "gpu" in able else "cpu"
    assert routes["sononode.analyse"]["queue"].name == expected  # type: ignore[attr-defined]
    assert routes["sononode.analyse"]["routing_key"] == expected
    assert routes["sononode.report"]["queue"].name == "cpu"  # type: ignore[attr-defined]


def test_a_gpu_host_beside_cpu_hosts_gets_inference_alone(db: Database,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          ) -> None:
    _beat(db, "cpu-host:1", ["cpu"], can=True)
    _beat(db, "gpu-host:1", ["gpu"], can=True)
    routes = _dispatched(db, monkeypatch)
    assert list(routes) == ["sononode.qc", "sononode.infer", "sononode.report"]
    assert routes["sononode.qc"]["queue"].name == "cpu"  # type: ignore[attr-defined]
    assert routes["sononode.infer"]["queue"].name == "gpu"  # type: ignore[attr-defined]
    assert routes["sononode.infer"]["routing_key"] == "gpu"


def test_resumed_jobs_get_the_rest_of_their_chain(db: Database,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _beat(db, "host:1", ["cpu", "gpu"], can=True)
    assert list(_dispatched(db, monkeypatch, "qc_done")) == ["sononode.infer", "sononode.report"]
    assert list(_dispatched(db, monkeypatch, "reported")) == ["sononode.export_all"]

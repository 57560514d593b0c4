"""Recovery after a worker process dies mid-stage: found from the heartbeats within seconds."""

from __future__ import annotations

from datetime import timedelta

from fixtures import make_job
from test_scheduler import Recorder

from node import heartbeats
from node.db import (
    Database,
    Job,
    JobState,
    StageRun,
    Study,
    StudyState,
    WorkerHeartbeat,
    utcnow,
)
from node.scheduler import MAX_LOST_RUNS, recover_lost_runs


def _job(db: Database, state: JobState = JobState.QC_DONE) -> int:
    return make_job(db, state, study_uid="1.2.840.99.9")


def _beat(db: Database, name: str, pids: list[int], *, age: float = 0.0) -> None:
    with db.session() as session:
        heartbeats.beat(session, name, queues=["cpu", "gpu"], pool_pids=pids, can_analyse=True,
                        device="cpu", packs=[], problem=None)
        heartbeat = session.get(WorkerHeartbeat, name)
        assert heartbeat is not None
        heartbeat.last_seen = utcnow() - timedelta(seconds=age)


def _run(db: Database, job_id: int, worker: str, pid: int, *, age: float) -> int:
    with db.session() as session:
        run_id = heartbeats.start_run(session, job_id, "sononode.infer", worker=worker, pid=pid)
        assert run_id is not None
        run = session.get(StageRun, run_id)
        assert run is not None
        run.started_at = utcnow() - timedelta(seconds=age)
        return run_id


def test_a_run_whose_process_left_the_pool_is_lost(db: Database) -> None:
    job_id = _job(db)
    _run(db, job_id, "host:1", 101, age=3)   # its process is gone from the pool
    _run(db, job_id, "host:1", 102, age=3)   # still in the pool: running
    _run(db, job_id, "host:1", 103, age=0)   # started after the last beat: not judged yet
    _beat(db, "host:1", [102, 104])
    with db.session() as session:
        assert sorted(r.pid for r in heartbeats.lost_runs(session)) == [101]


def test_runs_of_a_worker_that_stopped_beating_are_lost(db: Database) -> None:
    job_id = _job(db)
    _run(db, job_id, "host:2", 201, age=60)
    _beat(db, "host:2", [201], age=heartbeats.DEAD_AFTER_SECONDS + 1)
    with db.session() as session:
        assert [r.pid for r in heartbeats.lost_runs(session)] == [201]
        assert heartbeats.live_workers(session) == []


def test_a_lost_job_is_redispatched_at_once_and_failed_when_it_keeps_killing(
    db: Database
) -> None:
    rec = Recorder()
    job_id = _job(db)
    _beat(db, "host:3", [])
    for attempt in range(1, MAX_LOST_RUNS + 1):
        _run(db, job_id, "host:3", 300 + attempt, age=5)
        _beat(db, "host:3", [])
        recover_lost_runs(db, rec.dispatcher())
        with db.session() as session:
            job = session.get(Job, job_id)
            assert job is not None
            if attempt < MAX_LOST_RUNS:
                assert job.state is JobState.QC_DONE
                assert rec.jobs[-1] == (job_id, JobState.QC_DONE)
            else:
                assert job.error is not None
                assert job.state is JobState.FAILED and "died 3 times" in job.error
                study = session.get(Study, "1.2.840.99.9")
                assert study is not None and study.state is StudyState.FAILED
    assert len(rec.jobs) == MAX_LOST_RUNS - 1

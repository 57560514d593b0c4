"""Faults injected into a running node (``sononode up``, real processes and peers).

After each: every instance answered Success is in the spool and the index, and every
complete study has exactly one current SR in the PACS.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from fixtures import require_tools
from pydicom import dcmread
from sqlalchemy import select

from harness.databases import create_postgres, drop_postgres
from harness.peers import Node, Orthanc, dcmsend, dcmtk, start_node, wait_for
from harness.proxy import TcpProxy
from node.db import Database, Instance, Job, JobState, StageRun, Study, open_database
from simulator import simulate_study

pytestmark = [pytest.mark.slow, pytest.mark.orthanc, pytest.mark.timeout(600)]


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    require_tools("dcmsend", "echoscu", "Orthanc")


def _study(folder: Path, seed: int, *, loops: int = 1) -> tuple[str, list[Path]]:
    simulate_study(folder, seed=seed, vendor="Northwind Medical", n_images=2, n_loops=loops,
                   frames_per_loop=24)
    files = sorted(folder.glob("*.dcm"))
    return str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID), files


def _srs(orthanc: Orthanc, study_uid: str) -> list[dict[str, object]]:
    return orthanc.find_instances(study_uid, modality="SR")


def _index(node: Node) -> Database:
    url = node.env.get("SONONODE_DATABASE_URL") or f"sqlite:///{node.data_dir / 'sononode.db'}"
    return open_database(url)


def _echo(port: int) -> bool:
    done = subprocess.run([dcmtk("echoscu"), "-to", "5", "-aec", "SONONODE", "127.0.0.1",
                           str(port)], capture_output=True, timeout=30, check=False)
    return done.returncode == 0


def _all_indexed(db: Database, files: list[Path]) -> bool:
    uids = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    with db.session() as session:
        found = set(session.scalars(select(Instance.sop_instance_uid).where(
            Instance.sop_instance_uid.in_(uids))).all())
    return found == uids


def _a_running_stage(db: Database) -> StageRun:
    """Wait until a stage is running (a stage_runs row not finished); that row."""
    def running() -> StageRun | None:
        with db.session() as session:
            return session.scalars(select(StageRun).where(
                StageRun.finished_at.is_(None))).first()

    return wait_for(running, timeout=120, interval=0.02, what="a stage running")


def test_a_pool_process_killed_mid_stage_is_recovered_within_seconds(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    node = start_node(tmp_path / "data", destinations=orthanc.destination)
    try:
        study_uid, files = _study(tmp_path / "study", seed=41, loops=3)
        dcmsend(node.dicom_port, files)
        db = _index(node)
        run = _a_running_stage(db)
        os.kill(run.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(lambda: _srs(orthanc, study_uid), timeout=180, what="the SR in Orthanc")
        recovered = time.monotonic() - killed_at
        print(f"\nkilled {run.stage} (pid {run.pid}); SR in the PACS {recovered:.1f} s later")
        assert recovered < 90, recovered
        with db.session() as session:
            lost = session.scalars(select(StageRun).where(StageRun.lost.is_(True))).all()
            assert [r.pid for r in lost] == [run.pid]

        def state() -> str | None:
            with db.session() as session:
                study = session.get(Study, study_uid)
                return study.state.value if study is not None else None

        # The PACS has the SR a moment before the export task records it as sent.
        wait_for(lambda: state() == "exported", timeout=30, what="the study exported")
        assert len(_srs(orthanc, study_uid)) == 1
        assert _all_indexed(db, files)
        db.dispose()
    finally:
        node.stop()


def test_the_worker_main_process_killed_mid_stage_is_recovered(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    """kill -9 of the Celery worker's main process while one of its pool processes runs a
    stage: the supervisor starts a new worker, the dead one's heartbeat stops and its run
    is lost and re-dispatched; the study gets exactly one SR."""
    node = start_node(tmp_path / "data", destinations=orthanc.destination)
    try:
        study_uid, files = _study(tmp_path / "study", seed=46, loops=1)
        dcmsend(node.dicom_port, files)
        db = _index(node)
        _a_running_stage(db)
        (worker,) = node.role_pids("worker")
        orphans = _descendants(worker)
        os.kill(worker, signal.SIGKILL)
        for pid in orphans:  # a pool process outliving its parent is killed with it
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_for(lambda: _srs(orthanc, study_uid), timeout=240, what="the SR in Orthanc")
        wait_for(lambda: (c := node.role_pids("worker")) and c != [worker],
                 timeout=120, what="a new worker")
        assert len(_srs(orthanc, study_uid)) == 1
        assert _all_indexed(db, files)
        db.dispose()
    finally:
        node.stop()


def test_the_listener_serves_while_another_role_keeps_crashing(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    """The API killed five times in a row: modalities still store, the supervisor backs
    off (1, 2, 4, 8, 16 s) and brings the API back, and the node never stops."""
    node = start_node(tmp_path / "data", destinations=orthanc.destination)
    try:
        for _ in range(5):
            pids = wait_for(lambda: node.role_pids("api"), timeout=120,
                            what="the API restarted")
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            assert _echo(node.dicom_port)
            assert node.process.poll() is None
        study_uid, files = _study(tmp_path / "study", seed=42)
        dcmsend(node.dicom_port, files)
        wait_for(lambda: httpx.get(node.url + "/health", timeout=2).status_code == 200,
                 timeout=180, what="the API back")
        wait_for(lambda: _srs(orthanc, study_uid), timeout=180, what="the SR in Orthanc")
        assert "restarting in 16 s" in node.log()
    finally:
        node.stop()


@pytest.mark.postgres
@pytest.mark.redis
def test_a_database_outage_loses_nothing_answered_success(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    """PostgreSQL unreachable when the node starts (it waits) and again while a study
    arrives: stores get Out of Resources, nothing answered Success is lost, and the
    study's one SR arrives once the modality has re-sent the rest."""
    import redis

    direct = create_postgres()
    redis.Redis(host="127.0.0.1", port=6379, db=8).flushdb()
    with TcpProxy(5432) as proxy:
        url = direct.replace(":5432/", f":{proxy.port}/")
        proxy.cut()
        started = time.monotonic()
        env = {"SONONODE_DATABASE_URL": url, "SONONODE_BROKER_URL": "redis://127.0.0.1:6379/8"}
        import threading

        threading.Timer(5.0, proxy.restore).start()
        node = start_node(tmp_path / "data", destinations=orthanc.destination, extra_env=env,
                          timeout=180)
        try:
            assert time.monotonic() - started >= 5.0  # it waited for its database
            study_uid, files = _study(tmp_path / "study", seed=43, loops=1)
            dcmsend(node.dicom_port, files[:1])
            proxy.cut()
            during = dcmsend(node.dicom_port, files[1:], check=False)
            proxy.restore()
            assert _echo(node.dicom_port)
            db = open_database(url)
            # The modality re-sends what was not answered Success.
            wait_for(lambda: dcmsend(node.dicom_port, files, check=False).returncode == 0,
                     timeout=120, interval=2, what="stores accepted again")
            assert _all_indexed(db, files), during.stdout
            wait_for(lambda: _srs(orthanc, study_uid), timeout=240, what="the SR in Orthanc")
            with db.session() as session:
                jobs = session.scalars(select(Job).where(
                    Job.study_instance_uid == study_uid)).all()
                assert jobs and all(j.state is not JobState.FAILED for j in jobs)
            db.dispose()
        finally:
            node.stop()
            drop_postgres(direct)


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True, check=False).stdout
    children = [int(line) for line in out.split()]
    return children + [d for c in children for d in _descendants(c)]


@pytest.mark.redis
def test_a_broker_flush_with_messages_queued_loses_no_study(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    """The worker frozen (SIGSTOP), a study's messages queued, then Redis FLUSHDB: the
    messages are gone, the database still knows the job, and the reconciler sends it again
    once it is stale; the study gets exactly one SR."""
    import redis

    broker = redis.Redis(host="127.0.0.1", port=6379, db=9)
    broker.flushdb()
    node = start_node(tmp_path / "data", destinations=orthanc.destination, extra_env={
        "SONONODE_BROKER_URL": "redis://127.0.0.1:6379/9",
        "SONONODE_STALE_JOB_SECONDS": "10"})
    frozen: list[int] = []
    try:
        workers = wait_for(lambda: node.role_pids("worker"), timeout=60,
                           what="the worker")
        frozen = [*workers, *(d for w in workers for d in _descendants(w))]
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        study_uid, files = _study(tmp_path / "study", seed=44, loops=0)
        dcmsend(node.dicom_port, files)
        wait_for(lambda: sum(int(broker.llen(q)) for q in ("cpu", "gpu")) > 0, timeout=60,
                 interval=0.2, what="the study's messages queued")
        broker.flushdb()
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        frozen = []
        wait_for(lambda: _srs(orthanc, study_uid), timeout=240, what="the SR in Orthanc")
        assert len(_srs(orthanc, study_uid)) == 1
        db = _index(node)
        assert _all_indexed(db, files)
        db.dispose()
        assert "re-dispatching stale job" in node.log()
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        node.stop()


def test_the_listener_killed_mid_association_and_the_scheduler_killed_lose_nothing(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    """kill -9 of the listener while a large loop is being received, and of the scheduler
    three times: the supervisor restarts both, the partial file is swept, the modality
    re-sends what was not answered Success, and the study gets exactly one SR."""
    node = start_node(tmp_path / "data", destinations=orthanc.destination)
    try:
        folder = tmp_path / "study"
        simulate_study(folder, seed=45, vendor="Northwind Medical", n_images=1, n_loops=1,
                       frames_per_loop=240)
        files = sorted(folder.glob("*.dcm"))
        study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        loop = max(files, key=lambda f: f.stat().st_size)
        incoming = node.data_dir / "incoming"
        sender = subprocess.Popen([dcmtk("dcmsend"), "-aec", "SONONODE", "-aet", "MODALITY",
                                   "127.0.0.1", str(node.dicom_port), str(loop)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: any(p.is_file() and p.stat().st_size > 0
                                 for p in incoming.glob("**/*")),
                     timeout=60, interval=0.01, what="a partial file in incoming/")
            # Every listener process (one per core by default): whichever has the loop.
            for listener in node.role_pids("listener"):
                os.kill(listener, signal.SIGKILL)
        finally:
            sender.wait(timeout=120)
        for _ in range(3):
            (scheduler,) = wait_for(lambda: node.role_pids("scheduler"),
                                    timeout=120, what="the scheduler (re)started")
            os.kill(scheduler, signal.SIGKILL)

            def restarted(old: int = scheduler) -> list[int] | None:
                now = node.role_pids("scheduler")
                return now if now and now != [old] else None

            wait_for(restarted, timeout=120, what="the scheduler restarted")
        wait_for(lambda: node.role_pids("listener") and _echo(node.dicom_port),
                 timeout=120, what="the listener restarted")
        assert not [p for p in incoming.glob("**/*") if p.is_file()], "a partial file was kept"
        dcmsend(node.dicom_port, files)  # the modality re-sends
        wait_for(lambda: _srs(orthanc, study_uid), timeout=240, what="the SR in Orthanc")
        db = _index(node)
        assert _all_indexed(db, files)
        db.dispose()
        assert len(_srs(orthanc, study_uid)) == 1
    finally:
        node.stop()


def test_not_ready_while_no_worker_can_analyse(tmp_path: Path) -> None:
    """SONONODE_DEVICE=cuda on a machine without CUDA: the worker stays up but takes no
    inference work, and /ready says so (503) instead of failing studies silently."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    node = start_node(tmp_path / "data", extra_env={"SONONODE_DEVICE": "cuda"},
                      wait_ready=False)
    try:
        def reason() -> str | None:
            response = httpx.get(node.url + "/ready", timeout=5)
            text = response.json()["checks"]["analysis"]
            return text if response.status_code == 503 and "cuda" in text.lower() else None

        text = wait_for(reason, timeout=120, what="/ready naming the CUDA problem")
        assert "SONONODE_DEVICE=cuda" in text
    finally:
        node.stop()

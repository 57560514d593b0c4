"""Several listeners behind one address: the node's way to scale reception.

Two ``sononode listener`` processes share one data folder and one PostgreSQL index, each
receiving into its own incoming folder (``SONONODE_LISTENER_NAME``, the host name in a
cluster), behind a TCP front that spreads connections over them in turn as a Kubernetes
Service does. Modalities send one study in concurrent associations with DCMTK, every
instance more than once: each is answered Success, stored once, indexed once, and the
study becomes one revision to analyse.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fixtures import require_tools
from pydicom import dcmread
from sqlalchemy import func, select

from harness.databases import create_postgres, drop_postgres
from harness.peers import dcmsend, get_port, port_open, terminate, wait_for
from harness.proxy import TcpProxy
from node.config import Settings
from node.db import Instance, Study, open_database
from simulator import simulate_study

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.dcmtk,
              pytest.mark.timeout(300)]


def test_two_listeners_behind_one_address_store_each_instance_once(tmp_path: Path) -> None:
    require_tools("dcmsend")
    database = create_postgres()
    data = tmp_path / "data"
    ports = [get_port(), get_port()]
    base = {k: v for k, v in os.environ.items() if not k.startswith("SONONODE_")}
    processes = []
    try:
        for name, port in zip(("listener-a", "listener-b"), ports, strict=True):
            env = {**base, "SONONODE_DATA_DIR": str(data), "SONONODE_DATABASE_URL": database,
                   "SONONODE_DICOM_HOST": "127.0.0.1", "SONONODE_DICOM_PORT": str(port),
                   "SONONODE_LISTENER_NAME": name, "PYTHONUNBUFFERED": "1"}
            log = open(tmp_path / f"{name}.log", "ab")  # noqa: SIM115 - closed at exit
            processes.append(subprocess.Popen([sys.executable, "-m", "node.cli", "listener"],
                                              env=env, stdout=log, stderr=subprocess.STDOUT))
        wait_for(lambda: all(port_open(p) for p in ports), timeout=120,
                 what="both listeners")
        simulate_study(tmp_path / "study", seed=71, vendor="Kestrel Sonics", n_images=6,
                       n_loops=2, frames_per_loop=8)
        files = sorted((tmp_path / "study").glob("*.dcm"))
        uids = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
        study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        with TcpProxy(ports) as front, ThreadPoolExecutor(max_workers=6) as pool:
            # Six associations at once, each with the whole study in its own order.
            orders = [files[i:] + files[:i] for i in range(6)]
            results = list(pool.map(lambda order: dcmsend(front.port, order, check=False),
                                    orders))
            assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
            assert sorted(front.connections) == sorted(ports)  # both listeners took some
            assert sum(front.connections.values()) == 6
        db = open_database(database)
        with db.session() as session:
            stored = session.scalars(select(Instance.sop_instance_uid).where(
                Instance.study_instance_uid == study_uid)).all()
            assert sorted(stored) == sorted(uids)  # each instance indexed once
            study = session.get(Study, study_uid)
            assert study is not None
            assert session.scalar(select(func.count()).select_from(Study)) == 1
        db.dispose()
        spooled = sorted(p.stem for p in (data / "spool").rglob("*.dcm"))
        assert spooled == sorted(uids)
        for name in ("listener-a", "listener-b"):
            folder = data / "incoming" / name
            assert folder.is_dir() and not any(folder.iterdir()), name
    finally:
        terminate(processes)
        drop_postgres(database)


def test_roles_starting_at_once_on_a_new_database_all_find_their_schema() -> None:
    """Several processes creating the schema of a new PostgreSQL database at once (the
    listeners and workers of a fresh cluster): one creates it, none fails."""
    from node.db import Database

    database = create_postgres()
    try:
        handles = [Database(database) for _ in range(6)]
        with ThreadPoolExecutor(max_workers=6) as pool:
            list(pool.map(lambda db: db.create_schema(), handles))
        with handles[0].session() as session:
            assert session.scalar(select(func.count()).select_from(Study)) == 0
        for db in handles:
            db.dispose()
    finally:
        drop_postgres(database)


def test_sononode_up_runs_several_listener_processes_on_one_port(tmp_path: Path) -> None:
    """``SONONODE_LISTENER_PROCESSES=2``: two listener processes bound to the one DICOM port
    (SO_REUSEPORT); the kernel spreads associations over both, each receives into its own
    incoming folder, and every instance is stored and indexed once."""
    require_tools("dcmsend")
    from harness.peers import start_node

    # Analysis held back: only reception is under test.
    node = start_node(tmp_path / "data", extra_env={"SONONODE_LISTENER_PROCESSES": "2",
                                                    "SONONODE_STUDY_STABLE_SECONDS": "3600"})
    try:
        pids = {str(pid) for pid in node.role_pids("listener")}
        assert len(pids) == 2, pids
        simulate_study(tmp_path / "study", seed=72, vendor="Kestrel Sonics", n_images=16,
                       n_loops=0)
        files = sorted((tmp_path / "study").glob("*.dcm"))
        uids = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
        # One association per instance, four at a time: with 16 connections, the chance
        # that the kernel gives every one to the same process is 2 ** -15.
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(lambda f: dcmsend(node.dicom_port, [f], check=False),
                                    files))
        assert all(r.returncode == 0 for r in results), [r.stderr for r in results]

        def closed_by() -> set[str] | None:
            # "date time role pid LEVEL logger: association from ... closed: 1 stored in 1 study"
            lines = [line for line in node.log().splitlines()
                     if " listener " in line and "closed: 1 stored" in line]
            return {line.split()[3] for line in lines} if len(lines) == len(files) else None

        served = wait_for(closed_by, timeout=60, what="every association's tally")
        assert served == pids  # both processes took associations
        db = open_database(f"sqlite:///{tmp_path / 'data' / 'sononode.db'}")
        with db.session() as session:
            stored = session.scalars(select(Instance.sop_instance_uid)).all()
        db.dispose()
        assert sorted(stored) == sorted(uids)
        for i in (1, 2):  # named as the supervisor names them, resolved as the node does
            own = Settings(data_dir=tmp_path / "data",
                           listener_name=f"{socket.gethostname()}-{i}").incoming_dir
            assert own.is_dir(), own
    finally:
        node.stop()

"""Inference workers on another host read instances from an S3-compatible object store.

The store is moto's S3 server (its standalone HTTP server, on a free port): the node talks
to it through boto3 as it would to MinIO, Ceph or AWS. A study goes to the real listener
over DICOM; QC runs beside the spool and uploads; inference then runs with a spool of its
own that is empty, as on a GPU host that does not mount the node's data, and reads every
image from the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from fixtures import require_tools
from inprocess import InProcessNode, in_process_node
from pydicom import dcmread
from sqlalchemy import select

from harness.databases import create_postgres, drop_postgres
from harness.peers import Orthanc, dcmsend, get_port, port_open, terminate, wait_for
from node import heartbeats
from node.config import Settings
from node.db import Job, JobState, Study, StudyState, open_database, utcnow
from node.retention import purge
from node.spool import Spool
from node.storage import S3Store, SpoolStore, StorageError, open_store, parse_s3_url
from simulator import simulate_study
from workers import pipeline

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

pytestmark = pytest.mark.timeout(300)

BUCKET = "sononode-test"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """moto's S3 server on a free port, with test credentials in the environment."""
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                      AWS_DEFAULT_REGION="us-east-1")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
    yield url
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _keys(endpoint: str, prefix: str) -> list[str]:
    listing = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=BUCKET,
                                                                        Prefix=prefix)
    return sorted(item["Key"] for item in listing.get("Contents", []))


class CountingStore(S3Store):
    """An :class:`S3Store` that remembers what it fetched."""

    fetched: list[str]

    @contextlib.contextmanager
    def fetch(self, relative: str) -> Iterator[Path]:
        self.fetched.append(relative)
        with super().fetch(relative) as path:
            yield path


def test_urls_and_keys() -> None:
    assert parse_s3_url("s3://bucket-1/a/b/") == ("bucket-1", "a/b")
    assert parse_s3_url("s3://bucket-1") == ("bucket-1", "")
    for bad in ("http://bucket/x", "s3:///x", "s3://Upper/x", "s3://ab/x", "s3://-bucket"):
        with pytest.raises(ValueError):
            parse_s3_url(bad)
    store = S3Store("s3://bucket-1/site", client=object())
    assert store.key("1.2/3.4/5.6.dcm") == "site/1.2/3.4/5.6.dcm"
    for bad in ("../x.dcm", "/etc/passwd", ""):
        with pytest.raises(ValueError):
            store.key(bad)
    with pytest.raises(ValueError, match="bucket name"):
        Settings(storage_url="s3://No_Such")


def test_round_trip_through_the_object_store(endpoint: str, tmp_path: Path) -> None:
    store = S3Store(f"s3://{BUCKET}/round-trip", endpoint_url=endpoint,
                    cache_dir=tmp_path / "cache")
    local = tmp_path / "instance.dcm"
    local.write_bytes(os.urandom(300_000))
    relative = "1.2.3/1.2.3.4/1.2.3.4.5.dcm"
    assert store.upload(relative, local) is True
    assert store.upload(relative, local) is False  # already there, same size
    assert _keys(endpoint, "round-trip/") == [f"round-trip/{relative}"]
    with store.fetch(relative) as path:
        assert path.read_bytes() == local.read_bytes()
        assert path.parent == tmp_path / "cache"
    assert not list((tmp_path / "cache").iterdir())  # the copy is gone after use
    store.delete(relative)
    with pytest.raises(FileNotFoundError), store.fetch(relative):
        pass
    assert not list((tmp_path / "cache").iterdir())
    store.delete(relative)  # deleting what is not there is not an error


def test_an_unreachable_store_is_a_storage_error(tmp_path: Path) -> None:
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{get_port()}",
                          config=Config(retries={"max_attempts": 1}, connect_timeout=2))
    store = S3Store(f"s3://{BUCKET}/x", client=client, cache_dir=tmp_path)
    local = tmp_path / "a.dcm"
    local.write_bytes(b"x" * 10)
    with pytest.raises(StorageError, match=r"lookup of|upload of"):
        store.upload("1/2/3.dcm", local)
    with pytest.raises(StorageError), store.fetch("1/2/3.dcm"):
        pass


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessNode]:
    yield from in_process_node(tmp_path_factory.mktemp("node"))


def _new_job(node: InProcessNode, folder: Path, seed: int) -> tuple[int, str]:
    """A simulated study sent to the listener and its job: ``(job id, study UID)``."""
    simulate_study(folder, seed=seed, vendor="Aurora Imaging", n_images=3, n_loops=1,
                   frames_per_loop=4)
    paths = sorted(folder.glob("**/*.dcm"))
    node.send(paths)
    job_id = node.start_job()
    return job_id, str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def test_inference_on_a_host_without_the_spool_reads_the_object_store(
    node: InProcessNode, endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id, study_uid = _new_job(node, tmp_path / "study", seed=61)
    prefix = "site-a"
    beside = dataclasses.replace(node.ctx, store=S3Store(f"s3://{BUCKET}/{prefix}",
                                                         endpoint_url=endpoint))
    qc_done = pipeline.run_qc(beside, job_id)
    assert qc_done is not None
    usable = [uid for uid, record in qc_done.qc.instances.items()
              if record.usable_frame_indices]
    assert len(usable) == 4
    uploaded = _keys(endpoint, f"{prefix}/")
    assert len(uploaded) == 4 and all(k.endswith(".dcm") for k in uploaded)

    # The GPU host: its own empty spool, the same index and broker, the object store.
    remote = CountingStore(f"s3://{BUCKET}/{prefix}", endpoint_url=endpoint,
                           cache_dir=tmp_path / "gpu-cache")
    remote.fetched = []
    empty = Spool(tmp_path / "gpu-spool", tmp_path / "gpu-incoming")
    gpu = dataclasses.replace(node.ctx, spool=empty, store=remote)
    inferred = pipeline.run_inference(gpu, job_id)
    assert inferred is not None
    analysed = [im for im in inferred.result.images if im.view is not None]
    assert len(analysed) == 4  # every usable image reached the model
    assert len(remote.fetched) == 4
    assert not any((tmp_path / "gpu-spool").iterdir())
    assert not list((tmp_path / "gpu-cache").iterdir())  # downloads deleted after decoding

    # Retention deletes the copies with the spooled files.
    with node.db.session() as session:
        study = session.get(Study, study_uid)
        assert study is not None
        study.state = StudyState.EXPORTED
    report = purge(node.db, node.ctx.spool, days=1, now=utcnow() + timedelta(days=2),
                   store=remote)
    assert report.files == 4  # the spooled files: every instance of the study
    assert _keys(endpoint, f"{prefix}/") == []


def test_a_failed_upload_leaves_the_job_to_be_retried(
    node: InProcessNode, tmp_path: Path
) -> None:
    from botocore.config import Config

    job_id, _ = _new_job(node, tmp_path / "study", seed=62)
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{get_port()}",
                          config=Config(retries={"max_attempts": 1}, connect_timeout=2))
    down = dataclasses.replace(node.ctx, store=S3Store(f"s3://{BUCKET}/down", client=client))
    with pytest.raises(StorageError):
        pipeline.run_qc(down, job_id)
    # The job has not moved on: QC runs again (the retry) once the store is back.
    again = dataclasses.replace(node.ctx, store=SpoolStore(node.ctx.spool))
    assert pipeline.run_qc(again, job_id) is not None


def test_the_settings_choose_the_store(tmp_path: Path, endpoint: str) -> None:
    spool = Spool(tmp_path / "spool", tmp_path / "incoming")
    assert isinstance(open_store(Settings(data_dir=tmp_path), spool), SpoolStore)
    store = open_store(Settings(data_dir=tmp_path, storage_url=f"s3://{BUCKET}/p",
                                s3_endpoint_url=endpoint), spool)
    assert isinstance(store, S3Store) and store.remote and store.name == f"s3://{BUCKET}/p"
    assert store.cache_dir == tmp_path.resolve() / "fetch"


# ---------------------------------------------------------------------------------------
# Through the whole node: two hosts, one object store
# ---------------------------------------------------------------------------------------
def _role(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = open(log, "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "node.cli", *args], env=env,
                            stdout=handle, stderr=subprocess.STDOUT)


@pytest.mark.slow
@pytest.mark.orthanc
@pytest.mark.postgres
@pytest.mark.redis
def test_a_gpu_host_without_the_spool_analyses_through_the_object_store(
    endpoint: str, orthanc: Orthanc, tmp_path: Path
) -> None:
    """The listener host runs the listener, the scheduler and a CPU worker (QC, report,
    export) on its spool; the "GPU host" runs a worker of the inference queue with a data
    folder of its own, sharing only the database, the broker and the object store. A study
    sent with DCMTK comes back as an SR in Orthanc, its images analysed by the GPU host."""
    require_tools("dcmsend", "Orthanc")
    database = create_postgres()
    broker = "redis://127.0.0.1:6379/11"
    redis.Redis.from_url(broker).flushdb()
    prefix = f"node-{get_port()}"
    shared = {**{k: v for k, v in os.environ.items() if not k.startswith("SONONODE_")},
              "SONONODE_DATABASE_URL": database, "SONONODE_BROKER_URL": broker,
              "SONONODE_STORAGE_URL": f"s3://{BUCKET}/{prefix}",
              "SONONODE_S3_ENDPOINT_URL": endpoint, "SONONODE_WORKER_CONCURRENCY": "1",
              "SONONODE_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"}
    dicom_port = get_port()
    listener_host = {**shared, "SONONODE_DATA_DIR": str(tmp_path / "listener-host"),
                     "SONONODE_DICOM_HOST": "127.0.0.1", "SONONODE_DICOM_PORT": str(dicom_port),
                     "SONONODE_DESTINATIONS": orthanc.destination,
                     "SONONODE_STUDY_STABLE_SECONDS": "1",
                     "SONONODE_SCHEDULER_INTERVAL_SECONDS": "0.3"}
    gpu_host = {**shared, "SONONODE_DATA_DIR": str(tmp_path / "gpu-host")}
    logs = {name: tmp_path / f"{name}.log" for name in ("listener", "scheduler", "cpu", "gpu")}
    processes = [
        _role(["listener"], listener_host, logs["listener"]),
        _role(["scheduler"], listener_host, logs["scheduler"]),
        _role(["worker", "--queues", "cpu"], listener_host, logs["cpu"]),
        _role(["worker", "--queues", "gpu"], gpu_host, logs["gpu"]),
    ]
    try:
        db = open_database(database)

        def both_workers() -> bool:
            with db.session() as session:
                queues = {w.queues for w in heartbeats.live_workers(session)}
            return {"cpu", "gpu"} <= queues

        wait_for(lambda: port_open(dicom_port) and both_workers(), timeout=180,
                 what="the listener and both workers")
        simulate_study(tmp_path / "study", seed=63, vendor="Aurora Imaging", n_images=2,
                       n_loops=1, frames_per_loop=8)
        files = sorted((tmp_path / "study").glob("*.dcm"))
        study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        dcmsend(dicom_port, files)
        (sr,) = wait_for(lambda: orthanc.find_instances(study_uid, modality="SR"),
                         timeout=180, what="the SR in Orthanc")
        assert sr
        gpu_log = logs["gpu"].read_text()
        assert "sononode.infer" in gpu_log and "succeeded" in gpu_log
        assert "sononode.qc" in logs["cpu"].read_text()
        assert "uploaded 3 instance(s)" in logs["cpu"].read_text()
        # The GPU host never had the images on its disk: only the store held them.
        assert not list((tmp_path / "gpu-host").glob("spool/**/*.dcm"))
        assert len(_keys(endpoint, f"{prefix}/")) == 3
        with db.session() as session:
            job = session.scalars(select(Job).where(Job.study_instance_uid == study_uid)).one()
            assert job.state in (JobState.REPORTED, JobState.DONE)
            result = job.result or {}
        analysed = [im for im in result.get("images", []) if im.get("view")]
        assert len(analysed) == 3
        db.dispose()
    finally:
        terminate(processes)
        drop_postgres(database)


def test_a_worker_that_cannot_open_the_store_cannot_analyse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """boto3 missing where SONONODE_STORAGE_URL is s3://: the worker says so in its
    heartbeat (and so /ready), instead of failing every study."""
    from workers.heartbeat import capability

    settings = Settings(data_dir=tmp_path, storage_url=f"s3://{BUCKET}/p", device="cpu")
    assert capability(settings, ["gpu"]).can_analyse
    monkeypatch.setitem(sys.modules, "boto3", None)
    verdict = capability(settings, ["gpu"])
    assert not verdict.can_analyse
    assert verdict.problem is not None and "pip install 'sononode[s3]'" in verdict.problem

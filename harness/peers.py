"""Real peers for tests and benchmarks: free ports, an Orthanc PACS, the node as processes.

Every wait here is a readiness poll with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

T = TypeVar("T")


def get_port() -> int:
    """A free TCP port on the loopback interface (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], T | None], *, timeout: float, interval: float = 0.2,
             what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # peers refuse connections until they are up
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what} (last error: {last_error})")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


@dataclass
class Orthanc:
    """An Orthanc PACS started for a test."""

    aet: str
    dicom_port: int
    http_port: int
    process: subprocess.Popen[bytes] | None
    config_path: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def destination(self) -> str:
        return f"{self.aet}@127.0.0.1:{self.dicom_port}"

    def get(self, path: str) -> Any:
        response = httpx.get(self.url + path, timeout=10)
        response.raise_for_status()
        return response.json()

    def find_instances(self, study_uid: str,
                       modality: str | None = None) -> list[dict[str, Any]]:
        """Instances of a study in Orthanc (``modality`` filters series, e.g. ``SR``)."""
        query: dict[str, str] = {"StudyInstanceUID": study_uid}
        if modality:
            query["Modality"] = modality
        response = httpx.post(
            self.url + "/tools/find",
            json={"Level": "Instance", "Query": query, "Expand": True},
            timeout=10,
        )
        response.raise_for_status()
        return list(response.json())

    def download(self, orthanc_id: str, target: Path) -> Path:
        response = httpx.get(f"{self.url}/instances/{orthanc_id}/file", timeout=30)
        response.raise_for_status()
        target.write_bytes(response.content)
        return target

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            ["Orthanc", str(self.config_path)], stdout=log, stderr=subprocess.STDOUT
        )
        wait_for(lambda: self._alive() and port_open(self.dicom_port), timeout=60,
                 what="Orthanc")

    def _alive(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"Orthanc exited: {self.log_path.read_text()[-2000:]}")
        return httpx.get(self.url + "/system", timeout=2).status_code == 200

    def stop(self) -> None:
        if self.process is not None:
            terminate([self.process], timeout=20)
        self.process = None


def make_orthanc(workdir: Path, *, aet: str = "ORTHANC",
                 extra: dict[str, Any] | None = None) -> Orthanc:
    """Write an Orthanc configuration on free ports under ``workdir`` (not started);
    ``extra`` adds or overrides configuration keys (e.g. ``DicomTlsEnabled``)."""
    if shutil.which("Orthanc") is None:
        raise RuntimeError("Orthanc is not installed (apt-get install orthanc)")
    workdir.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = get_port(), get_port()
    config = {
        "Name": "sononode-test-pacs",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "storage"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "DicomCheckCalledAet": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpServerEnabled": True,
        "DicomServerEnabled": True,
        "Plugins": [],
        "StableAge": 1,
        "DicomAlwaysAllowStore": True,
        "UnknownSopClassAccepted": True,
        **(extra or {}),
    }
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    return Orthanc(aet, dicom_port, http_port, None, config_path, workdir / "orthanc.log")


@contextmanager
def running_orthanc(workdir: Path) -> Iterator[Orthanc]:
    orthanc = make_orthanc(workdir)
    orthanc.start()
    try:
        yield orthanc
    finally:
        orthanc.stop()


class Prometheus:
    """A Prometheus server started for a test; its HTTP API."""

    def __init__(self, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.process = process
        self.log = log

    def api(self, path: str, **params: str) -> Any:
        if self.process.poll() is not None:
            raise RuntimeError(f"prometheus exited: {self.log.read_text()[-3000:]}")
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = response.json()
        if body["status"] != "success":
            raise AssertionError(f"Prometheus {path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector."""
        result: list[dict[str, Any]] = self.api("query", query=expr)["result"]
        return result

    def stop(self) -> None:
        terminate([self.process])


@contextmanager
def running_prometheus(workdir: Path, config: dict[str, Any], *,
                       timeout: float = 120) -> Iterator[Prometheus]:
    """Debian's ``prometheus`` with ``config`` (a prometheus.yml as a mapping) on a free
    port, its storage under ``workdir``; ready when yielded, stopped afterwards."""
    import yaml

    if shutil.which("prometheus") is None:
        raise RuntimeError("Prometheus is not installed (apt-get install prometheus)")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = get_port()
    log = workdir / "prometheus.log"
    with open(log, "ab") as sink:
        process = subprocess.Popen(
            ["prometheus", f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=sink, stderr=subprocess.STDOUT)
    server = Prometheus(port, process, log)
    try:
        def ready() -> bool:
            if process.poll() is not None:  # the timeout's message shows the log
                raise RuntimeError(f"prometheus exited: {log.read_text()[-3000:]}")
            return httpx.get(f"{server.url}/-/ready", timeout=2).status_code == 200

        wait_for(ready, timeout=timeout, what="Prometheus ready")
        yield server
    finally:
        server.stop()


@dataclass
class Node:
    """``sononode up`` running as a subprocess for a test."""

    data_dir: Path
    dicom_port: int
    http_port: int
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def headers(self) -> dict[str, str]:
        """The admin token the node generated in its data directory (no token configured)."""
        token = self.env.get("SONONODE_API_TOKENS", "")
        if token:
            token = next(t.split(":", 1)[1] for t in token.split(",") if t.startswith("admin:"))
        else:
            token = (self.data_dir / "api-token").read_text().strip()
        return {"Authorization": f"Bearer {token}"}

    def get(self, path: str) -> Any:
        """GET ``path`` of the API as an admin; the JSON body."""
        response = httpx.get(self.url + path, headers=self.headers, timeout=10)
        response.raise_for_status()
        return response.json()

    def get_text(self, path: str) -> str:
        """GET ``path`` of the API as an admin; the text body (``/metrics``)."""
        response = httpx.get(self.url + path, headers=self.headers, timeout=10)
        response.raise_for_status()
        return response.text

    def post(self, path: str) -> httpx.Response:
        """POST to ``path`` of the API as an admin."""
        return httpx.post(self.url + path, headers=self.headers, timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def role_pids(self, role: str) -> list[int]:
        """The process ids of the node's children running ``role`` (``listener``: one per
        listener process)."""
        out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(self.process.pid)],
                             capture_output=True, text=True, check=False).stdout
        return [int(line.split()[0]) for line in out.splitlines()
                if f"node.cli {role}" in line]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=45)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_node(data_dir: Path, *, destinations: str = "", extra_env: dict[str, str] | None = None,
               timeout: float = 120, wait_ready: bool = True) -> Node:
    """Start ``sononode up`` on free ports and wait until ``/ready`` answers 200 (with
    ``wait_ready=False``: until the API and the listener answer, ready or not)."""
    dicom_port, http_port = get_port(), get_port()
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(
        {
            "SONONODE_DATA_DIR": str(data_dir),
            "SONONODE_DICOM_PORT": str(dicom_port),
            "SONONODE_DICOM_HOST": "127.0.0.1",
            "SONONODE_HTTP_PORT": str(http_port),
            "SONONODE_DESTINATIONS": destinations,
            "SONONODE_STUDY_STABLE_SECONDS": "2",
            "SONONODE_SCHEDULER_INTERVAL_SECONDS": "0.3",
            "SONONODE_WORKER_CONCURRENCY": "1",
            "SONONODE_EXPORT_RETRY_BACKOFF_SECONDS": "1",
            "SONONODE_EXPORT_RETRY_BACKOFF_MAX_SECONDS": "4",
            "SONONODE_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra_env or {})
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"{data_dir.name}-node.log"
    log = open(log_path, "ab")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "up"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    node = Node(data_dir, dicom_port, http_port, env, process, log_path)

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"node exited:\n{node.log()[-4000:]}")
        path = "/ready" if wait_ready else "/health"
        ok = httpx.get(node.url + path, timeout=2).status_code == 200
        return ok and port_open(dicom_port) and (not wait_ready or "ready." in node.log())

    try:
        wait_for(ready, timeout=timeout, what="sononode up")
    except Exception:
        node.stop()
        raise
    return node


def dcmtk(tool: str) -> str:
    """Path of a DCMTK command-line tool. pynetdicom installs Python apps of the same names
    (``echoscu``, ``storescu``) that may come first on the PATH: they are not DCMTK."""
    for folder in ("/usr/bin", "/bin", "/usr/local/bin"):
        candidate = Path(folder) / tool
        if candidate.is_file():
            return str(candidate)
    return tool


def dcmsend(port: int, files: list[Path], *, aet: str = "SONONODE", check: bool = True
            ) -> subprocess.CompletedProcess[str]:
    """Send files with DCMTK's dcmsend, proposing each file's own transfer syntax."""
    result = subprocess.run(
        [dcmtk("dcmsend"), "-aec", aet, "-aet", "MODALITY", "127.0.0.1", str(port),
         *[str(f) for f in files]],
        capture_output=True, text=True, timeout=300,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"dcmsend failed ({result.returncode}): {result.stderr}")
    return result


def terminate(processes: list[subprocess.Popen[bytes]], *, timeout: float = 30) -> None:
    """SIGTERM every process, then wait for each (killed after ``timeout`` seconds)."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)

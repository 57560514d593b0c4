"""``sononode up``: the whole node on one machine, as supervised child processes.

Starts the embedded broker when no broker URL is configured, then the listener, the
API, the scheduler and one Celery worker consuming both queues, each as its own
``sononode <role>`` process (the same commands the compose deployment runs), and
restarts a child that dies. SIGINT/SIGTERM stop everything in order.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from node.broker import die_with_parent, embedded_broker_socket, start_embedded_redis
from node.config import Settings
from node.db import open_database

logger = logging.getLogger(__name__)

ROLES: tuple[tuple[str, ...], ...] = (
    ("listener",),
    ("api",),
    ("scheduler",),
    ("worker", "--queues", "cpu,gpu"),
)
#: A child restarted more often than this within RESTART_WINDOW brings the node down.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0


@dataclass
class Child:
    args: tuple[str, ...]
    process: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.args[0]


def _spawn(child: Child, env: dict[str, str]) -> None:
    child.process = subprocess.Popen(
        [sys.executable, "-m", "node.cli", *child.args], env=env,
        preexec_fn=die_with_parent,
    )
    logger.info("started %s (pid %d)", child.name, child.process.pid)


def run_up(settings: Settings) -> int:
    """Run the node until interrupted. Returns the exit code."""
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    # Counters start from zero with a new node: files of an earlier run's processes go.
    for stale in settings.metrics_dir.glob("*.db"):
        stale.unlink(missing_ok=True)
    env = dict(os.environ)
    env["SONONODE_DATA_DIR"] = str(data_dir)

    # Create the schema once before the children race to do it.
    open_database(settings.effective_database_url, data_dir).dispose()

    stopping = False

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        logger.info("signal %d: stopping the node", signum)
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    broker = None
    if not settings.broker_url:
        socket_path = embedded_broker_socket(settings)
        broker = start_embedded_redis(socket_path, data_dir)
        env["SONONODE_BROKER_URL"] = f"redis+socket://{socket_path}"

    children = [Child(args) for args in ROLES]
    for child in children:
        _spawn(child, env)
    logger.info(
        "sononode up: DICOM %s@%s:%d, HTTP http://%s:%d, data %s",
        settings.ae_title, settings.dicom_host, settings.dicom_port, settings.http_host,
        settings.http_port, data_dir,
    )
    code = 0
    try:
        while not stopping:
            time.sleep(0.5)
            for child in children:
                assert child.process is not None
                status = child.process.poll()
                if status is None or stopping:
                    continue
                now = time.monotonic()
                child.restarts = [t for t in child.restarts if now - t < RESTART_WINDOW]
                if len(child.restarts) >= MAX_RESTARTS:
                    logger.error("%s keeps dying (exit %s); stopping the node", child.name,
                                 status)
                    stopping = True
                    code = 1
                    break
                logger.error("%s exited with %s; restarting", child.name, status)
                child.restarts.append(now)
                _spawn(child, env)
    finally:
        for child in reversed(children):
            if child.process and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for child in reversed(children):
            if child.process is None:
                continue
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in time; killing it", child.name)
                child.process.kill()
        if broker is not None:
            broker.terminate()
            try:
                broker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                broker.kill()
        logger.info("sononode stopped")
    return code

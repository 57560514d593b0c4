"""``sononode up``: the whole node on one machine, as supervised child processes.

Starts the embedded broker when no broker URL is configured, then the listener
(``SONONODE_LISTENER_PROCESSES`` of them on the one port), the API, the scheduler and one
Celery worker consuming both queues, each as its own
``sononode <role>`` process (the same commands the compose deployment runs), and
restarts a child that dies, with a backoff that doubles (up to :data:`MAX_BACKOFF`) while
it keeps dying and resets once it has run for :data:`STABLE_AFTER` seconds. One failing
role never stops the others: modalities keep sending to the listener while, say, the
database-bound API waits for its database. At start it waits up to
:data:`DATABASE_WAIT` seconds for the database. SIGINT/SIGTERM stop everything in order.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from sqlalchemy.exc import OperationalError

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
#: First delay before restarting a role that died; doubles while it keeps dying.
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 60.0
#: A role that ran this long before dying is restarted after FIRST_BACKOFF again.
STABLE_AFTER = 60.0
#: How long ``sononode up`` waits for the database at start.
DATABASE_WAIT = 120.0


@dataclass
class Child:
    args: tuple[str, ...]
    label: str = ""
    """Its name in the logs (the role, numbered where it runs several times)."""
    env: dict[str, str] = field(default_factory=dict)
    """Settings of this child only, over the node's."""
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = FIRST_BACKOFF
    restart_at: float | None = None
    """When a dead child is due to be started again."""
    deaths: int = 0

    @property
    def name(self) -> str:
        return self.label or self.args[0]

    def died(self, now: float) -> float:
        """Schedule the restart of a child that exited; the delay chosen."""
        if now - self.started >= STABLE_AFTER:
            self.backoff = FIRST_BACKOFF
        delay = self.backoff
        self.backoff = min(self.backoff * 2, MAX_BACKOFF)
        self.restart_at = now + delay
        self.deaths += 1
        return delay


def make_children(settings: Settings) -> list[Child]:
    """One child per role; ``SONONODE_LISTENER_PROCESSES`` listeners, each receiving into
    its own folder (``SONONODE_LISTENER_NAME`` numbered)."""
    children = []
    for args in ROLES:
        if args[0] == "listener" and settings.listener_process_count > 1:
            base = settings.listener_name or socket.gethostname()
            children += [Child(args, label=f"listener-{i}",
                               env={"SONONODE_LISTENER_NAME": f"{base}-{i}"})
                         for i in range(1, settings.listener_process_count + 1)]
        else:
            children.append(Child(args))
    return children


def _spawn(child: Child, env: dict[str, str]) -> None:
    child.process = subprocess.Popen(
        [sys.executable, "-m", "node.cli", *child.args], env={**env, **child.env},
        preexec_fn=die_with_parent,
    )
    child.started = time.monotonic()
    child.restart_at = None
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

    # Create the schema once before the children race to do it, waiting for the database.
    try:
        open_database(settings.effective_database_url, data_dir,
                      wait_seconds=DATABASE_WAIT).dispose()
    except OperationalError as exc:
        logger.error("the database is not reachable after %.0f s: %s", DATABASE_WAIT,
                     type(exc).__name__)
        return 1

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

    children = make_children(settings)
    for child in children:
        _spawn(child, env)
    logger.info(
        "sononode up: DICOM %s@%s:%d, HTTP http://%s:%d, data %s",
        settings.ae_title, settings.dicom_host, settings.dicom_port, settings.http_host,
        settings.http_port, data_dir,
    )
    try:
        while not stopping:
            time.sleep(0.2)
            now = time.monotonic()
            for child in children:
                assert child.process is not None
                if stopping:
                    break
                if child.restart_at is not None:
                    if now >= child.restart_at:
                        _spawn(child, env)
                    continue
                status = child.process.poll()
                if status is None:
                    continue
                delay = child.died(now)
                logger.error("%s exited with %s (death %d); restarting in %.0f s", child.name,
                             status, child.deaths, delay)
            if broker is not None and broker.poll() is not None and not stopping:
                # Its append-only file keeps the queued messages across the restart.
                logger.error("embedded broker exited with %s; restarting it", broker.returncode)
                broker = start_embedded_redis(embedded_broker_socket(settings), data_dir)
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
    return 0

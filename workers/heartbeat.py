"""The worker's heartbeat: alive, with its pool processes, its queues and its ability to
analyse (written by the main process of each Celery worker, see :mod:`node.heartbeats`)."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from node import heartbeats
from node.broker import Queue
from node.config import Settings
from node.db import Database
from workers.models.manifest import PackError, read_manifest, verify_files

logger = logging.getLogger(__name__)


def worker_name(main_pid: int | None = None) -> str:
    """``host:pid`` of a worker's main process (the parent of its pool processes)."""
    return f"{socket.gethostname()}:{main_pid if main_pid is not None else os.getpid()}"


@dataclass(frozen=True)
class Capability:
    """Whether this worker can analyse studies, and with what."""

    can_analyse: bool
    device: str | None = None
    packs: list[dict[str, Any]] = field(default_factory=list)
    problem: str | None = None


def capability(settings: Settings, queues: Sequence[str]) -> Capability:
    """What a worker consuming ``queues`` can do with ``settings``: a usable device, the
    instance store opens, and at least one model pack whose files verify. A worker of the
    ``cpu`` queue that can analyse gets the inference of a host without a GPU worker
    (:func:`node.heartbeats.inference_route`)."""
    from workers.models.packs import resolve_device  # torch: only to probe the device

    try:
        device = str(resolve_device(settings.device))
    except ValueError as exc:
        return Capability(False, problem=f"SONONODE_DEVICE={settings.device}: {exc}")
    if settings.storage_url:
        # The store's reachability is not judged here (an outage is retried per task);
        # a store this worker cannot open at all (boto3 missing) is a setup problem.
        from node.storage import S3Store, StorageError

        try:
            S3Store(settings.storage_url, endpoint_url=settings.s3_endpoint_url)
        except StorageError as exc:
            return Capability(False, device=device, problem=str(exc))
    packs, problems = [], []
    for path in settings.effective_model_packs:
        try:
            manifest = read_manifest(path)
            verify_files(path, manifest)
        except PackError as exc:
            problems.append(str(exc))
            continue
        packs.append({"name": manifest.name, "version": manifest.version,
                      "sha256": manifest.sha256})
    if not packs:
        return Capability(False, device=device,
                          problem="; ".join(problems) or "no model pack configured")
    return Capability(True, device=device, packs=packs,
                      problem="; ".join(problems) or None)


class Heartbeat:
    """Beats every :data:`node.heartbeats.HEARTBEAT_SECONDS` from a daemon thread."""

    def __init__(self, db: Database, settings: Settings, queues: Sequence[str],
                 pool_pids: Any) -> None:
        self.db = db
        self.name = worker_name()
        self.queues = list(queues)
        self.pool_pids = pool_pids
        self.capability = capability(settings, queues)
        if not self.capability.can_analyse and Queue.GPU.value in queues:
            logger.error("this worker cannot analyse: %s", self.capability.problem)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._beat()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        try:
            with self.db.session() as session:
                heartbeats.forget(session, self.name)
        except Exception:
            logger.warning("could not remove the heartbeat of %s", self.name)

    def _beat(self) -> None:
        try:
            with self.db.session() as session:
                heartbeats.beat(session, self.name, queues=self.queues,
                                pool_pids=list(self.pool_pids()),
                                can_analyse=self.capability.can_analyse,
                                device=self.capability.device, packs=self.capability.packs,
                                problem=self.capability.problem)
        except Exception:
            # The database may be briefly away; the next beat tries again.
            logger.warning("heartbeat of %s not recorded", self.name, exc_info=True)

    def _run(self) -> None:
        while not self._stop.wait(heartbeats.HEARTBEAT_SECONDS):
            self._beat()

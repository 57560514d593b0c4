"""Is the node ready to analyse? One assessment for ``/ready``, the dashboard and the
``sononode_readiness_check`` / ``sononode_ready`` gauges."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from node.broker import ping
from node.db import Database, WorkerHeartbeat
from node.heartbeats import live_workers

OK = "ok"


@dataclass(frozen=True)
class Assessment:
    """Each check's outcome (``"ok"`` or ``"error: <why>"``) and the live workers."""

    checks: dict[str, str]
    workers: list[WorkerHeartbeat] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return all(v == OK for v in self.checks.values())


def spool_writable(spool: Path) -> str:
    """``"ok"`` when a file can be written in the spool (a full or read-only disk cannot)."""
    try:
        spool.mkdir(parents=True, exist_ok=True)
        # A name of its own: /ready and a scrape may probe at once in one process.
        with tempfile.NamedTemporaryFile(dir=spool, prefix=".ready-") as probe:
            probe.write(b"ok")
            probe.flush()
        return OK
    except OSError as exc:
        return f"error: {exc}"


def assess(db: Database, *, redis_url: str | None, spool: Path | None) -> Assessment:
    """Database reachable, broker reachable (when ``redis_url`` is given), a live worker able
    to analyse (its device and model packs usable), spool writable (when ``spool`` is given)."""
    checks: dict[str, str] = {}
    workers: list[WorkerHeartbeat] = []
    try:
        db.ping()
        checks["database"] = OK
    except Exception as exc:
        checks["database"] = f"error: {exc}"
    if redis_url:
        try:
            ping(redis_url)
            checks["broker"] = OK
        except Exception as exc:
            checks["broker"] = f"error: {exc}"
    try:
        with db.session() as session:
            workers = live_workers(session)
        if any(w.can_analyse for w in workers):
            checks["analysis"] = OK
        else:
            problems = sorted({f"{w.name}: {w.problem}" for w in workers if w.problem})
            checks["analysis"] = "error: no live worker can analyse" + (
                f" ({'; '.join(problems)})" if problems else " (no worker is running)")
    except Exception as exc:
        checks["analysis"] = f"error: {type(exc).__name__}"
    if spool is not None:
        checks["spool"] = spool_writable(spool)
    return Assessment(checks, workers)

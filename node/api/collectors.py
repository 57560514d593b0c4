"""Prometheus collectors of the API: every node process's metrics, and gauges of the index."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from node import feedback
from node.broker import Queue, queue_depths
from node.db import Database, Export, ExportState, Study, StudyState
from node.drift import drift_metric_families
from node.readiness import OK, assess

logger = logging.getLogger(__name__)


class NodeCollector(Collector):
    """Gauges computed at scrape time from the index, the heartbeats and the broker.

    Besides studies and exports by state and the queue depths, it says what ``/ready``
    says, from the same assessment (:func:`node.readiness.assess`):
    ``sononode_workers_alive{queue}``,
    ``sononode_workers_can_analyse``, ``sononode_readiness_check{check}`` and
    ``sononode_ready``. Without ``spool_dir`` the spool is not probed.
    Each family is present at every scrape, with 0 where nothing is alive, so an alert
    on ``== 0`` fires; a failing index or broker makes the checks 0, not absent.
    """

    def __init__(self, db: Database, redis_url: str | None, *,
                 spool_dir: Path | None = None) -> None:
        self.db = db
        self.redis_url = redis_url
        self.spool_dir = spool_dir

    def collect(self) -> Iterator[Metric]:
        assessment = assess(self.db, redis_url=self.redis_url, spool=self.spool_dir)
        checks = {name: outcome == OK for name, outcome in assessment.checks.items()}
        workers = assessment.workers
        counts: dict[StudyState, int] = {}
        export_counts: dict[ExportState, int] = {}
        verdicts: list[tuple[str, str, str, str, int]] = []
        if checks["database"]:
            try:
                with self.db.session() as session:
                    counts = dict(session.execute(
                        select(Study.state, func.count()).group_by(Study.state)).all())
                    export_counts = dict(session.execute(
                        select(Export.state, func.count()).group_by(Export.state)).all())
                    verdicts = feedback.counts(session)
            except Exception:
                logger.exception("metrics: index unavailable")
                checks["database"] = False
        if checks["database"]:
            studies = GaugeMetricFamily("sononode_studies", "Studies in the index by state.",
                                        labels=["state"])
            exports = GaugeMetricFamily("sononode_exports", "Exports in the index by state.",
                                        labels=["state"])
            for state in StudyState:
                studies.add_metric([state.value], float(counts.get(state, 0)))
            for export_state in ExportState:
                exports.add_metric([export_state.value],
                                   float(export_counts.get(export_state, 0)))
            yield studies
            yield exports
            yield self._feedback(verdicts)
        alive = GaugeMetricFamily(
            "sononode_workers_alive",
            "Celery workers whose heartbeat is recent, by queue they consume.",
            labels=["queue"])
        for queue in Queue:
            alive.add_metric([queue.value], float(sum(
                1 for w in workers if queue.value in w.queues.split(","))))
        yield alive
        yield GaugeMetricFamily(
            "sononode_workers_can_analyse",
            "Live workers able to run inference (device and model packs usable).",
            value=float(sum(1 for w in workers if w.can_analyse)))
        if self.redis_url and checks["broker"]:
            depth = GaugeMetricFamily("sononode_queue_depth",
                                      "Messages waiting in each Celery queue.",
                                      labels=["queue"])
            try:
                for queue, count in queue_depths(self.redis_url).items():
                    depth.add_metric([queue.value], float(count))
                yield depth
            except Exception:
                logger.warning("metrics: broker unavailable for queue depth")
        readiness = GaugeMetricFamily(
            "sononode_readiness_check",
            "1 for each readiness check of /ready that passes, 0 for one that fails.",
            labels=["check"])
        for name, ok in sorted(checks.items()):
            readiness.add_metric([name], float(ok))
        yield readiness
        yield GaugeMetricFamily(
            "sononode_ready",
            "1 while the node is ready to analyse (what /ready says), else 0.",
            value=float(all(checks.values())))
        try:
            yield from drift_metric_families(self.db)
        except Exception:
            logger.exception("metrics: drift computation failed")

    @staticmethod
    def _feedback(verdicts: list[tuple[str, str, str, str, int]]) -> CounterMetricFamily:
        """Readers' verdicts, counted from the index (exact across restarts); agreement is
        ``verdict="agree"`` over all of a model, head and vendor."""
        family = CounterMetricFamily(
            "sononode_feedback", "Readers' verdicts on AI results by model pack, head, "
            "vendor and verdict (agree, disagree, corrected).",
            labels=["model", "task", "vendor", "verdict"])
        for model, task, vendor, verdict, count in verdicts:
            family.add_metric([model, task, vendor, verdict], float(count))
        return family


class SharedMetricsCollector(Collector):
    """prometheus-client multiprocess files of every node process under ``root``.

    ``sononode up`` puts all its processes in ``root``; the compose deployment gives
    each container its own sub-folder (process ids repeat across containers), and this
    merges them all, as ``MultiProcessCollector`` does for one folder.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def collect(self) -> Iterator[Metric]:
        files = sorted(str(p) for p in self.root.glob("**/*.db"))
        return iter(MultiProcessCollector.merge(files, accumulate=True))  # type: ignore[no-untyped-call]

"""Prometheus collectors of the API: every node process's metrics, and gauges of the index."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from node.broker import queue_depths
from node.db import Database, Export, ExportState, Study, StudyState
from node.drift import drift_metric_families

logger = logging.getLogger(__name__)


class NodeCollector(Collector):
    """Gauges computed at scrape time from the index and the broker."""

    def __init__(self, db: Database, redis_url: str | None) -> None:
        self.db = db
        self.redis_url = redis_url

    def collect(self) -> Iterator[Metric]:
        studies = GaugeMetricFamily("sononode_studies", "Studies in the index by state.",
                                    labels=["state"])
        exports = GaugeMetricFamily("sononode_exports", "Exports in the index by state.",
                                    labels=["state"])
        try:
            with self.db.session() as session:
                counts = dict(session.execute(
                    select(Study.state, func.count()).group_by(Study.state)).all())
                export_counts = dict(session.execute(
                    select(Export.state, func.count()).group_by(Export.state)).all())
            for state in StudyState:
                studies.add_metric([state.value], float(counts.get(state, 0)))
            for export_state in ExportState:
                exports.add_metric([export_state.value],
                                   float(export_counts.get(export_state, 0)))
            yield studies
            yield exports
        except Exception:
            logger.exception("metrics: index unavailable")
        if self.redis_url:
            depth = GaugeMetricFamily("sononode_queue_depth",
                                      "Messages waiting in each Celery queue.", labels=["queue"])
            try:
                for queue, count in queue_depths(self.redis_url).items():
                    depth.add_metric([queue.value], float(count))
                yield depth
            except Exception:
                logger.warning("metrics: broker unavailable for queue depth")
        try:
            yield from drift_metric_families(self.db)
        except Exception:
            logger.exception("metrics: drift computation failed")


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

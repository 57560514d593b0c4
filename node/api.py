"""The node's HTTP API: health, readiness, studies, exports, models and Prometheus metrics."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from node.config import Settings
from node.db import Database, Export, ExportState, Instance, Job, Study, StudyState, utcnow
from node.scheduler import Dispatcher

logger = logging.getLogger(__name__)

#: Celery queues whose depth is exported.
QUEUES = ("cpu", "gpu")


def _iso(value: Any) -> str | None:
    return value.isoformat() + "Z" if value is not None else None


class NodeCollector(Collector):
    """Gauges computed at scrape time from the index and the broker."""

    def __init__(self, db: Database, redis_url: str | None) -> None:
        self.db = db
        self.redis_url = redis_url

    def collect(self) -> Iterator[GaugeMetricFamily]:
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
                studies.add_metric([state.value], float(counts.get(state.value, 0)))
            for export_state in ExportState:
                exports.add_metric([export_state.value],
                                   float(export_counts.get(export_state.value, 0)))
            yield studies
            yield exports
        except Exception:
            logger.exception("metrics: index unavailable")
        depth = GaugeMetricFamily("sononode_queue_depth", "Messages waiting in each Celery queue.",
                                  labels=["queue"])
        if self.redis_url:
            try:
                import redis

                client = redis.Redis.from_url(self.redis_url, socket_timeout=2)
                for queue in QUEUES:
                    depth.add_metric([queue], float(client.llen(queue)))
                yield depth
            except Exception:
                logger.warning("metrics: broker unavailable for queue depth")
        from node.drift import drift_metric_families

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

    def collect(self) -> Iterator[Any]:
        from prometheus_client.multiprocess import MultiProcessCollector

        files = sorted(str(p) for p in self.root.glob("**/*.db"))
        return iter(MultiProcessCollector.merge(files, accumulate=True))


def _study_summary(study: Study, instance_count: int) -> dict[str, Any]:
    return {
        "study_instance_uid": study.study_instance_uid,
        "state": study.state,
        "instances": instance_count,
        "revision": study.revision,
        "accession_number": study.accession_number,
        "study_date": study.study_date,
        "first_received_at": _iso(study.first_received_at),
        "last_received_at": _iso(study.last_received_at),
    }


def _export_json(export: Export) -> dict[str, Any]:
    return {
        "id": export.id,
        "job_id": export.job_id,
        "study_instance_uid": export.study_instance_uid,
        "destination": export.destination,
        "state": export.state,
        "attempts": export.attempts,
        "last_error": export.last_error,
        "updated_at": _iso(export.updated_at),
        "sent_at": _iso(export.sent_at),
    }


def read_manifest(path: Path) -> dict[str, Any]:
    """A pack's manifest without loading its weights (for ``/models``)."""
    manifest_path = path / "manifest.json"
    with open(manifest_path, encoding="utf-8") as handle:
        data: dict[str, Any] = json.load(handle)
    return data


def create_app(
    settings: Settings,
    db: Database,
    *,
    dispatcher: Dispatcher | None = None,
    redis_url: str | None = None,
) -> FastAPI:
    """Build the API for ``settings`` over ``db``."""
    app = FastAPI(
        title="sononode",
        version="0.1.0",
        description="Hospital AI node for ultrasound: studies, results, exports, models, metrics.",
    )

    def get_dispatcher() -> Dispatcher:
        if dispatcher is not None:
            return dispatcher
        from node.scheduler import celery_dispatcher

        return celery_dispatcher()

    @app.get("/health", tags=["operations"])
    def health() -> dict[str, str]:
        """Liveness: the API process answers."""
        return {"status": "ok"}

    @app.get("/ready", tags=["operations"])
    def ready() -> Response:
        """Readiness: database, broker and spool reachable."""
        checks: dict[str, str] = {}
        try:
            db.ping()
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"error: {exc}"
        if redis_url:
            try:
                import redis

                redis.Redis.from_url(redis_url, socket_timeout=2).ping()
                checks["broker"] = "ok"
            except Exception as exc:
                checks["broker"] = f"error: {exc}"
        try:
            settings.spool_dir.mkdir(parents=True, exist_ok=True)
            probe = settings.spool_dir / f".ready-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
            checks["spool"] = "ok"
        except OSError as exc:
            checks["spool"] = f"error: {exc}"
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["operations"])
    def metrics() -> Response:
        """Prometheus metrics of every node process plus index and broker gauges."""
        registry = CollectorRegistry()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry.register(SharedMetricsCollector(settings.metrics_dir))
        else:
            from prometheus_client import REGISTRY

            for collector in list(REGISTRY._collector_to_names):
                registry.register(collector)
        registry.register(NodeCollector(db, redis_url))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/studies", tags=["studies"])
    def list_studies(
        state: StudyState | None = None,
        limit: int = Query(default=100, ge=1, le=1000),
        offset: int = Query(default=0, ge=0),
    ) -> dict[str, Any]:
        """Studies, most recent first, optionally filtered by state."""
        with db.session() as session:
            query = select(Study).order_by(Study.last_received_at.desc())
            if state is not None:
                query = query.where(Study.state == state.value)
            studies = session.scalars(query.offset(offset).limit(limit)).all()
            counts = dict(session.execute(
                select(Instance.study_instance_uid, func.count())
                .where(Instance.study_instance_uid.in_([s.study_instance_uid for s in studies]))
                .group_by(Instance.study_instance_uid)).all())
            return {
                "studies": [_study_summary(s, counts.get(s.study_instance_uid, 0))
                            for s in studies],
                "limit": limit,
                "offset": offset,
            }

    @app.get("/studies/{study_uid}", tags=["studies"])
    def get_study(study_uid: str) -> dict[str, Any]:
        """One study: state, instances, jobs with QC and results, exports."""
        with db.session() as session:
            study = session.get(Study, study_uid)
            if study is None:
                raise HTTPException(status_code=404, detail=f"study {study_uid} not found")
            instances = session.scalars(
                select(Instance).where(Instance.study_instance_uid == study_uid)
                .order_by(Instance.received_at)).all()
            body = _study_summary(study, len(instances))
            body["ai_series_instance_uid"] = study.sr_series_instance_uid
            body["instances"] = [
                {
                    "sop_instance_uid": i.sop_instance_uid,
                    "sop_class_uid": i.sop_class_uid,
                    "series_instance_uid": i.series_instance_uid,
                    "modality": i.modality,
                    "manufacturer": i.manufacturer,
                    "manufacturer_model_name": i.manufacturer_model_name,
                    "number_of_frames": i.number_of_frames,
                    "transfer_syntax_uid": i.transfer_syntax_uid,
                    "received_at": _iso(i.received_at),
                }
                for i in instances
            ]
            body["vendors"] = sorted({i.manufacturer or "unknown" for i in instances})
            body["jobs"] = [
                {
                    "id": job.id,
                    "revision": job.revision,
                    "state": job.state,
                    "attempts": job.attempts,
                    "error": job.error,
                    "created_at": _iso(job.created_at),
                    "updated_at": _iso(job.updated_at),
                    "stage_seconds": job.stage_seconds,
                    "qc": job.qc,
                    "result": job.result,
                    "sr_sop_instance_uid": job.sr_sop_instance_uid,
                    "exports": [_export_json(e) for e in job.exports],
                }
                for job in study.jobs
            ]
            latest = study.jobs[-1] if study.jobs else None
            body["result"] = latest.result if latest else None
            body["needs_review"] = (
                bool(latest.result.get("needs_review")) if latest and latest.result else None
            )
            return body

    @app.get("/exports", tags=["exports"])
    def list_exports(
        state: ExportState | None = None,
        limit: int = Query(default=100, ge=1, le=1000),
    ) -> dict[str, Any]:
        """Exports, newest first; ``state=dead`` lists the dead letters."""
        with db.session() as session:
            query = select(Export).order_by(Export.id.desc()).limit(limit)
            if state is not None:
                query = query.where(Export.state == state.value)
            return {"exports": [_export_json(e) for e in session.scalars(query).all()]}

    @app.post("/exports/{export_id}/replay", tags=["exports"], status_code=202)
    def replay_export(export_id: int) -> dict[str, Any]:
        """Send a dead-lettered (or failed) export again."""
        with db.session() as session:
            export = session.get(Export, export_id)
            if export is None:
                raise HTTPException(status_code=404, detail=f"export {export_id} not found")
            if export.state != ExportState.DEAD:
                raise HTTPException(
                    status_code=409,
                    detail=f"export {export_id} is {export.state}; only dead letters are replayed",
                )
            export.state = ExportState.PENDING
            export.attempts = 0
            export.updated_at = utcnow()
            job = session.get(Job, export.job_id)
            if job is not None and job.state == "done":
                job.state = "reported"
            body = _export_json(export)
        try:
            get_dispatcher().export(export_id)
        except Exception as exc:
            logger.exception("replay of export %d could not be dispatched", export_id)
            raise HTTPException(status_code=503, detail=f"broker unavailable: {exc}") from exc
        logger.info("export %d replayed", export_id)
        return body

    @app.get("/drift", tags=["models"])
    def drift() -> dict[str, Any]:
        """Drift of inputs and outputs by vendor (PSI, recent vs reference window)."""
        from node.drift import compute_drift

        return {"vendors": compute_drift(db), "threshold_hint": 0.2}

    @app.get("/models", tags=["models"])
    def models() -> dict[str, Any]:
        """The model packs this node runs: identity, tasks, calibration, metrics, provenance."""
        packs = []
        for path in settings.effective_model_packs:
            try:
                manifest = read_manifest(Path(path))
            except (OSError, ValueError) as exc:
                packs.append({"path": str(path), "error": str(exc)})
                continue
            manifest.pop("ood_stats", None)
            packs.append({"path": str(path), **manifest})
        return {"models": packs}

    return app

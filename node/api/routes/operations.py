"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from node.api.collectors import NodeCollector, SharedMetricsCollector
from node.api.deps import ContextDep
from node.api.schemas import Health, Readiness
from node.readiness import assess

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=Health)
def health() -> Health:
    """Liveness: the API process answers."""
    return Health()


@router.get("/ready", response_model=Readiness,
            responses={503: {"model": Readiness, "description": "Not ready"}})
def ready(context: ContextDep) -> Response:
    """Readiness: database, broker and spool reachable, and a live worker able to analyse
    (its device and model packs usable)."""
    assessment = assess(context.db, redis_url=context.redis_url,
                        spool=context.settings.spool_dir)
    body = Readiness(ready=assessment.ready, checks=assessment.checks)
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}},
                             "description": "Prometheus text exposition format"},
                       401: {"description": "No valid API token"}})
def metrics(context: ContextDep, request: Request) -> Response:
    """Prometheus metrics of every node process plus index and broker gauges (a token is
    needed unless SONONODE_METRICS_OPEN)."""
    if not context.settings.metrics_open:
        credentials = request.headers.get("authorization", "")
        scheme, _, token = credentials.partition(" ")
        if scheme.lower() != "bearer" or context.auth.principal(token.strip()) is None:
            raise HTTPException(status_code=401, detail="a valid API token is required "
                                "(or SONONODE_METRICS_OPEN=true)",
                                headers={"WWW-Authenticate": "Bearer"})
    registry = CollectorRegistry()
    if context.multiprocess_metrics:
        registry.register(SharedMetricsCollector(context.settings.metrics_dir))
    else:
        for collector in list(REGISTRY._collector_to_names):
            registry.register(collector)
    registry.register(NodeCollector(context.db, context.redis_url,
                                    spool_dir=context.settings.spool_dir))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

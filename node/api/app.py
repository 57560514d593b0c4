"""The composition of the API: collaborators on ``app.state``, one router per resource."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI

from node.api.deps import ApiContext, ModelCatalogue
from node.api.routes import drift, exports, models, operations, studies
from node.config import Settings
from node.db import Database
from node.scheduler import Dispatcher


def _no_models() -> Sequence[dict[str, Any]]:
    return []


def create_app(
    settings: Settings,
    db: Database,
    *,
    dispatcher: Dispatcher | None = None,
    redis_url: str | None = None,
    models_catalogue: ModelCatalogue = _no_models,
    multiprocess_metrics: bool = False,
) -> FastAPI:
    """Build the API for ``settings`` over ``db``.

    Parameters
    ----------
    dispatcher
        How replays reach the workers (``None``: replays answer 503).
    redis_url
        The broker, for readiness and queue depth (``None``: not checked).
    models_catalogue
        Describes the configured model packs for ``/models``.
    multiprocess_metrics
        ``/metrics`` aggregates prometheus-client's multiprocess files of every node
        process under ``settings.metrics_dir`` (else this process's registry).
    """
    app = FastAPI(
        title="sononode",
        version="0.1.0",
        description="Hospital AI node for ultrasound: studies, results, exports, models, metrics.",
    )
    app.state.node = ApiContext(settings=settings, db=db, dispatcher=dispatcher,
                                redis_url=redis_url, models=models_catalogue,
                                multiprocess_metrics=multiprocess_metrics)
    for module in (operations, studies, exports, models, drift):
        app.include_router(module.router)
    return app

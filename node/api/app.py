"""The composition of the API: collaborators on ``app.state``, one router per resource."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request, Response

from node.api.deps import ApiContext, ModelCatalogue
from node.api.routes import audit, drift, exports, models, operations, studies
from node.audit import Action, record
from node.auth import Authenticator
from node.config import Settings
from node.db import Database
from node.scheduler import Dispatcher

logger = logging.getLogger(__name__)


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
    authenticator: Authenticator | None = None,
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
    authenticator
        Who may call (default: ``SONONODE_API_TOKENS``, else the admin token generated in
        the data directory).
    """
    auth = authenticator or Authenticator.from_settings(
        settings.api_tokens.get_secret_value(), settings.data_dir,
        development=settings.environment == "development")
    app = FastAPI(
        title="sononode",
        version="0.1.0",
        description="Hospital AI node for ultrasound: studies, results, exports, models, metrics.",
    )
    app.state.node = ApiContext(settings=settings, db=db, dispatcher=dispatcher,
                                redis_url=redis_url, models=models_catalogue,
                                multiprocess_metrics=multiprocess_metrics, auth=auth)
    for module in (operations, studies, exports, models, drift, audit):
        app.include_router(module.router)

    @app.middleware("http")
    async def audit_requests(request: Request,
                             call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """Every authenticated request goes to the audit trail, with its outcome."""
        response = await call_next(request)
        principal = getattr(request.state, "principal", None)
        if principal is not None:
            route = request.scope.get("route")
            params = dict(request.path_params)
            client = request.client.host if request.client else "unknown"
            try:
                with db.session() as session:
                    record(session, f"api:{principal.role.value}:{principal.token_id}@{client}",
                           Action.API, study=params.get("study_uid"),
                           detail={"method": request.method,
                                   "route": getattr(route, "path", request.url.path),
                                   "params": params, "status": response.status_code})
            except Exception:
                logger.exception("audit of %s %s not recorded", request.method,
                                 request.url.path)
        return response

    return app

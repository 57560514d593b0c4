"""The composition of the API: collaborators on ``app.state``, one router per resource."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from importlib import metadata
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from node.api.deps import ApiContext, ModelCatalogue
from node.api.routes import (
    audit,
    dashboard,
    drift,
    exports,
    feedback,
    models,
    operations,
    pages,
    studies,
)
from node.audit import Action, record
from node.auth import Authenticator
from node.config import Settings
from node.db import Database
from node.scheduler import Dispatcher

logger = logging.getLogger(__name__)

#: Reads that monitoring repeats every few seconds and that carry no patient data: not
#: audited when they succeed (a dashboard left open would write thousands of rows a day);
#: refused ones are.
MONITORING_READS = frozenset({"/metrics", "/dashboard/data", "/drift", "/drift/{vendor}"})


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
    # Swagger UI from the files fastapi-offline ships, never from a CDN. No ReDoc: its
    # bundle loads its logo from cdn.redoc.ly whatever the options.
    app = FastAPIOffline(
        title="sononode",
        version=metadata.version("sononode"),
        description="Hospital AI node for ultrasound: studies, results, exports, models, metrics.",
        docs_url="/docs", redoc_url=None, static_url="/docs/static",
        favicon_url=f"{pages.STATIC_URL}/favicon.svg",
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.state.node = ApiContext(settings=settings, db=db, dispatcher=dispatcher,
                                redis_url=redis_url, models=models_catalogue,
                                multiprocess_metrics=multiprocess_metrics, auth=auth)
    for module in (operations, studies, exports, feedback, models, drift, audit, dashboard,
                   pages):
        app.include_router(module.router)
    app.include_router(dashboard.page_router)
    app.mount(pages.STATIC_URL, pages.static_files(), name="static")

    @app.exception_handler(StarletteHTTPException)
    async def http_errors(request: Request, exc: StarletteHTTPException) -> Response:
        """Starlette's 405 names only the methods of the first route whose path matches
        (``Allow: POST`` for a path that also takes DELETE): name those of all of them."""
        if exc.status_code == 405:
            allowed = sorted({method for route in app.routes if isinstance(route, Route)
                              and route.methods and route.matches(request.scope)[0] != Match.NONE
                              for method in route.methods})
            exc = StarletteHTTPException(405, exc.detail, headers={"Allow": ", ".join(allowed)})
        return await http_exception_handler(request, exc)

    @app.middleware("http")
    async def audit_requests(request: Request,
                             call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """Every authenticated request goes to the audit trail, with its outcome (but
        successful monitoring polls, :data:`MONITORING_READS`)."""
        response = await call_next(request)
        principal = getattr(request.state, "principal", None)
        route = request.scope.get("route")
        path = getattr(route, "path", request.url.path)
        polled = (request.method == "GET" and path in MONITORING_READS
                  and response.status_code < 400)
        if principal is not None and not polled:
            params = dict(request.path_params)
            client = request.client.host if request.client else "unknown"
            try:
                with db.session() as session:
                    record(session, f"api:{principal.role.value}:{principal.token_id}@{client}",
                           Action.API, study=params.get("study_uid"),
                           detail={"method": request.method,
                                   "route": path,
                                   "params": params, "status": response.status_code})
            except Exception:
                logger.exception("audit of %s %s not recorded", request.method,
                                 request.url.path)
        return response

    return app

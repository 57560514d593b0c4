"""What a route may ask for, declared once as annotated types (FastAPI dependencies).

The collaborators live on ``app.state.node`` (:class:`ApiContext`, set by
:func:`node.api.app.create_app`); tests override a dependency or build the app with fakes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from node import jobs
from node.auth import Authenticator, Principal, Role
from node.config import Settings
from node.db import Database
from node.scheduler import Dispatcher

ModelCatalogue = Callable[[], Sequence[dict[str, Any]]]
"""Describes the configured model packs: one manifest summary (or error) per pack folder."""


@dataclass(frozen=True)
class ApiContext:
    """The API's collaborators, built once by the composition root."""

    settings: Settings
    db: Database
    dispatcher: Dispatcher | None
    """``None``: this API cannot send work (replays answer 503)."""
    redis_url: str | None
    models: ModelCatalogue
    multiprocess_metrics: bool
    """Aggregate the prometheus-client multiprocess files of every node process."""
    auth: Authenticator


def get_context(request: Request) -> ApiContext:
    context: ApiContext = request.app.state.node
    return context


def get_settings(context: Annotated[ApiContext, Depends(get_context)]) -> Settings:
    return context.settings


def get_session(context: Annotated[ApiContext, Depends(get_context)]) -> Iterator[Session]:
    with context.db.session() as session:
        yield session


_bearer = HTTPBearer(auto_error=False, description="An API token (SONONODE_API_TOKENS).")


def get_principal(
    request: Request,
    context: Annotated[ApiContext, Depends(get_context)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller: 401 without a known bearer token."""
    principal = context.auth.principal(credentials.credentials) if credentials else None
    if principal is None:
        raise HTTPException(status_code=401, detail="a valid API token is required "
                            "(Authorization: Bearer <token>)",
                            headers={"WWW-Authenticate": "Bearer"})
    request.state.principal = principal
    return principal


def require_admin(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    """The caller, who must hold an admin token (403 for a reader)."""
    if not principal.may(Role.ADMIN):
        raise HTTPException(status_code=403, detail="this needs an admin token")
    return principal


#: Responses every authenticated route may give.
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "No valid API token"},
    403: {"description": "The token's role may not do this"},
}


ContextDep = Annotated[ApiContext, Depends(get_context)]
ReaderDep = Annotated[Principal, Depends(get_principal)]
AdminDep = Annotated[Principal, Depends(require_admin)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
#: ``scope="function"``: the session commits when the route function returns, before the
#: response is sent, so a 2xx means the change is durable, and the audit middleware's own
#: write never waits on a transaction that is still open (SQLite has one writer).
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def dispatcher_of(context: ApiContext) -> Dispatcher:
    """The context's dispatcher, or 503 for an API that cannot dispatch work."""
    if context.dispatcher is None:
        raise HTTPException(status_code=503, detail="this API cannot dispatch work")
    return context.dispatcher


@contextmanager
def job_errors() -> Iterator[None]:
    """The job lifecycle's refusals as HTTP errors: not found 404, conflict 409."""
    try:
        yield
    except jobs.NotFound as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from exc
    except jobs.Conflict as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from exc

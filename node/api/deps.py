"""What a route may ask for, declared once as annotated types (FastAPI dependencies).

The collaborators live on ``app.state.node`` (:class:`ApiContext`, set by
:func:`node.api.app.create_app`); tests override a dependency or build the app with fakes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.orm import Session

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


def get_context(request: Request) -> ApiContext:
    context: ApiContext = request.app.state.node
    return context


def get_settings(context: Annotated[ApiContext, Depends(get_context)]) -> Settings:
    return context.settings


def get_session(context: Annotated[ApiContext, Depends(get_context)]) -> Iterator[Session]:
    with context.db.session() as session:
        yield session


ContextDep = Annotated[ApiContext, Depends(get_context)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]

"""Exports of SRs to the destinations: listing, dead letters, replay."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query
from sqlalchemy import select

from node import jobs
from node.api.deps import (
    AUTH_RESPONSES,
    AdminDep,
    ContextDep,
    SessionDep,
    dispatcher_of,
    get_principal,
    job_errors,
)
from node.api.schemas import ExportList, ExportOut
from node.db import Export, ExportState

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/exports", tags=["exports"], dependencies=[Depends(get_principal)],
                   responses=AUTH_RESPONSES)

#: Export ids are 32-bit integers in PostgreSQL.
MAX_ID = 2**31 - 1


@router.get("", response_model=ExportList)
def list_exports(
    session: SessionDep,
    state: ExportState | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> ExportList:
    """Exports, newest first; ``state=dead`` lists the dead letters."""
    query = select(Export).order_by(Export.id.desc()).limit(limit)
    if state is not None:
        query = query.where(Export.state == state)
    return ExportList(exports=[ExportOut.of(e) for e in session.scalars(query).all()])


@router.post("/{export_id}/replay", status_code=202, response_model=ExportOut,
             responses={403: {"description": "Needs an admin token"},
                        404: {"description": "No such export"},
                        409: {"description": "Not a dead letter"},
                        503: {"description": "Broker unavailable"}})
def replay_export(export_id: Annotated[int, Path(ge=1, le=MAX_ID)], context: ContextDep,
                  session: SessionDep, admin: AdminDep) -> ExportOut:
    """Send a dead-lettered export again (admin)."""
    dispatcher = dispatcher_of(context)
    with job_errors():
        export = jobs.replay(session, export_id)
    body = ExportOut.of(export)
    session.commit()  # the row is pending before the task can run
    try:
        dispatcher.export(export_id)
    except Exception as exc:
        logger.exception("replay of export %d could not be dispatched", export_id)
        raise HTTPException(status_code=503, detail=f"broker unavailable: {exc}") from exc
    logger.info("export %d replayed", export_id)
    return body

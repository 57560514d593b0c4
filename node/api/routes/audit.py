"""The audit trail (admin)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from sqlalchemy import select

from node.api.deps import SessionDep, require_admin
from node.api.schemas import AuditEventOut, AuditList
from node.db import AuditEvent

router = APIRouter(prefix="/audit", tags=["audit"], dependencies=[Depends(require_admin)])


@router.get("", response_model=AuditList)
def list_audit(
    session: SessionDep,
    study: str | None = None,
    action: str | None = None,
    actor: str | None = Query(default=None, description="Prefix, e.g. 'dicom:' or 'api:'."),
    since: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> AuditList:
    """Audit events, newest first, filtered by study, action, actor prefix and time (admin)."""
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if study is not None:
        query = query.where(AuditEvent.study_instance_uid == study)
    if action is not None:
        query = query.where(AuditEvent.action == action)
    if actor is not None:
        query = query.where(AuditEvent.actor.startswith(actor, autoescape=True))
    if since is not None:
        query = query.where(AuditEvent.at >= since.replace(tzinfo=None))
    return AuditList(events=[AuditEventOut.model_validate(e) for e in session.scalars(query)])

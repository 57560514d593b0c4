"""The audit trail (admin)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from pydantic import BeforeValidator
from sqlalchemy import select

from node.api.deps import AUTH_RESPONSES, SessionDep, require_admin
from node.api.schemas import AuditEventOut, AuditList
from node.db import AuditEvent


def _iso_8601(value: object) -> object:
    # pydantic would take a bare number as a Unix time; the document says date-time.
    if not isinstance(value, str) or not re.match(r"\d{4}-\d{2}-\d{2}", value):
        raise ValueError("expected an ISO 8601 date-time, e.g. 2026-12-01T08:00:00Z")
    return value


IsoDateTime = Annotated[datetime, BeforeValidator(_iso_8601)]

router = APIRouter(prefix="/audit", tags=["audit"], dependencies=[Depends(require_admin)],
                   responses=AUTH_RESPONSES)


@router.get("", response_model=AuditList)
def list_audit(
    session: SessionDep,
    study: str | None = None,
    action: str | None = None,
    actor: str | None = Query(default=None, description="Prefix, e.g. 'dicom:' or 'api:'."),
    since: Annotated[IsoDateTime | None, Query(description="ISO 8601, UTC if no offset.")]
    = None,
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
        if since.tzinfo is not None:
            since = since.astimezone(UTC).replace(tzinfo=None)
        query = query.where(AuditEvent.at >= since)
    return AuditList(events=[AuditEventOut.model_validate(e) for e in session.scalars(query)])

"""The audit trail: who sent what from where, what was analysed with which model pack,
what was sent where, who read, replayed, re-analysed or corrected what, what was purged.

Rows are only ever added (:class:`node.db.AuditEvent`); an admin reads them at ``/audit``.
They hold identifiers (UIDs, AE titles, addresses, token ids, pack sha256), never pixel
data or patient names.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from sqlalchemy.orm import Session

from node.db import AuditEvent


class Action(StrEnum):
    """What an audit event records."""

    RECEIVED = "received"
    """An association ended: what it stored and refused (``dicom:`` actor)."""
    ANALYSED = "analysed"
    """A study was analysed, with which model packs (name, version, sha256)."""
    REPORTED = "reported"
    """An SR was written for a study."""
    EXPORTED = "exported"
    """An SR was delivered to a destination."""
    DEAD_LETTERED = "dead_lettered"
    """An export gave up."""
    API = "api"
    """An authenticated API request (method, route, status)."""
    PURGED = "purged"
    """Retention deleted a study's pixel data."""
    DRIFT_BASELINE = "drift_baseline"
    """A site drift baseline was frozen or cleared (which stream)."""
    REANALYSE = "reanalyse"
    """A re-analysis of a study was requested (why, by whom)."""
    FEEDBACK = "feedback"
    """A reader's verdict on an AI result (which SR, image and result; no free text)."""


def record(session: Session, actor: str, action: Action, *, study: str | None = None,
           detail: Mapping[str, Any] | None = None) -> None:
    """Append one event."""
    session.add(AuditEvent(actor=actor[:128], action=action.value, study_instance_uid=study,
                           detail=dict(detail or {})))

"""Studies: their state, instances, jobs, QC and results."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query
from sqlalchemy import func, select

from node.api.deps import AUTH_RESPONSES, SessionDep, get_principal
from node.api.schemas import StudyDetail, StudyList, StudySummary
from node.db import Instance, Study, StudyState

router = APIRouter(prefix="/studies", tags=["studies"], dependencies=[Depends(get_principal)],
                   responses=AUTH_RESPONSES)

#: Largest offset a listing accepts (beyond it SQLite's and PostgreSQL's integers overflow).
MAX_OFFSET = 2**31 - 1


@router.get("", response_model=StudyList)
def list_studies(
    session: SessionDep,
    state: StudyState | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> StudyList:
    """Studies, most recent first, optionally filtered by state."""
    query = select(Study).order_by(Study.last_received_at.desc())
    if state is not None:
        query = query.where(Study.state == state)
    studies = session.scalars(query.offset(offset).limit(limit)).all()
    counts = dict(session.execute(
        select(Instance.study_instance_uid, func.count())
        .where(Instance.study_instance_uid.in_([s.study_instance_uid for s in studies]))
        .group_by(Instance.study_instance_uid)).all())
    return StudyList(
        studies=[StudySummary.of(s, counts.get(s.study_instance_uid, 0)) for s in studies],
        limit=limit, offset=offset,
    )


@router.get("/{study_uid}", response_model=StudyDetail,
            responses={404: {"description": "No such study"}})
def get_study(study_uid: str, session: SessionDep) -> StudyDetail:
    """One study: state, instances, jobs with QC and results, exports."""
    study = session.get(Study, study_uid)
    if study is None:
        raise HTTPException(status_code=404, detail=f"study {study_uid} not found")
    instances = list(session.scalars(
        select(Instance).where(Instance.study_instance_uid == study_uid)
        .order_by(Instance.received_at)).all())
    return StudyDetail.of(study, instances)

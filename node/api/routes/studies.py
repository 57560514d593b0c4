"""Studies: their state, instances, jobs, QC and results."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query
from sqlalchemy import func, select

from node import audit, jobs
from node.api.deps import (
    AUTH_RESPONSES,
    AdminDep,
    ContextDep,
    SessionDep,
    dispatcher_of,
    get_principal,
    job_errors,
)
from node.api.schemas import (
    ReanalyseOut,
    ReanalyseRequest,
    StudyDetail,
    StudyList,
    StudySummary,
)
from node.db import Feedback, Instance, JobState, Study, StudyState

logger = logging.getLogger(__name__)

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
    """One study: state, instances, jobs with QC and results, exports, and readers'
    feedback on its results."""
    study = session.get(Study, study_uid)
    if study is None:
        raise HTTPException(status_code=404, detail=f"study {study_uid} not found")
    instances = list(session.scalars(
        select(Instance).where(Instance.study_instance_uid == study_uid)
        .order_by(Instance.received_at)).all())
    feedback = list(session.scalars(
        select(Feedback).where(Feedback.study_instance_uid == study_uid)
        .order_by(Feedback.id)).all())
    return StudyDetail.of(study, instances, feedback)


@router.post("/{study_uid}/reanalyse", status_code=202, response_model=ReanalyseOut,
             responses={400: {"description": "The body is not valid JSON"},
                        403: {"description": "Needs an admin token"},
                        404: {"description": "No such study"},
                        409: {"description": "Nothing to analyse, still receiving, or a job "
                              "is running"},
                        503: {"description": "This API cannot dispatch work"}})
def reanalyse(study_uid: str, context: ContextDep, session: SessionDep, admin: AdminDep,
              body: ReanalyseRequest | None = None) -> ReanalyseOut:
    """Analyse a study again (admin), failed or not: its new SR supersedes the latest one."""
    dispatcher = dispatcher_of(context)
    with job_errors():
        job = jobs.reanalyse(session, study_uid)
    audit.record(session, f"api:admin:{admin.token_id}", audit.Action.REANALYSE,
                 study=study_uid, detail={"job": job.id, "reason": body.reason if body else ""})
    job_id = job.id
    session.commit()  # the job exists before its task can run
    sent = True
    try:
        dispatcher.job(job_id, JobState.QUEUED)
        jobs.dispatched(session, job_id)
        session.commit()
    except Exception:
        logger.exception("re-analysis job %d could not be dispatched; the scheduler will",
                         job_id)
        sent = False
    return ReanalyseOut(study_instance_uid=study_uid, job_id=job_id, state=JobState.QUEUED,
                        dispatched=sent)

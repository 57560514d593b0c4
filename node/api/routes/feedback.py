"""Readers' verdicts on the AI's results: agree, disagree or corrected."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query
from sqlalchemy import select

from node import audit
from node import feedback as verdicts
from node.api.deps import AUTH_RESPONSES, AdminDep, ContextDep, SessionDep, get_principal
from node.api.schemas import FeedbackList, FeedbackOut, FeedbackRequest
from node.db import Feedback

router = APIRouter(prefix="/feedback", tags=["feedback"],
                   dependencies=[Depends(get_principal)], responses=AUTH_RESPONSES)


@router.post("", status_code=201, response_model=FeedbackOut,
             responses={400: {"description": "The body is not valid JSON"},
                        403: {"description": "Needs an admin token"},
                        404: {"description": "No such SR, image or result"},
                        422: {"description": "The verdict does not fit the result (a "
                              "correction without a label, a label the pack does not have)"}})
def give_feedback(body: FeedbackRequest, context: ContextDep, session: SessionDep,
                  admin: AdminDep) -> FeedbackOut:
    """Record a verdict on one result of one image of an SR (admin): the study's detail,
    the metrics and ``sononode feedback export`` show it."""
    actor = f"api:admin:{admin.token_id}"
    try:
        row = verdicts.record(session, verdicts.Verdict(
            sr_sop_instance_uid=body.sr_sop_instance_uid, tracking_uid=body.tracking_uid,
            item=body.item, verdict=body.verdict, corrected_label=body.corrected_label,
            comment=body.comment), actor=actor, catalogue=context.models())
    except verdicts.NoSuchResult as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from exc
    except verdicts.FeedbackError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from exc
    audit.record(session, actor, audit.Action.FEEDBACK, study=row.study_instance_uid,
                 detail={"feedback": row.id, "sr": row.sr_sop_instance_uid,
                         "image": row.sop_instance_uid, "item": row.item,
                         "verdict": row.verdict.value})
    return FeedbackOut.model_validate(row)


@router.get("", response_model=FeedbackList)
def list_feedback(
    session: SessionDep,
    study: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> FeedbackList:
    """Verdicts, newest first (of one study with ``study``)."""
    query = select(Feedback).order_by(Feedback.id.desc()).limit(limit)
    if study is not None:
        query = query.where(Feedback.study_instance_uid == study)
    return FeedbackList(feedback=[FeedbackOut.model_validate(f)
                                  for f in session.scalars(query).all()])

"""Drift of inputs and outputs by vendor, scanner and model pack (:mod:`node.drift`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query
from sqlalchemy import select

from node import audit
from node.api.deps import AUTH_RESPONSES, AdminDep, SessionDep, SettingsDep, get_principal
from node.api.schemas import BaselineRequest, DriftReport, DriftStreamOut, VendorDriftReport
from node.db import DriftStream
from node.drift import drift_report, vendor_report
from node.drift.monitor import BaselineError, clear_baseline, freeze_baseline
from node.drift.report import stream_json

VendorPath = Annotated[str, Path(min_length=1, max_length=64,
                                 description="Normalised vendor, as /drift lists it.")]

router = APIRouter(tags=["drift"], dependencies=[Depends(get_principal)],
                   responses=AUTH_RESPONSES)


@router.get("/drift", response_model=DriftReport)
def drift(session: SessionDep) -> DriftReport:
    """Every drift stream (vendor, scanner, model pack): status, reasons and signals."""
    return DriftReport.model_validate(drift_report(session))


@router.get("/drift/{vendor}", response_model=VendorDriftReport,
            responses={404: {"description": "No study of this vendor was analysed"}})
def drift_of_vendor(
    vendor: VendorPath,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=5000, description="Latest observations.")] = 500,
) -> VendorDriftReport:
    """The streams of one vendor and the scores of their latest studies, oldest first."""
    report = vendor_report(session, vendor, limit=limit)
    if report is None:
        raise HTTPException(status_code=404, detail=f"no drift stream for vendor {vendor!r}")
    return VendorDriftReport.model_validate(report)


def _stream(session: SessionDep, vendor: str, scanner: str, model: str) -> DriftStream:
    stream = session.scalars(select(DriftStream).where(
        DriftStream.vendor == vendor, DriftStream.scanner == scanner,
        DriftStream.model == model).with_for_update()).first()
    if stream is None:
        raise HTTPException(status_code=404,
                            detail=f"no drift stream {vendor!r} / {scanner!r} / {model!r}")
    return stream


@router.post("/drift/{vendor}/baseline", response_model=DriftStreamOut,
             responses={400: {"description": "The body is not valid JSON"},
                        403: {"description": "Needs an admin token"},
                        404: {"description": "No such stream"},
                        409: {"description": "Too few studies for a baseline"}})
def freeze(vendor: VendorPath, body: BaselineRequest, session: SessionDep,
           settings: SettingsDep, admin: AdminDep) -> DriftStreamOut:
    """Freeze a site baseline from the stream's latest studies (admin): the stream is
    compared with it from now on instead of the pack's reference, its tests restarted."""
    stream = _stream(session, vendor, body.scanner, body.model)
    try:
        freeze_baseline(session, stream, studies=body.studies or settings.drift_baseline_studies)
    except BaselineError as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from exc
    audit.record(session, f"api:admin:{admin.token_id}", audit.Action.DRIFT_BASELINE,
                 detail={"vendor": stream.vendor, "scanner": stream.scanner,
                         "model": stream.model, "action": "frozen"})
    session.flush()
    return DriftStreamOut.model_validate(stream_json(stream))


@router.delete("/drift/{vendor}/baseline", response_model=DriftStreamOut,
               responses={403: {"description": "Needs an admin token"},
                          404: {"description": "No such stream"}})
def clear(
    vendor: VendorPath,
    scanner: Annotated[str, Query(min_length=1, max_length=64)],
    model: Annotated[str, Query(min_length=1, max_length=160)],
    session: SessionDep,
    admin: AdminDep,
) -> DriftStreamOut:
    """Drop the stream's site baseline (admin): it is compared with the pack's reference
    again from its next study."""
    stream = _stream(session, vendor, scanner, model)
    clear_baseline(stream)
    audit.record(session, f"api:admin:{admin.token_id}", audit.Action.DRIFT_BASELINE,
                 detail={"vendor": stream.vendor, "scanner": stream.scanner,
                         "model": stream.model, "action": "cleared"})
    session.flush()
    return DriftStreamOut.model_validate(stream_json(stream))

"""Drift of inputs and outputs by vendor."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from node.api.deps import AUTH_RESPONSES, ContextDep, get_principal
from node.api.schemas import DriftReport, VendorDrift
from node.drift import PSI_ALERT, compute_drift

router = APIRouter(tags=["models"], dependencies=[Depends(get_principal)],
                   responses=AUTH_RESPONSES)


@router.get("/drift", response_model=DriftReport)
def drift(context: ContextDep) -> DriftReport:
    """Drift of inputs and outputs by vendor (PSI, recent vs reference window)."""
    vendors = [VendorDrift.model_validate(entry) for entry in compute_drift(context.db)]
    return DriftReport(vendors=vendors, threshold_hint=PSI_ALERT)

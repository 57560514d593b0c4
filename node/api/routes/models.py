"""The model packs this node runs."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from node.api.deps import AUTH_RESPONSES, ContextDep, get_principal
from node.api.schemas import ModelList

router = APIRouter(tags=["models"], dependencies=[Depends(get_principal)],
                   responses=AUTH_RESPONSES)


@router.get("/models", response_model=ModelList)
def models(context: ContextDep) -> ModelList:
    """The model packs this node runs: identity, tasks, calibration, metrics, provenance."""
    return ModelList(models=list(context.models()))

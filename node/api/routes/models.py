"""The model packs this node runs."""

from __future__ import annotations

from fastapi import APIRouter

from node.api.deps import ContextDep
from node.api.schemas import ModelList

router = APIRouter(tags=["models"])


@router.get("/models", response_model=ModelList)
def models(context: ContextDep) -> ModelList:
    """The model packs this node runs: identity, tasks, calibration, metrics, provenance."""
    return ModelList(models=list(context.models()))

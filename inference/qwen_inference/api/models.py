"""GET /v1/models: the served model."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from ..protocol import ModelCard, ModelList
from .common import require_key, server_state

router = APIRouter()


@router.get("/v1/models", dependencies=[Depends(require_key)], response_model=ModelList)
async def models(request: Request) -> ModelList:
    state = server_state(request)
    return ModelList(data=[ModelCard(id=state.settings.model_name,
                                     max_model_len=state.model.max_model_len if state.model else None)])

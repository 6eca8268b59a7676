"""GET /v1/models and /v1/models/{id}: the served model, in a shape both OpenAI's and Anthropic's clients read."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from ..protocol import ModelCard, ModelList
from .common import require_key, server_state

router = APIRouter()


def card(request: Request) -> ModelCard:
    state = server_state(request)
    name = state.settings.model_name
    return ModelCard(id=name, display_name=name, max_model_len=state.model.max_model_len if state.model else None)


@router.get("/v1/models", dependencies=[Depends(require_key)], response_model=ModelList)
async def models(request: Request) -> ModelList:
    served = card(request)
    return ModelList(data=[served], first_id=served.id, last_id=served.id)


@router.get("/v1/models/{model_id}", dependencies=[Depends(require_key)], response_model=ModelCard,
            responses={404: {"description": "no such model"}})
async def model(model_id: str, request: Request) -> ModelCard:
    request.app.state.chat.check_model(model_id)  # the 404 every generating route answers for another model
    return card(request)

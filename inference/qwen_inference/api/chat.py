"""POST /v1/chat/completions: OpenAI chat completions, streamed (SSE) or whole."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ..protocol import ChatCompletion, ChatCompletionRequest
from ..serving_chat import ChatService
from .common import json_body, read_json, require_key, require_ready

router = APIRouter()


def chat_service(request: Request) -> ChatService:
    return request.app.state.chat


@router.post("/v1/chat/completions", dependencies=[Depends(require_key)], response_model=ChatCompletion,
             openapi_extra=json_body(ChatCompletionRequest),
             responses={400: {"description": "invalid request"}, 401: {"description": "bad key"},
                        413: {"description": "body too large"}, 429: {"description": "queue full"},
                        503: {"description": "not ready"}})
async def chat_completions(request: Request) -> Response:
    req = await read_json(request, ChatCompletionRequest)
    require_ready(request)
    return await chat_service(request).complete(req, request)

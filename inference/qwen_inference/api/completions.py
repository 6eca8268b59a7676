"""POST /v1/completions: OpenAI's (legacy) text completions, streamed (SSE) or whole."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ..protocol import Completion, CompletionRequest
from ..serving_completions import CompletionService
from .common import json_body, read_json, require_key, require_ready

router = APIRouter()


def completion_service(request: Request) -> CompletionService:
    return request.app.state.completions


@router.post("/v1/completions", dependencies=[Depends(require_key)], response_model=Completion,
             openapi_extra=json_body(CompletionRequest),
             responses={400: {"description": "invalid request"}, 401: {"description": "bad key"},
                        413: {"description": "body too large"}, 429: {"description": "queue full"},
                        503: {"description": "not ready"}})
async def completions(request: Request) -> Response:
    req = await read_json(request, CompletionRequest)
    require_ready(request)
    return await completion_service(request).complete(req, request)

"""Anthropic's Messages API: POST /v1/messages (whole or streamed) and /v1/messages/count_tokens; errors in
Anthropic's shape (serving_messages.AnthropicErrors)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ..protocol import MessageObject, MessagesInput, MessagesRequest, MessageTokens
from ..serving_messages import MessagesService
from .common import json_body, read_json, require_key, require_ready

router = APIRouter()

ERRORS = {400: {"description": "invalid request"}, 401: {"description": "bad key"},
          404: {"description": "no such model"}, 413: {"description": "body too large"},
          503: {"description": "not ready"}}


def messages_service(request: Request) -> MessagesService:
    return request.app.state.messages


@router.post("/v1/messages", dependencies=[Depends(require_key)], response_model=MessageObject,
             openapi_extra=json_body(MessagesRequest), responses={**ERRORS, 429: {"description": "queue full"}})
async def create_message(request: Request) -> Response:
    req = await read_json(request, MessagesRequest)
    require_ready(request)
    return await messages_service(request).create(req, request)


@router.post("/v1/messages/count_tokens", dependencies=[Depends(require_key)], response_model=MessageTokens,
             openapi_extra=json_body(MessagesInput), responses=ERRORS)
async def count_tokens(request: Request) -> Response:
    req = await read_json(request, MessagesInput)
    require_ready(request)
    return messages_service(request).count(req)

"""The Responses API: POST /v1/responses (whole, streamed, or in the background), GET (or stream again) and
DELETE /v1/responses/{id}, cancelling a background response, a response's input items, and input tokens
counted."""

from __future__ import annotations

from typing import Callable, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from ..errors import bad_request
from ..protocol import (NO_OBFUSCATION, InputItemList, InputTokens, InputTokensRequest, ResponseDeleted,
                        ResponseObject, ResponsesRequest)
from ..serving_responses import ResponsesService
from .common import json_body, read_json, require_key, require_ready

router = APIRouter()

ERRORS = {400: {"description": "invalid request"}, 401: {"description": "bad key"},
          404: {"description": "no such response"}}


def responses_service(request: Request) -> ResponsesService:
    return request.app.state.responses


async def here_or_origin(request: Request, response_id: str, answer: Callable[[], Response]) -> Response:
    """The request answered by the replica that made the response, when that is another one (the response's id
    names it) and this one does not keep it; else `answer()`, here."""
    forwarded = await responses_service(request).forwarded(response_id, request)
    return forwarded if forwarded is not None else answer()


@router.post("/v1/responses", dependencies=[Depends(require_key)], response_model=ResponseObject,
             openapi_extra=json_body(ResponsesRequest),
             responses={**ERRORS, 413: {"description": "body too large"}, 429: {"description": "queue full"},
                        503: {"description": "not ready"}})
async def create_response(request: Request) -> Response:
    req = await read_json(request, ResponsesRequest)
    require_ready(request)
    return await responses_service(request).create(req, request)


@router.post("/v1/responses/input_tokens", dependencies=[Depends(require_key)], response_model=InputTokens,
             openapi_extra=json_body(InputTokensRequest), responses={**ERRORS, 503: {"description": "not ready"}})
async def count_input_tokens(request: Request) -> Response:
    req = await read_json(request, InputTokensRequest)
    require_ready(request)
    return await responses_service(request).count(req)


@router.get("/v1/responses/{response_id}/input_items", dependencies=[Depends(require_key)],
            response_model=InputItemList, responses=ERRORS)
async def list_input_items(response_id: str, request: Request, after: str | None = None,
                           limit: int = Query(20, ge=1, le=100), order: Literal["asc", "desc"] = "desc",
                           include: list[Literal["reasoning.encrypted_content"]] | None = Query(None)) -> Response:
    # include: items are listed as they were sent, encrypted reasoning with them
    service = responses_service(request)
    return await here_or_origin(request, response_id, lambda: service.input_items(response_id, after, limit, order))


@router.get("/v1/responses/{response_id}", dependencies=[Depends(require_key)], response_model=ResponseObject,
            responses=ERRORS)
async def get_response(response_id: str, request: Request, stream: bool = False,
                       starting_after: int | None = Query(None, ge=0), include_obfuscation: bool = False,
                       include: list[Literal["reasoning.encrypted_content", "message.output_text.logprobs"]] | None
                       = Query(None)) -> Response:
    # include: a response is kept with what its request included
    if include_obfuscation:
        raise bad_request(NO_OBFUSCATION, "include_obfuscation")
    service = responses_service(request)
    return await here_or_origin(request, response_id, lambda: service.get(response_id, stream, starting_after))


@router.post("/v1/responses/{response_id}/cancel", dependencies=[Depends(require_key)],
             response_model=ResponseObject, responses=ERRORS)
async def cancel_response(response_id: str, request: Request) -> Response:
    return await here_or_origin(request, response_id, lambda: responses_service(request).cancel(response_id))


@router.delete("/v1/responses/{response_id}", dependencies=[Depends(require_key)], response_model=ResponseDeleted,
               responses=ERRORS)
async def delete_response(response_id: str, request: Request) -> Response:
    return await here_or_origin(request, response_id, lambda: responses_service(request).delete(response_id))


@router.get("/internal/responses/{response_id}", include_in_schema=False)
async def internal_response(response_id: str, request: Request) -> Response:
    """A kept response, for another replica (signed with the key the replicas share; 404 for anyone else)."""
    return responses_service(request).internal(response_id, request)

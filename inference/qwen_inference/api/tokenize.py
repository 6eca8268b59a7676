"""POST /tokenize and /detokenize (vLLM's): text or chat messages to the model's token ids, and back."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from ..protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from ..serving_tokenize import TokenizeService
from .common import json_body, read_json, require_key, require_ready

router = APIRouter()

ERRORS = {400: {"description": "invalid request"}, 401: {"description": "bad key"},
          503: {"description": "not ready"}}


def tokenize_service(request: Request) -> TokenizeService:
    return request.app.state.tokenize


@router.post("/tokenize", dependencies=[Depends(require_key)], response_model=TokenizeResponse,
             openapi_extra=json_body(TokenizeRequest), responses=ERRORS)
async def tokenize(request: Request) -> TokenizeResponse:
    req = await read_json(request, TokenizeRequest)
    require_ready(request)
    return tokenize_service(request).tokenize(req)


@router.post("/detokenize", dependencies=[Depends(require_key)], response_model=DetokenizeResponse,
             openapi_extra=json_body(DetokenizeRequest), responses=ERRORS)
async def detokenize(request: Request) -> DetokenizeResponse:
    req = await read_json(request, DetokenizeRequest)
    require_ready(request)
    return tokenize_service(request).detokenize(req)

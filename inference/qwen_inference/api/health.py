"""Probes and scraping: GET /health (readiness), /livez (liveness), /metrics (Prometheus). Open unless
--no-auth-open-routes."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from .common import require_key_unless_open, server_state

router = APIRouter(dependencies=[Depends(require_key_unless_open)])


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    state = server_state(request)
    ok, reason = state.health()
    if ok:
        return JSONResponse({"status": "ok", "model": state.settings.model_name})
    return JSONResponse({"status": "loading" if state.status == "loading" else "unavailable", "reason": reason},
                        status_code=503)


@router.get("/livez")
async def livez() -> PlainTextResponse:
    return PlainTextResponse("ok")


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(server_state(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

"""The HTTP server: an app factory wiring settings, metrics, the model loader, error handling and the API
routers (qwen_inference/api/, one per API)."""

from __future__ import annotations

import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from . import __version__
from .api import ROUTERS
from .api.common import BODY_MODELS, validation_message
from .errors import APIError
from .protocol import error_body
from .serving import GrammarService
from .serving_chat import ChatService
from .serving_completions import CompletionService
from .serving_messages import AnthropicErrors, MessagesService, anthropic_error
from .serving_responses import ResponsesService
from .serving_tokenize import TokenizeService
from .settings import ServeSettings
from .state import ServerState

log = logging.getLogger("qwen_inference.server")
access_log = logging.getLogger("qwen_inference.access")

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class ObservabilityMiddleware:
    """Request ids, HTTP metrics by route template, and one JSON access-log line per request (with the
    prompt and the reply only under --log-prompts)."""

    def __init__(self, app, state: ServerState, routes: list) -> None:
        self.app, self.state = app, state
        # every route's template, matched here so that an unknown path or method is labelled "other"
        self.templates = [(r.path_regex, r.path, r.methods) for r in routes if hasattr(r, "path_regex")]

    def _endpoint(self, scope) -> str:
        path, method = scope["path"], scope["method"]
        for regex, template, methods in self.templates:
            if regex.match(path) and (not methods or method in methods):
                return template
        return "other"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        rid = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        st = scope.setdefault("state", {})
        st["request_id"] = rid
        status = {"code": 500}

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode())]
            await send(message)

        metrics = self.state.metrics
        metrics.active_connections.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            metrics.active_connections.dec()
            elapsed = time.perf_counter() - started
            endpoint = self._endpoint(scope)
            method = scope["method"]
            metrics.http_requests.labels(method, endpoint, str(status["code"])).inc()
            metrics.http_duration.labels(method, endpoint).observe(elapsed)
            if endpoint not in ("/metrics", "/health", "/livez"):
                access_log.info(
                    "request",
                    extra={
                        "request_id": rid,
                        "method": method,
                        "path": scope["path"],
                        "status": status["code"],
                        "input_tokens": st.get("input_tokens"),
                        "cached_tokens": st.get("cached_tokens"),
                        "output_tokens": st.get("output_tokens"),
                        "queue_time_ms": st.get("queue_time_ms"),
                        "inference_time_ms": st.get("inference_time_ms"),
                        "total_time_ms": round(elapsed * 1000, 1),
                        **({"error": st["stream_error"]} if st.get("stream_error") else {}),
                        **st.get("log_fields", {}),
                        **({"prompt": st["prompt"], "reply": st.get("reply")} if "prompt" in st else {}),
                    },
                )


def create_app(settings: ServeSettings | None = None, *, load: bool = True) -> FastAPI:
    settings = settings or ServeSettings()
    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if load:
            state.start_loading()
        yield
        state.stop()

    app = FastAPI(title="qwen-serve", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.qwen = state
    grammars = GrammarService(state)
    state.on_stop(grammars.shutdown)
    app.state.grammars = grammars
    app.state.chat = ChatService(state, grammars)
    app.state.completions = CompletionService(state, grammars)
    app.state.responses = ResponsesService(state, app.state.chat)
    app.state.messages = MessagesService(state, app.state.chat)
    app.state.tokenize = TokenizeService(state, app.state.chat)
    for router in ROUTERS:
        app.include_router(router)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        if exc.reason not in ("auth",):
            state.metrics.errors.labels(exc.reason).inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        state.metrics.errors.labels("validation").inc()
        message, param = validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param, None), status_code=400)

    @app.exception_handler(404)
    async def _not_found(request: Request, exc):
        return JSONResponse(error_body(f"no route {request.url.path}", "invalid_request_error", None, "not_found"),
                            status_code=404)

    @app.exception_handler(405)
    async def _not_allowed(request: Request, exc):
        return JSONResponse(error_body(f"method {request.method} is not allowed on {request.url.path}",
                                       "invalid_request_error", None, "method_not_allowed"), status_code=405)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error")
        state.metrics.errors.labels("internal").inc()
        if request.url.path.startswith(AnthropicErrors.PREFIX):  # answered outside AnthropicErrors: its shape here
            return JSONResponse(anthropic_error(500, "internal server error", request.state.request_id),
                                status_code=500)
        return JSONResponse(error_body("internal server error", "server_error", None, "internal_error"),
                            status_code=500)

    def openapi() -> dict[str, Any]:
        """The default schema, plus the bodies of routes that parse their body themselves (api/common.py)."""
        if app.openapi_schema:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, model in BODY_MODELS.items():
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[name] = body
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    routes = [r for r in app.router.routes if hasattr(r, "path_regex")] + [r for rt in ROUTERS for r in rt.routes]
    app.add_middleware(AnthropicErrors)
    app.add_middleware(ObservabilityMiddleware, state=state, routes=routes)
    return app

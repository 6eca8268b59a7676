"""The HTTP server: an app factory wiring settings, metrics, the model loader and the routes.

The model loads in a background thread after the server starts listening, so `/health` answers 503 with
the reason until the engine runs, and `/livez` answers at once.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import threading
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError
from starlette.routing import Match

from . import __version__
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, error_body
from .serving import APIError, ChatService, bad_request
from .settings import ServeSettings

log = logging.getLogger("qwen_inference.server")
access_log = logging.getLogger("qwen_inference.access")

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
MAX_BODY_BYTES = 4 * 1024 * 1024


class ServerState:
    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.metrics = ServerMetrics(settings.model_name)
        self.model = None
        self.status = "loading"
        self.reason = "the model is loading"
        self.shutting_down = False
        self.load_thread: threading.Thread | None = None
        self.api_keys = [k.encode() for k in settings.api_keys()]

    def health(self) -> tuple[bool, str]:
        if self.shutting_down:
            return False, "the server is shutting down"
        if self.status != "ready":
            return False, self.reason
        engine = self.model.engine
        if not engine.alive:
            return False, engine.fatal_error or "the generation loop is not running"
        return True, "ok"

    def load(self) -> None:
        """Load the model (the engine loop is started by the caller)."""
        from .loader import load

        started = time.monotonic()
        try:
            self.model = load(self.settings, metrics=self.metrics)
        except Exception as exc:  # noqa: BLE001: reported by /health and the log
            log.exception("loading the model failed")
            self.status, self.reason = "failed", f"loading the model failed: {exc}"
            return
        m = self.model
        self.metrics.info.labels(self.settings.model_name, m.dtype, m.device).set(1)
        self.metrics.on_cache_config(m.engine.block_size, m.engine.kv_capacity_tokens // m.engine.block_size,
                                     m.engine.prefix_caching)
        self.metrics.model_loaded.set(1)
        self.metrics.prefix_caching.set(1 if m.engine.prefix_caching else 0)
        self.status, self.reason = "ready", "ok"
        log.info("model ready", extra={"model": self.settings.model_name, "path": str(m.path), "dtype": m.dtype,
                                       "device": m.device, "max_model_len": m.max_model_len,
                                       "load_seconds": round(time.monotonic() - started, 2)})

    def start_loading(self) -> None:
        """One thread loads the model and then runs the engine loop: all model work stays on one thread."""

        def load_and_run() -> None:
            self.load()
            if self.model is not None:
                self.model.engine.run()

        self.load_thread = threading.Thread(target=load_and_run, name="qwen-engine", daemon=True)
        self.load_thread.start()

    def stop(self) -> None:
        self.shutting_down = True
        self.metrics.model_loaded.set(0)
        if self.model is not None:
            self.model.engine.stop()


class ObservabilityMiddleware:
    """Request ids, HTTP metrics by route template, and one JSON access-log line per request."""

    def __init__(self, app, state: ServerState, router) -> None:
        self.app, self.state, self.router = app, state, router

    def _endpoint(self, scope) -> str:
        for route in self.router.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return getattr(route, "path", "other")
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
                        "output_tokens": st.get("output_tokens"),
                        "queue_time_ms": st.get("queue_time_ms"),
                        "inference_time_ms": st.get("inference_time_ms"),
                        "total_time_ms": round(elapsed * 1000, 1),
                        **({"error": st["stream_error"]} if st.get("stream_error") else {}),
                    },
                )


def _validation_message(exc: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    return (f"{param}: {msg}" if param else msg), param


def create_app(settings: ServeSettings | None = None, *, load: bool = True) -> FastAPI:
    settings = settings or ServeSettings()
    state = ServerState(settings)
    service = ChatService(state)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if load:
            state.start_loading()
        yield
        state.stop()

    app = FastAPI(title="qwen-serve", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.qwen = state

    def require_key(request: Request) -> None:
        if not state.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        ok = False
        for key in state.api_keys:  # compare against every key, in constant time each
            ok |= hmac.compare_digest(given, key)
        if not ok:
            state.metrics.errors.labels("auth").inc()
            raise APIError(401, "Incorrect API key provided." if given else "Missing API key: send "
                           "`Authorization: Bearer <key>`.", "invalid_request_error", None, "invalid_api_key",
                           reason="auth")

    open_or_key = [] if settings.auth_open_routes else [Depends(require_key)]

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        if exc.reason not in ("auth",):
            state.metrics.errors.labels(exc.reason).inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        state.metrics.errors.labels("validation").inc()
        message, param = _validation_message(exc)
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
        return JSONResponse(error_body("internal server error", "server_error", None, "internal_error"),
                            status_code=500)

    def require_ready() -> None:
        ok, reason = state.health()
        if not ok:
            raise APIError(503, f"The model is not ready: {reason}", "service_unavailable", None, "model_not_ready",
                           reason="not_ready", headers={"Retry-After": "5"})

    def openapi() -> dict[str, Any]:
        """The default schema, plus the chat request body (the route parses its body itself, to turn every
        malformed body into a 400 in OpenAI's shape)."""
        if app.openapi_schema:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        body = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(body.pop("$defs", {}))
        components["ChatCompletionRequest"] = body
        schema["paths"]["/v1/chat/completions"]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}},
        }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)],
              responses={400: {"description": "invalid request"}, 401: {"description": "bad key"},
                         429: {"description": "queue full"}, 503: {"description": "not ready"}})
    async def chat_completions(request: Request):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", "invalid_request_error",
                           None, "request_too_large")
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > MAX_BODY_BYTES:
                raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes",
                               "invalid_request_error", None, "request_too_large")
        try:
            data = json.loads(bytes(body).decode("utf-8"))
        except UnicodeDecodeError:
            raise bad_request("the request body is not valid UTF-8") from None
        except RecursionError:
            raise bad_request("the request body is nested too deeply") from None
        except ValueError as exc:
            raise bad_request(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise bad_request("the request body must be a JSON object")
        try:
            req = ChatCompletionRequest.model_validate(data)
        except ValidationError as exc:
            message, param = _validation_message(exc)
            raise bad_request(message, param) from None
        except RecursionError:
            raise bad_request("the request body is nested too deeply") from None
        require_ready()
        return await service.complete(req, request)

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": settings.model_name, "object": "model", "created": 0, "owned_by": "qwen-operator",
                      "max_model_len": state.model.max_model_len if state.model else None}],
        }

    @app.get("/health", dependencies=open_or_key)
    async def health() -> JSONResponse:
        ok, reason = state.health()
        if ok:
            return JSONResponse({"status": "ok", "model": settings.model_name})
        return JSONResponse({"status": "loading" if state.status == "loading" else "unavailable",
                             "reason": reason}, status_code=503)

    @app.get("/livez", dependencies=open_or_key)
    async def livez() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.get("/metrics", dependencies=open_or_key)
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        page = resources.files("qwen_inference").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    app.add_middleware(ObservabilityMiddleware, state=state, router=app.router)
    return app

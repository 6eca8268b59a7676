"""What every route shares: the server state, the API-key and readiness checks, and reading a JSON body
(bounded, with every malformed body answered 400 in OpenAI's shape)."""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from ..errors import APIError, bad_request
from ..protocol import error_body, first_error

if TYPE_CHECKING:
    from ..state import ServerState

MAX_BODY_BYTES = 4 * 1024 * 1024
# After a 413, what is left of the body is read and thrown away, up to this much and this long, before the
# connection closes: a client that writes its whole body before reading (most do) then reads the 413 instead
# of a connection reset.
DRAIN_MAX_BYTES = 64 * 1024 * 1024
DRAIN_SECONDS = 10.0

Body = TypeVar("Body", bound=BaseModel)

# request models of the routes that read their body themselves, by name: create_app's OpenAPI schema
# publishes each (see json_body)
BODY_MODELS: dict[str, type[BaseModel]] = {}


def server_state(request: Request) -> ServerState:
    return request.app.state.qwen


# ---- dependencies -----------------------------------------------------------------------------------


def require_key(request: Request) -> None:
    """Refuse a request without a valid `Authorization: Bearer <key>` (or `x-api-key: <key>`, as Anthropic's
    clients send it) when the server has keys."""
    state = server_state(request)
    if not state.api_keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    given = token.strip().encode() if scheme.lower() == "bearer" else request.headers.get("x-api-key", "").encode()
    ok = False
    for key in state.api_keys:  # compare against every key, in constant time each
        ok |= hmac.compare_digest(given, key)
    if not ok:
        state.metrics.errors.labels("auth").inc()
        raise APIError(401, "Incorrect API key provided." if given else "Missing API key: send "
                       "`Authorization: Bearer <key>`.", "invalid_request_error", None, "invalid_api_key",
                       reason="auth")


def require_key_unless_open(request: Request) -> None:
    """For probes and scraping: open unless --no-auth-open-routes."""
    if not server_state(request).settings.auth_open_routes:
        require_key(request)


def require_ready(request: Request) -> None:
    ok, reason = server_state(request).health()
    if not ok:
        raise APIError(503, f"The model is not ready: {reason}", "service_unavailable", None, "model_not_ready",
                       reason="not_ready", headers={"Retry-After": "5"})


# ---- the request body -------------------------------------------------------------------------------


class BodyTooLarge(APIError):
    def __init__(self, rest_unread: bool) -> None:
        super().__init__(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", "invalid_request_error",
                         None, "request_too_large")
        self.rest_unread = rest_unread

    def response(self) -> JSONResponse:
        if not self.rest_unread:
            return super().response()
        return DrainingResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status,
                                headers={"Connection": "close"})


class DrainingResponse(JSONResponse):
    """Sends the whole answer, then reads and discards what is left of the request body (at most
    DRAIN_MAX_BYTES, for at most DRAIN_SECONDS) before the response ends and the connection closes."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": True})
        await drain(receive)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def drain(receive: Receive) -> int:
    """Read and discard the rest of a request body; returns the bytes read."""
    read = 0
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            while read <= DRAIN_MAX_BYTES:
                message = await receive()
                if message["type"] != "http.request":
                    break
                read += len(message.get("body", b""))
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        pass
    return read


async def read_body(request: Request) -> bytes:
    """The request body, at most MAX_BODY_BYTES (413 beyond)."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        raise BodyTooLarge(rest_unread=length.isdigit())
    body = bytearray()
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        body += message.get("body", b"")
        more = message.get("more_body", False)
        if len(body) > MAX_BODY_BYTES:
            raise BodyTooLarge(rest_unread=more)
        if not more:
            return bytes(body)


async def read_json(request: Request, model: type[Body]) -> Body:
    """The body as `model`; 413 when too large, 400 for anything that is not a valid instance."""
    raw = await read_body(request)
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise bad_request("the request body is not valid UTF-8") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply") from None
    except ValueError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise bad_request(message, param) from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply") from None


def validation_message(exc: Any) -> tuple[str, str | None]:
    """The error of a pydantic or FastAPI validation error to report (protocol.first_error), as (message,
    param)."""
    loc, msg = first_error(exc.errors())
    param = ".".join(loc) or None
    return (f"{param}: {msg}" if param else msg), param


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its body with `read_json(request, model)`: the schema shows the
    body although FastAPI does not parse it (the route does, to answer every malformed body in OpenAI's shape)."""
    BODY_MODELS[model.__name__] = model
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}

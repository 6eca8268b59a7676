"""Responses shared between the replicas of one deployment, with no store outside them.

A response is kept in the memory of the replica that made it. With `--peer-url` (this replica's address, as the
others reach it) and `--peer-key-file` (a key they all hold), its id names that replica, signed with the key:
`resp_<32 hex>_<the address in base32>_<signature>`. A replica asked about a response it does not hold reads the
address from the id and, only when the signature holds, asks that replica: for `previous_response_id` it fetches
the stored conversation (`GET /internal/responses/{id}`, itself signed), and `GET`, `DELETE`, `.../cancel` and
`.../input_items` go to the origin as they came. An id a client made up names no replica (its signature fails),
so no request ever leaves for an address a client chose.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import uuid
from typing import Any

import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from .errors import APIError

log = logging.getLogger("qwen_inference.serving")

PEER_HEADER = "x-qwen-peer"
INTERNAL = "/internal/responses/"
_MAC_CHARS = 32  # 128 bits of HMAC-SHA256, in hex
_FORWARDED_HEADERS = ("authorization", "x-api-key", "x-request-id", "content-type", "accept")


def _b32(text: str) -> str:
    return base64.b32encode(text.encode()).decode().rstrip("=").lower()


def _unb32(text: str) -> str | None:
    try:
        return base64.b32decode(text.upper() + "=" * (-len(text) % 8)).decode()
    except ValueError:  # not base32, or not UTF-8
        return None


class Peers:
    """This replica's address and the key it shares with the others."""

    def __init__(self, url: str, key: bytes, timeout: float = 30.0) -> None:
        self.url, self._key, self.timeout = url.rstrip("/"), key, timeout

    @classmethod
    def of(cls, settings) -> "Peers | None":
        if settings.peer_url is None:
            return None
        return cls(settings.peer_url, settings.peer_key())

    def _mac(self, kind: str, text: str) -> str:
        return hmac.new(self._key, f"{kind}|{text}".encode(), hashlib.sha256).hexdigest()[:_MAC_CHARS]

    # ---- ids -------------------------------------------------------------------------------------------
    def new_id(self) -> str:
        """A response id that names this replica."""
        hex_, where = uuid.uuid4().hex, _b32(self.url)
        return f"resp_{hex_}_{where}_{self._mac('id', f'{hex_}_{where}')}"

    def origin(self, rid: str) -> str | None:
        """The address of the replica that made response `rid`, when that is another replica and the id's signature
        holds; else None."""
        parts = rid.split("_")
        if len(parts) != 4 or parts[0] != "resp":
            return None
        _, hex_, where, mac = parts
        if not hmac.compare_digest(mac, self._mac("id", f"{hex_}_{where}")):
            return None
        url = _unb32(where)
        return url if url is not None and url != self.url else None

    # ---- between replicas ------------------------------------------------------------------------------
    def signed(self, rid: str) -> dict[str, str]:
        return {PEER_HEADER: self._mac("fetch", rid)}

    def check(self, rid: str, request: Request) -> None:
        """Refuse an internal request that another replica did not sign (404: the route is no client's)."""
        if not hmac.compare_digest(request.headers.get(PEER_HEADER, ""), self._mac("fetch", rid)):
            raise APIError(404, "Not Found", "invalid_request_error", None, "not_found", reason="not_found")

    def _unreachable(self, url: str, rid: str, exc: Exception, param: str | None) -> APIError:
        log.warning("a peer replica could not be reached", extra={"peer": url, "response_id": rid,
                                                                   "error": str(exc)})
        return APIError(502, f"Response {rid!r} is kept by the replica at {url}, which could not be reached: {exc}",
                        "api_error", param, "peer_unreachable", reason="peer")

    async def fetch(self, url: str, rid: str, param: str | None) -> dict[str, Any] | None:
        """The stored response `rid` from the replica at `url` (its body, its items), or None when it keeps none."""
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                r = await client.get(url + INTERNAL + rid, headers=self.signed(rid))
        except httpx.HTTPError as exc:
            raise self._unreachable(url, rid, exc, param) from None
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise self._unreachable(url, rid, RuntimeError(f"it answered {r.status_code}"), param)
        return r.json()

    async def forward(self, url: str, rid: str, request: Request) -> Response:
        """The request, as it came, answered by the replica at `url` (streamed back as it answers)."""
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED_HEADERS}
        client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout, read=None))
        try:
            query = f"?{request.url.query}" if request.url.query else ""  # as sent: repeated names kept
            upstream = await client.send(client.build_request(
                request.method, url + request.url.path + query, headers=headers, content=await request.body()),
                stream=True)
        except httpx.HTTPError as exc:
            await client.aclose()
            raise self._unreachable(url, rid, exc, None) from None

        async def body():
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                await upstream.aclose()
                await client.aclose()

        kept = {k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "retry-after")}
        return StreamingResponse(body(), status_code=upstream.status_code, headers=kept)

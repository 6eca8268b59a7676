"""Errors answered in OpenAI's shape, shared by every API."""

from __future__ import annotations

import re
from typing import Callable

from fastapi.responses import JSONResponse

from .protocol import error_body


class APIError(Exception):
    """An error answered in OpenAI's shape. `reason` labels it in qwen_request_errors_total."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                 reason: str = "validation", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.reason = reason
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status,
                            headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None, reason: str = "validation") -> APIError:
    return APIError(400, message, "invalid_request_error", param, code, reason)


def renaming(renames: list[tuple[re.Pattern[str], str]]) -> Callable[[APIError], APIError]:
    """For an API that runs on chat completions' path: its errors, with the fields named as that API names them
    (`renames`: patterns of chat's names and their replacements, applied in order)."""
    def rename(text: str | None) -> str | None:
        if text is None:
            return None
        for pattern, name in renames:
            text = pattern.sub(name, text)
        return text

    def renamed(exc: APIError) -> APIError:
        exc.message, exc.param = rename(exc.message), rename(exc.param)
        return exc

    return renamed

"""The HTTP API, one router per API, as vLLM lays out its entrypoints:

    protocol.py       the wire format (pydantic models of requests and responses)
    serving*.py       from a validated request to the engine and back: serving.py what the generating APIs
                      share, serving_chat.py, serving_completions.py, serving_tokenize.py
    api/<name>.py     one router per API: its routes, nothing else
    api/common.py     what routes share: API keys, readiness, reading a bounded JSON body

A new API adds its models to protocol.py, its serving module, and a router here, listed in ROUTERS.
"""

from __future__ import annotations

from . import chat, completions, health, models, page, tokenize

ROUTERS = (chat.router, completions.router, tokenize.router, models.router, health.router, page.router)

"""The HTTP API, one router per API, as vLLM lays out its entrypoints:

    protocol.py       the wire format (pydantic models of requests and responses)
    serving*.py       from a validated request to the engine and back: serving.py what the generating APIs
                      share, serving_chat.py, serving_responses.py and serving_messages.py (on chat's),
                      serving_completions.py, serving_tokenize.py
    api/<name>.py     one router per API: its routes, nothing else
    api/common.py     what routes share: API keys, readiness, reading a bounded JSON body

A new API adds its models to protocol.py, its serving module, and a router here, listed in ROUTERS.
"""

from __future__ import annotations

from . import chat, completions, health, messages, models, page, responses, tokenize

ROUTERS = (chat.router, responses.router, messages.router, completions.router, tokenize.router, models.router,
           health.router, page.router)

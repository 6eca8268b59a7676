"""Fixtures shared by the API tests."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["tiny", "tiny-qwen3.5"])
def srv(request):
    """The server on the tiny model, then on a model with Qwen3.5's real vocabulary."""
    return request.getfixturevalue("server" if request.param == "tiny" else "qwen35_server")

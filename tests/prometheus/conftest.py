from __future__ import annotations

import shutil

import pytest

pytestmark = pytest.mark.prometheus


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: `make test` installs Debian's prometheus package (scripts/system-deps)")
    return path

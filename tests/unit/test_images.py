"""The Dockerfiles, without a Docker engine: hadolint, and every name they rely on exists."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ["Dockerfile.inference", "Dockerfile.operator"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_is_clean(name):
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    r = subprocess.run([hadolint, "--no-color", str(ROOT / name)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def lines(name: str) -> list[str]:
    return [ln.strip() for ln in (ROOT / name).read_text().splitlines() if ln.strip() and not ln.startswith("#")]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copied_paths_entrypoints_and_extras_exist(name):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    text = (ROOT / name).read_text()
    for line in lines(name):
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src
    entry = re.search(r'ENTRYPOINT \["([^"]+)"\]', text).group(1)
    assert entry in project["scripts"]
    for extras in re.findall(r'pip install --no-cache-dir "\.\[([^\]]+)\]"', text):
        for extra in extras.split(","):
            assert extra in project["optional-dependencies"], extra
    user = re.search(r"^USER (\S+)", text, re.M).group(1)
    assert user.split(":")[0] == "1000"  # the uid the operator's pods run as


def test_inference_image_targets_port_and_healthcheck():
    from qwen_operator.builders import SERVER_PORT, UID

    text = (ROOT / "Dockerfile.inference").read_text()
    assert "FROM torch-${TARGET} AS runtime" in text
    assert "AS torch-cpu" in text and "AS torch-cuda" in text
    assert "download.pytorch.org/whl/cpu" in text
    assert f"EXPOSE {SERVER_PORT}" in text and UID == 1000
    assert "/livez" in re.search(r"HEALTHCHECK .*\n.*", text).group(0)
    from qwen_inference.app import create_app
    from qwen_inference.settings import ServeSettings

    routes = set(create_app(ServeSettings(), load=False).openapi()["paths"])
    assert "/livez" in routes and "/health" in routes
    # the operator's fetch Job runs qwen-model from this image
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "qwen-model" in project["scripts"]

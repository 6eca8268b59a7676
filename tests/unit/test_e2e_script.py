"""The kind end-to-end script: it cannot run here (no Docker engine), so it must say so and exit cleanly."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_kind_script_skips_with_a_clear_message_without_docker(tmp_path):
    env = dict(os.environ, PATH=f"{tmp_path}:/usr/bin:/bin")
    (tmp_path / "docker").write_text("#!/bin/sh\nexit 1\n")  # a client without an engine
    (tmp_path / "docker").chmod(0o755)
    r = subprocess.run(["bash", str(ROOT / "tests/e2e/kind.sh")], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0
    assert "e2e-kind: skipped" in r.stderr and "Docker engine" in r.stderr and "kind" in r.stderr


def test_kind_script_is_valid_bash_and_names_real_files():
    assert subprocess.run(["bash", "-n", str(ROOT / "tests/e2e/kind.sh")]).returncode == 0
    text = (ROOT / "tests/e2e/kind.sh").read_text()
    for path in ("Dockerfile.inference", "Dockerfile.operator", "charts/qwen-operator", "manifests/examples/demo.yaml"):
        assert path in text and (ROOT / path).exists()

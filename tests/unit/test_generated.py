"""Generated files are current: the CRD, the chart's copies, the dashboard, the rules, install.yaml and the
README's reference sections are each rendered from one source (scripts/render.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_files_are_current():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "render.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


def test_readme_documents_every_field_and_flag():
    import yaml

    readme = (ROOT / "README.md").read_text()
    doc = yaml.safe_load((ROOT / "crds" / "qwendeployments.yaml").read_text())
    spec = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for name in spec["properties"]:
        assert f"`spec.{name}`" in readme, name
    from qwen_inference.settings import ServeSettings

    for name in ServeSettings.model_fields:
        assert f"`--{name.replace('_', '-')}`" in readme, name
    for anchor in ("QwenHighLatency", "QwenHighErrorRate", "QwenModelNotReady", "QwenQueueSaturated",
                   "QwenHighTimeToFirstToken", "QwenPodRestarting", "QwenOOMKilled", "QwenTargetDown"):
        assert f"### Alert: {anchor}" in readme, anchor
    assert "make run" in readme and "make test" in readme

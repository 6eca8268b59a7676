"""Render every generated file from its one source, or check that they are current (`--check`).

- crds/qwendeployments.yaml and the chart's copy   <- operator/qwen_operator/spec.py
- the dashboard JSON (chart and manifests/grafana) <- operator/qwen_operator/dashboard.py
- manifests/prometheus/qwen-rules.yaml            <- operator/qwen_operator/rules.py (generic rules)
- manifests/install.yaml                           <- `helm template` of the chart
- the QwenDeployment reference in README.md        <- the CRD schema
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "qwen-operator"
README_BEGIN = "<!-- BEGIN GENERATED: QwenDeployment reference (scripts/render.py) -->"
README_END = "<!-- END GENERATED: QwenDeployment reference -->"
FLAGS_BEGIN = "<!-- BEGIN GENERATED: qwen-serve flags (scripts/render.py) -->"
FLAGS_END = "<!-- END GENERATED: qwen-serve flags -->"


def helm() -> str:
    out = subprocess.run([str(ROOT / "scripts" / "k8s-bin"), "dir"], capture_output=True, text=True, check=True)
    return out.stdout.strip() + "/helm"


def install_yaml() -> str:
    r = subprocess.run([helm(), "template", "qwen-operator", str(CHART), "--namespace", "qwen-system",
                        "--kube-version", "1.37.2", "--include-crds"], capture_output=True, text=True, check=True)
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "qwen-system"}}
    header = ("# qwen-operator: the CRD and the operator, rendered from charts/qwen-operator by scripts/render.py.\n"
              "# kubectl apply --server-side -f manifests/install.yaml\n")
    return header + yaml.safe_dump_all([ns] + docs, sort_keys=False, width=120)


def rules_yaml() -> str:
    from qwen_operator.rules import prometheus_rule_groups
    from qwen_operator.spec import Thresholds

    header = ("# Recording rules and alerts for every qwen-serve target, for Prometheus without the Prometheus\n"
              "# Operator (rendered by scripts/render.py). Scrape with honor_labels: true and give each target\n"
              "# `namespace` and `service` labels; the thresholds are the defaults of a QwenDeployment.\n")
    return header + yaml.safe_dump({"groups": prometheus_rule_groups(None, None, Thresholds())}, sort_keys=False,
                                   width=120)


def _type(s: dict) -> str:
    if s.get("x-kubernetes-int-or-string"):
        return "int or string"
    if s.get("x-kubernetes-preserve-unknown-fields"):
        return "object"
    t = s.get("type", "")
    if t == "array":
        return f"[]{_type(s.get('items', {}))}"
    if t == "object" and "additionalProperties" in s:
        return f"map[string]{_type(s['additionalProperties'])}"
    return t


def _rows(schema: dict, prefix: str, required: set[str]) -> list[str]:
    rows = []
    for name, s in schema.get("properties", {}).items():
        path = f"{prefix}.{name}" if prefix else name
        notes = []
        if "enum" in s:
            notes.append("one of " + ", ".join(f"`{v}`" for v in s["enum"]))
        if "default" in s and s["default"] != {}:
            notes.append(f"default `{yaml.safe_dump(s['default'], default_flow_style=True).strip()}`")
        if "minimum" in s:
            notes.append(f"{'>' if s.get('exclusiveMinimum') else '≥'} {s['minimum']}")
        if "maximum" in s:
            notes.append(f"≤ {s['maximum']}")
        if name in required:
            notes.append("**required**")
        for v in s.get("x-kubernetes-validations", []):
            notes.append(f"rule: {v['message']}")
        desc = s.get("description", "").replace("|", "\\|").replace("\n", " ")
        extra = "; ".join(notes).replace("|", "\\|")
        rows.append(f"| `{path}` | {_type(s)} | {desc}{' (' + extra + ')' if extra else ''} |")
        item = s.get("items") if s.get("type") == "array" else s
        if item and item.get("properties"):
            rows += _rows(item, path + ("[]" if s.get("type") == "array" else ""), set(item.get("required", [])))
    return rows


def reference() -> str:
    doc = yaml.safe_load((ROOT / "crds" / "qwendeployments.yaml").read_text())
    root = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    out = [README_BEGIN, "", "#### spec", "", "| field | type | meaning |", "|---|---|---|"]
    out += _rows(root["properties"]["spec"], "spec", set(root["properties"]["spec"].get("required", [])))
    out += ["", "Rules across fields, checked by the API server:", ""]
    for v in root["properties"]["spec"].get("x-kubernetes-validations", []) + root.get("x-kubernetes-validations", []):
        out.append(f"- {v['message']}")
    out += ["", "#### status", "", "| field | type | meaning |", "|---|---|---|"]
    out += _rows(root["properties"]["status"], "status", set())
    out += ["", README_END]
    return "\n".join(out)


def flags() -> str:
    from qwen_inference.settings import ServeSettings

    out = [FLAGS_BEGIN, "", "| flag | env var | default | meaning |", "|---|---|---|---|"]
    for name, field in ServeSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.default if field.default_factory is None else "(see meaning)"
        if default is None:
            default = ""
        out.append(f"| `{flag}` | `QWEN_{name.upper()}` | {f'`{default}`' if default != '' else ''} | "
                   f"{(field.description or '').replace('|', '/')} |")
    out += ["", FLAGS_END]
    return "\n".join(out)


def _splice(text: str, begin: str, end: str, body: str) -> str:
    if begin not in text or end not in text:
        raise SystemExit(f"README.md lacks the markers {begin!r}")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return head + body + tail


def readme(current: str) -> str:
    return _splice(_splice(current, README_BEGIN, README_END, reference()), FLAGS_BEGIN, FLAGS_END, flags())


def outputs() -> dict[Path, str]:
    from qwen_operator import crd, dashboard

    crd_text = crd.render()
    dash = dashboard.render()
    files = {
        ROOT / "crds" / "qwendeployments.yaml": crd_text,
        CHART / "crds" / "qwendeployments.yaml": crd_text,
        CHART / "dashboards" / "qwen-inference.json": dash,
        ROOT / "manifests" / "grafana" / "qwen-inference.json": dash,
        ROOT / "manifests" / "prometheus" / "qwen-rules.yaml": rules_yaml(),
    }
    # the chart embeds the CRD and the dashboard: render it after they are written
    return files


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    files = outputs()
    for path, text in files.items():
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    late = {ROOT / "manifests" / "install.yaml": install_yaml(),
            ROOT / "README.md": readme((ROOT / "README.md").read_text())}
    for path, text in late.items():
        if check:
            if path.read_text() != text:
                stale.append(path)
        else:
            path.write_text(text)
    if stale:
        print("stale: " + ", ".join(str(p.relative_to(ROOT)) for p in stale) + "; run `make manifests`",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

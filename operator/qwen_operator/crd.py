"""The CustomResourceDefinition, rendered from the pydantic models in `spec.py`.

`python -m qwen_operator.crd` prints it; crds/qwendeployments.yaml holds that output and a test keeps the two
equal. pydantic's JSON Schema is turned into a structural OpenAPI v3 schema: references inlined, optional
fields made plain, defaults of nested objects set to `{}` so the API server defaults inside them.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml
from pydantic import BaseModel

from . import GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION
from .spec import QwenDeploymentSpec, QwenDeploymentStatus

DROP = {"title"}
MAX_NAME = 42


def _inline(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        name = schema["$ref"].split("/")[-1]
        target = copy.deepcopy(defs[name])
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        target.update(rest)
        return _inline(target, defs)
    if schema.get("x-kubernetes-int-or-string"):
        out = {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}
        if "description" in schema:
            out["description"] = schema["description"]
        return out
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in DROP:
            continue
        if key == "properties":
            out[key] = {k: _inline(v, defs) for k, v in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _inline(value, defs)
        elif key == "anyOf":
            options = [o for o in value if o.get("type") != "null"]
            if len(options) != 1:
                raise ValueError(f"cannot render a union of {len(options)} types: {value}")
            merged = _inline(options[0], defs)
            for k, v in schema.items():
                if k not in ("anyOf",) and k not in DROP:
                    merged.setdefault(k, v if not isinstance(v, dict) else _inline(v, defs))
            return _structural(merged)
        elif key == "allOf" and len(value) == 1:
            merged = _inline(value[0], defs)
            merged.update({k: v for k, v in schema.items() if k not in ("allOf",) and k not in DROP})
            return _structural(merged)
        else:
            out[key] = value
    return _structural(out)


def _structural(s: dict[str, Any]) -> dict[str, Any]:
    if s.get("x-kubernetes-preserve-unknown-fields"):
        s["type"] = "object"
        s.pop("additionalProperties", None)
    if "const" in s:
        s["enum"] = [s.pop("const")]
    if "exclusiveMinimum" in s and not isinstance(s["exclusiveMinimum"], bool):
        s["minimum"] = s.pop("exclusiveMinimum")
        s["exclusiveMinimum"] = True
    if "exclusiveMaximum" in s and not isinstance(s["exclusiveMaximum"], bool):
        s["maximum"] = s.pop("exclusiveMaximum")
        s["exclusiveMaximum"] = True
    if s.get("default") is None and "default" in s:
        s.pop("default")
    if s.get("type") == "object" and "properties" in s:
        s.pop("additionalProperties", None)
    return s


def _nested_defaults(model: type[BaseModel], schema: dict[str, Any]) -> None:
    """pydantic leaves default_factory out of the schema; the API server needs `default: {}` to default inside."""
    for name, field in model.model_fields.items():
        alias = field.alias or name
        sub = schema.get("properties", {}).get(alias)
        if sub is None:
            continue
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            if field.default_factory is not None:
                sub["default"] = {}
            _nested_defaults(ann, sub)
        else:
            for arg in getattr(ann, "__args__", ()):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    _nested_defaults(arg, sub.get("items", sub))


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    schema = _inline(raw, defs)
    _nested_defaults(model, schema)
    return schema


def build_crd() -> dict[str, Any]:
    spec = openapi_schema(QwenDeploymentSpec)
    spec["description"] = "What to serve and how."
    status = openapi_schema(QwenDeploymentStatus)
    status["description"] = "What runs, and why it is or is not ready."
    root = {
        "type": "object",
        "description": "A chat model served by qwen-serve: a model cache, a download Job, inference pods, a "
                       "Service and, with the Prometheus Operator, a ServiceMonitor and a PrometheusRule.",
        "required": ["spec"],
        "x-kubernetes-validations": [{
            "rule": f"size(self.metadata.name) <= {MAX_NAME}",
            "message": f"metadata.name must be at most {MAX_NAME} characters: it names the Service, the pods and the Jobs",
        }],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    columns = [
        {"name": "Model", "type": "string", "jsonPath": ".spec.model.name"},
        {"name": "Device", "type": "string", "jsonPath": ".spec.device"},
        {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"},
        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint", "priority": 1},
        {"name": "Reason", "type": "string", "jsonPath": ".status.reason", "priority": 1},
        {"name": "Min", "type": "integer", "jsonPath": ".spec.autoscaling.minReplicas", "priority": 1},
        {"name": "Max", "type": "integer", "jsonPath": ".spec.autoscaling.maxReplicas", "priority": 1},
        {"name": "Progress", "type": "string", "jsonPath": ".status.download.progress", "priority": 1},
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "qwen-operator", "app.kubernetes.io/part-of": "qwen-operator"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": SINGULAR,
                      "shortNames": SHORT_NAMES, "categories": ["all", "qwen"]},
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": root},
                "subresources": {
                    "status": {},
                    "scale": {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                              "labelSelectorPath": ".status.selector"},
                },
                "additionalPrinterColumns": columns,
            }],
        },
    }


def render() -> str:
    header = "# Generated from operator/qwen_operator/spec.py by `python -m qwen_operator.crd`; do not edit.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=120)


if __name__ == "__main__":
    sys.stdout.write(render())

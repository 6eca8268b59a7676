"""The Grafana dashboard for qwen-serve, built here so its queries stay in step with the metric names.

`python -m qwen_operator.dashboard` prints it; the chart's ConfigMap and manifests/grafana/ hold that output,
checked by a test. Template variables pick a namespace and a QwenDeployment (the `service` label).
"""

from __future__ import annotations

import json
import sys
from typing import Any

SEL = 'namespace="$namespace",service="$deployment"'
CHAT = f'{SEL},endpoint=~"/v1/chat/completions|/v1/responses|/v1/messages"'  # the routes that answer chat
# kube-state-metrics: the Deployment, and KEDA's HPA (keda-hpa-<ScaledObject>, named after the QwenDeployment)
DEP = 'namespace="$namespace",deployment="$deployment"'
HPA = 'namespace="$namespace",horizontalpodautoscaler="keda-hpa-$deployment"'
SCALED = f"max(kube_deployment_spec_replicas{{{DEP}}}) - max(kube_deployment_spec_replicas{{{DEP}}} offset 1m)"

_ids = iter(range(1, 1000))


def _target(expr: str, legend: str = "", fmt: str | None = None) -> dict[str, Any]:
    t = {"datasource": {"type": "prometheus", "uid": "${datasource}"}, "expr": expr, "legendFormat": legend,
         "refId": "ABCDEFGH"[0]}
    if fmt:
        t["format"] = fmt
    return t


def _quantiles(histogram: str, rate: str) -> list[dict[str, Any]]:
    """p50 and p95 of a histogram over the selected deployment's pods."""
    return [_target(f"histogram_quantile({q}, sum by (le) (rate({histogram}_bucket{{{SEL}}}[{rate}])))", name)
            for q, name in (("0.5", "p50"), ("0.95", "p95"))]


def _panel(title: str, kind: str, x: int, y: int, w: int, h: int, targets: list[dict], unit: str = "short",
           description: str = "", **extra) -> dict[str, Any]:
    for i, t in enumerate(targets):
        t["refId"] = "ABCDEFGH"[i]
    panel = {
        "id": next(_ids), "type": kind, "title": title, "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": w, "h": h}, "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
    }
    panel.update(extra)
    return panel


def _row(title: str, y: int) -> dict[str, Any]:
    return {"id": next(_ids), "type": "row", "title": title, "collapsed": False,
            "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []}


def panels() -> list[dict[str, Any]]:
    rate = "$__rate_interval"
    out = [
        _row("Traffic", 0),
        _panel("Request rate", "stat", 0, 1, 8, 5,
               [_target(f"sum(rate(http_requests_total{{{CHAT}}}[{rate}]))", "requests/s")], "reqps",
               "Chat requests (chat completions and responses) answered per second.", options={"graphMode": "area"}),
        _panel("Success ratio", "stat", 8, 1, 8, 5,
               [_target(f'1 - (sum(rate(http_requests_total{{{CHAT},status_code=~"5.."}}[{rate}])) or vector(0)) / '
                        f"sum(rate(http_requests_total{{{CHAT}}}[{rate}]))", "success")], "percentunit",
               "Share of chat requests that did not fail on the server side (not 5xx).",
               options={"graphMode": "area"}),
        _panel("P99 latency", "stat", 16, 1, 8, 5,
               [_target(f"histogram_quantile(0.99, sum by (le) (rate(http_request_duration_seconds_bucket{{{CHAT}}}[{rate}])))",
                        "p99")], "s", "99th percentile of the time to answer a chat completion, to the last byte.",
               options={"graphMode": "area"}),
        _row("Latency and throughput", 6),
        _panel("Request latency", "heatmap", 0, 7, 12, 8,
               [_target(f"sum by (le) (increase(http_request_duration_seconds_bucket{{{CHAT}}}[{rate}]))", "{{le}}",
                        "heatmap")], "s", "Distribution of chat completion latency.",
               options={"calculate": False, "yAxis": {"unit": "s"}, "cellGap": 1}),
        _panel("Time to first token", "timeseries", 12, 7, 6, 8, _quantiles("qwen_time_to_first_token_seconds", rate), "s", "From arrival to the first generated token (queue and prefill)."),
        _panel("Time per output token", "timeseries", 18, 7, 6, 8, _quantiles("qwen_time_per_output_token_seconds", rate),
               "s", "Mean time between tokens of a reply (decode speed each user sees)."),
        _panel("Tokens per second", "timeseries", 0, 15, 12, 7, [
            _target(f"sum(rate(qwen_generation_tokens_total{{{SEL}}}[{rate}]))", "generated"),
            _target(f"sum(rate(qwen_prompt_tokens_total{{{SEL}}}[{rate}]))", "prompt"),
            _target(f"sum(rate(qwen_prefix_cache_hit_tokens_total{{{SEL}}}[{rate}]))", "prompt, found in the prefix cache"),
        ], "short", "Tokens generated and prompt tokens admitted (computed or found in the prefix cache), and of those "
           "the ones found in the prefix cache, not computed again, per second, over all pods."),
        _panel("Requests by status", "timeseries", 12, 15, 12, 7, [
            _target(f"sum by (status_code) (rate(http_requests_total{{{CHAT}}}[{rate}]))", "{{status_code}}"),
            _target(f"sum by (reason) (rate(qwen_request_errors_total{{{SEL}}}[{rate}]))", "error: {{reason}}"),
        ], "reqps", "Chat requests by HTTP status, and failures by reason."),
        _row("Resources and queue", 22),
        _panel("CPU", "timeseries", 0, 23, 6, 8,
               [_target(f"sum by (pod) (rate(process_cpu_seconds_total{{{SEL}}}[{rate}]))", "{{pod}}")], "short",
               "CPU cores used by each server process."),
        _panel("Memory", "timeseries", 6, 23, 6, 8,
               [_target(f"sum by (pod) (process_resident_memory_bytes{{{SEL}}})", "{{pod}}")], "bytes",
               "Resident memory of each server process."),
        _panel("Running and waiting requests", "timeseries", 12, 23, 6, 8, [
            _target(f"sum(qwen_requests_running{{{SEL}}})", "running"),
            _target(f"sum(qwen_requests_waiting{{{SEL}}})", "waiting"),
            _target(f"sum(active_connections{{{SEL}}})", "HTTP connections"),
        ], "short", "Sequences in the batch, requests queued for a slot, and open HTTP requests."),
        _panel("KV cache use", "timeseries", 18, 23, 6, 8,
               [_target(f"max by (pod) (qwen_kv_cache_usage_ratio{{{SEL}}})", "{{pod}}")], "percentunit",
               "Share of KV cache blocks in use in each pod; near 1, new requests wait.",
               fieldConfig={"defaults": {"unit": "percentunit", "min": 0, "max": 1}, "overrides": []}),
        _row("Scaling", 31),
        _panel("Replicas: desired and ready", "timeseries", 0, 32, 12, 8, [
            _target(f"max(kube_deployment_spec_replicas{{{DEP}}})", "desired"),
            _target(f"max(kube_deployment_status_replicas_ready{{{DEP}}})", "ready"),
            _target(f"count(qwen_model_loaded{{{SEL}}} == 1)", "serving (scraped)"),
            _target(f"max(kube_horizontalpodautoscaler_spec_max_replicas{{{HPA}}})", "autoscaling max"),
            _target(f"max(kube_horizontalpodautoscaler_spec_min_replicas{{{HPA}}})", "autoscaling min"),
        ], "short", "Replicas the Deployment wants (what KEDA decided, with autoscaling), those ready, and the "
           "autoscaling bounds; from kube-state-metrics, and the pods Prometheus scrapes."),
        _panel("Scaling events", "timeseries", 12, 32, 6, 8, [_target(SCALED, "replicas added or removed")],
               "short", "Change of the desired replicas over the last minute: up when KEDA adds replicas, down "
               "when it removes them.", fieldConfig={"defaults": {"unit": "short", "custom": {"drawStyle": "bars"}},
                                                     "overrides": []}),
        _panel("Waiting per serving replica", "timeseries", 18, 32, 6, 8, [
            _target(f"sum(qwen_requests_waiting{{{SEL}}}) / count(qwen_model_loaded{{{SEL}}} == 1)", "waiting"),
        ], "short", "Requests waiting for a slot per serving replica: what KEDA compares with "
           "autoscaling.targetWaitingRequests."),
    ]
    return out


def annotations() -> list[dict[str, Any]]:
    """Scaling events as annotations on every panel."""
    return [{"name": "Scaling", "enable": True, "iconColor": "purple",
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "expr": f"{SCALED} != 0", "step": "1m", "titleFormat": "Scaled", "textFormat": "{{value}} replicas",
             "useValueForTime": False}]


def dashboard() -> dict[str, Any]:
    global _ids
    _ids = iter(range(1, 1000))
    return {
        "uid": "qwen-inference",
        "title": "Qwen inference",
        "description": "qwen-serve: traffic, latency, tokens and resources of one QwenDeployment.",
        "tags": ["qwen", "llm", "inference"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source",
             "current": {}, "hide": 0},
            {"name": "namespace", "type": "query", "label": "Namespace", "refresh": 2, "sort": 1,
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": {"query": "label_values(qwen_model_loaded, namespace)", "refId": "namespace"},
             "definition": "label_values(qwen_model_loaded, namespace)", "current": {}, "hide": 0},
            {"name": "deployment", "type": "query", "label": "QwenDeployment", "refresh": 2, "sort": 1,
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": {"query": 'label_values(qwen_model_loaded{namespace="$namespace"}, service)',
                       "refId": "deployment"},
             "definition": 'label_values(qwen_model_loaded{namespace="$namespace"}, service)',
             "current": {}, "hide": 0},
        ]},
        "annotations": {"list": annotations()},
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def queries(d: dict[str, Any] | None = None) -> list[str]:
    """Every PromQL expression in the dashboard's panels."""
    d = d or dashboard()
    return [t["expr"] for p in d["panels"] for t in p.get("targets", [])] + \
        [a["expr"] for a in d["annotations"]["list"]]


if __name__ == "__main__":
    sys.stdout.write(render())

"""The alerting and recording rules, checked by promtool and unit-tested with promtool's rule tests: each
alert fires on series that should fire it and stays silent on series that should not (thresholds, `for`
durations, and the namespace/service scoping that keeps two QwenDeployments apart)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from qwen_operator import dashboard
from qwen_operator.rules import prometheus_rule_groups
from qwen_operator.spec import Thresholds

from .conftest import tool

ROOT = Path(__file__).resolve().parents[2]
CHAT = 'endpoint="/v1/chat/completions",method="POST"'
RESPONSES = 'endpoint="/v1/responses",method="POST"'
MESSAGES = 'endpoint="/v1/messages",method="POST"'


def rules_file(tmp_path: Path) -> Path:
    # two QwenDeployments' rules side by side, as two PrometheusRule objects would put them
    groups = prometheus_rule_groups("ns1", "chat", Thresholds()) + \
        prometheus_rule_groups("ns1", "chat-small", Thresholds(p99_latency_seconds=60)) + \
        prometheus_rule_groups("ns1", "chat-big", Thresholds())
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    return path


def test_promtool_checks_the_rules(tmp_path):
    r = subprocess.run([tool("promtool"), "check", "rules", str(rules_file(tmp_path)),
                        str(ROOT / "manifests" / "prometheus" / "qwen-rules.yaml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def s(metric: str, labels: str, values: str) -> dict:
    return {"series": f"{metric}{{{labels}}}", "values": values}


def alert(name: str, at: str, *fired: dict) -> dict:
    return {"eval_time": at, "alertname": name, "exp_alerts": list(fired)}


RUNBOOK = "https://github.com/qwen-operator/qwen-operator/blob/main/README.md#alert-"


def fired(service: str, severity: str, alert_name: str, summary: str, description: str, **labels) -> dict:
    lab = {"severity": severity, **labels}
    if service:
        lab.update(namespace="ns1", service=service)
    return {"exp_labels": lab, "exp_annotations": {"summary": summary, "description": description,
                                                   "runbook_url": RUNBOOK + alert_name.lower()}}


TESTS = [
    # P99 latency: chat is slow (every request between 5 and 10 s), chat-small is fast; for: 2m
    {"interval": "1m", "input_series": [
        s("http_request_duration_seconds_bucket", f'namespace="ns1",service="chat",{CHAT},le="5"', "0+0x20"),
        s("http_request_duration_seconds_bucket", f'namespace="ns1",service="chat",{CHAT},le="10"', "0+10x20"),
        s("http_request_duration_seconds_bucket", f'namespace="ns1",service="chat",{CHAT},le="+Inf"', "0+10x20"),
        s("http_request_duration_seconds_bucket", f'namespace="ns1",service="chat-small",{CHAT},le="1"', "0+10x20"),
        s("http_request_duration_seconds_bucket", f'namespace="ns1",service="chat-small",{CHAT},le="+Inf"', "0+10x20"),
    ], "alert_rule_test": [
        alert("QwenHighLatency", "2m"),  # above the threshold, but not yet for 2 minutes
        alert("QwenHighLatency", "6m", fired("chat", "warning", "QwenHighLatency", "ns1/chat: P99 chat latency is high",
                                             "P99 latency of chat requests is 9.95s, above 5s, for 2 minutes.")),
    ]},
    # error ratio: chat answers 10% 5xx (threshold 5%; chat completions, Responses and Messages alike), chat-small 1%;
    # for: 5m. Other routes do not count.
    {"interval": "1m", "input_series": [
        s("http_requests_total", f'namespace="ns1",service="chat",{CHAT},status_code="200"', "0+80x30"),
        s("http_requests_total", f'namespace="ns1",service="chat",{RESPONSES},status_code="200"', "0+10x30"),
        s("http_requests_total", f'namespace="ns1",service="chat",{RESPONSES},status_code="500"', "0+5x30"),
        s("http_requests_total", f'namespace="ns1",service="chat",{MESSAGES},status_code="500"', "0+5x30"),
        s("http_requests_total", f'namespace="ns1",service="chat",endpoint="/metrics",method="GET",status_code="200"',
          "0+900x30"),
        s("http_requests_total", f'namespace="ns1",service="chat-small",{CHAT},status_code="200"', "0+99x30"),
        s("http_requests_total", f'namespace="ns1",service="chat-small",{CHAT},status_code="503"', "0+1x30"),
    ], "alert_rule_test": [
        alert("QwenHighErrorRate", "4m"),
        alert("QwenHighErrorRate", "12m", fired("chat", "critical", "QwenHighErrorRate", "ns1/chat: many chat requests fail",
                                               "10% of chat requests answer 5xx (threshold 0.05).")),
    ], "promql_expr_test": [
        {"expr": 'round(qwen:error_ratio:5m{service="chat"} * 1000)', "eval_time": "10m",
         "exp_samples": [{"labels": '{namespace="ns1",service="chat"}', "value": 100}]},
        {"expr": 'round(qwen:request_rate:5m{service="chat",code_class="5xx"} * 6000)', "eval_time": "10m",
         "exp_samples": [{"labels": '{code_class="5xx",namespace="ns1",service="chat"}', "value": 1000}]},
    ]},
    # no ready replica for 5 minutes (kube-state-metrics); chat-small is fine
    {"interval": "1m", "input_series": [
        s("kube_deployment_status_replicas_ready", 'namespace="ns1",deployment="chat"', "0x20"),
        s("kube_deployment_spec_replicas", 'namespace="ns1",deployment="chat"', "1x20"),
        s("kube_deployment_status_replicas_ready", 'namespace="ns1",deployment="chat-small"', "1x20"),
        s("kube_deployment_spec_replicas", 'namespace="ns1",deployment="chat-small"', "1x20"),
    ], "alert_rule_test": [
        alert("QwenModelNotReady", "3m"),
        alert("QwenModelNotReady", "8m", fired("", "critical", "QwenModelNotReady", "ns1/chat: no replica is ready",
                                              "The Deployment wants replicas but none has been ready for 5 minutes: "
                                              "the model is not served.", namespace="ns1", deployment="chat")),
    ]},
    # queue: 40 waiting (threshold 32) in one of chat's pods; chat-small has 10
    {"interval": "1m", "input_series": [
        s("qwen_requests_waiting", 'namespace="ns1",service="chat",pod="chat-1"', "40x20"),
        s("qwen_requests_waiting", 'namespace="ns1",service="chat",pod="chat-2"', "3x20"),
        s("qwen_requests_waiting", 'namespace="ns1",service="chat-small",pod="s-1"', "10x20"),
    ], "alert_rule_test": [
        alert("QwenQueueSaturated", "3m"),
        alert("QwenQueueSaturated", "7m", fired("chat", "warning", "QwenQueueSaturated", "ns1/chat: requests wait for a slot",
                                               "40 requests wait in a pod's queue (threshold 32): add replicas or "
                                               "raise engine.maxConcurrency.")),
    ]},
    # time to first token: P95 between 10 and 30 s (threshold 10 s)
    {"interval": "1m", "input_series": [
        s("qwen_time_to_first_token_seconds_bucket", 'namespace="ns1",service="chat",le="10"', "0+0x20"),
        s("qwen_time_to_first_token_seconds_bucket", 'namespace="ns1",service="chat",le="30"', "0+5x20"),
        s("qwen_time_to_first_token_seconds_bucket", 'namespace="ns1",service="chat",le="+Inf"', "0+5x20"),
    ], "alert_rule_test": [
        alert("QwenHighTimeToFirstToken", "3m"),
        alert("QwenHighTimeToFirstToken", "9m", fired("chat", "warning", "QwenHighTimeToFirstToken",
                                                     "ns1/chat: the first token comes late",
                                                     "P95 time to first token is 29s, above 10s.")),
    ]},
    # restarts: one pod of chat and one of chat-small (another Deployment) restart every minute
    {"interval": "1m", "input_series": [
        s("kube_pod_container_status_restarts_total", 'namespace="ns1",pod="chat-5d8f7c9b6-abcde",container="server"',
          "0+1x20"),
        s("kube_pod_container_status_restarts_total",
          'namespace="ns1",pod="chat-small-7d9f8c6b5-fghij",container="server"', "0+1x20"),
        s("kube_pod_container_status_restarts_total", 'namespace="ns1",pod="chat-5d8f7c9b6-zzzzz",container="server"',
          "0x20"),
    ], "alert_rule_test": [
        # one alert per restarting pod: chat's rule for chat's pod, chat-small's rule for its own pod; were
        # chat's pod pattern to match chat-small's pods, its alert would come twice
        alert("QwenPodRestarting", "10m",
              fired("", "warning", "QwenPodRestarting", "ns1/chat-5d8f7c9b6-abcde restarts",
                    "The server container restarted 10 times in 15 minutes.", namespace="ns1",
                    pod="chat-5d8f7c9b6-abcde", container="server"),
              fired("", "warning", "QwenPodRestarting", "ns1/chat-small-7d9f8c6b5-fghij restarts",
                    "The server container restarted 10 times in 15 minutes.", namespace="ns1",
                    pod="chat-small-7d9f8c6b5-fghij", container="server")),
    ]},
    # OOM: the last termination was OOMKilled and the container restarted
    {"interval": "1m", "input_series": [
        s("kube_pod_container_status_last_terminated_reason",
          'namespace="ns1",pod="chat-5d8f7c9b6-abcde",container="server",reason="OOMKilled"', "1x20"),
        s("kube_pod_container_status_restarts_total", 'namespace="ns1",pod="chat-5d8f7c9b6-abcde",container="server"',
          "0 0 0 0 0 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1"),
    ], "alert_rule_test": [
        alert("QwenOOMKilled", "2m"),  # no restart yet
        alert("QwenOOMKilled", "7m", fired("", "critical", "QwenOOMKilled", "ns1/chat-5d8f7c9b6-abcde was killed for memory",
                                           "The server ran out of memory: raise resources.limits.memory or lower "
                                           "engine.kvCacheTokens.", namespace="ns1", pod="chat-5d8f7c9b6-abcde",
                                           container="server", reason="OOMKilled")),
        alert("QwenOOMKilled", "19m"),  # the restart is older than 10 minutes
    ]},
    # autoscaling at its maximum: chat (4 of 4, queue growing) fires; chat-small is at its maximum too but its
    # queue is steady; chat-big's queue grows but it may still add replicas
    {"interval": "1m", "input_series": [
        s("kube_horizontalpodautoscaler_status_current_replicas", 'namespace="ns1",horizontalpodautoscaler="keda-hpa-chat"', "4x30"),
        s("kube_horizontalpodautoscaler_spec_max_replicas", 'namespace="ns1",horizontalpodautoscaler="keda-hpa-chat"', "4x30"),
        s("qwen_requests_waiting", 'namespace="ns1",service="chat",pod="chat-1"', "0+1x30"),
        s("qwen_requests_waiting", 'namespace="ns1",service="chat",pod="chat-2"', "0+2x30"),
        s("kube_horizontalpodautoscaler_status_current_replicas",
          'namespace="ns1",horizontalpodautoscaler="keda-hpa-chat-small"', "2x30"),
        s("kube_horizontalpodautoscaler_spec_max_replicas",
          'namespace="ns1",horizontalpodautoscaler="keda-hpa-chat-small"', "2x30"),
        s("qwen_requests_waiting", 'namespace="ns1",service="chat-small",pod="s-1"', "9x30"),
        s("kube_horizontalpodautoscaler_status_current_replicas",
          'namespace="ns1",horizontalpodautoscaler="keda-hpa-chat-big"', "3x30"),
        s("kube_horizontalpodautoscaler_spec_max_replicas", 'namespace="ns1",horizontalpodautoscaler="keda-hpa-chat-big"',
          "10x30"),
        s("qwen_requests_waiting", 'namespace="ns1",service="chat-big",pod="b-1"', "0+5x30"),
    ], "alert_rule_test": [
        alert("QwenAutoscalerAtMax", "3m"),  # not yet for 5 minutes
        alert("QwenAutoscalerAtMax", "15m", fired("chat", "warning", "QwenAutoscalerAtMax",
                                                 "ns1/chat: autoscaling is at its maximum and the queue grows",
                                                 "KEDA runs 4 replicas, autoscaling.maxReplicas, and requests keep "
                                                 "piling up: raise autoscaling.maxReplicas, or the capacity of each "
                                                 "replica.")),
    ]},
    # a target down for 5 minutes
    {"interval": "1m", "input_series": [
        s("up", 'namespace="ns1",service="chat",instance="10.0.0.5:8000",job="chat"', "0x20"),
        s("up", 'namespace="ns1",service="chat",instance="10.0.0.6:8000",job="chat"', "1x20"),
    ], "alert_rule_test": [
        alert("QwenTargetDown", "3m"),
        alert("QwenTargetDown", "7m", fired("chat", "warning", "QwenTargetDown", "ns1/chat: Prometheus cannot scrape a pod",
                                           "A qwen-serve target (10.0.0.5:8000) has been down for 5 minutes.",
                                           instance="10.0.0.5:8000", job="chat")),
    ]},
]


def test_every_alert_fires_when_it_should_and_only_then(tmp_path):
    rules = rules_file(tmp_path)
    spec = {"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": TESTS}
    test_file = tmp_path / "tests.yaml"
    test_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    r = subprocess.run([tool("promtool"), "test", "rules", str(test_file)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_has_a_test_and_a_runbook():
    tested = {t["alertname"] for case in TESTS for t in case.get("alert_rule_test", [])}
    groups = prometheus_rule_groups("ns1", "chat", Thresholds())
    alerts = [r for g in groups for r in g["rules"] if "alert" in r]
    assert {a["alert"] for a in alerts} == tested
    readme = (ROOT / "README.md").read_text()
    for a in alerts:
        assert a["labels"]["severity"] in ("warning", "critical")
        assert a["annotations"]["summary"] and a["annotations"]["description"]
        anchor = a["annotations"]["runbook_url"].split("#")[1]
        assert anchor == "alert-" + a["alert"].lower() and f"### Alert: {a['alert']}" in readme


@pytest.mark.parametrize("threshold", [0.5, 30.0])
def test_thresholds_come_from_the_spec(threshold):
    groups = prometheus_rule_groups("ns", "x", Thresholds(p99_latency_seconds=threshold))
    expr = next(r["expr"] for g in groups for r in g["rules"] if r.get("alert") == "QwenHighLatency")
    assert expr.endswith(f"> {threshold:g}")


def test_dashboard_scaling_queries_on_kube_state_metrics(tmp_path):
    """The dashboard's queries on kube-state-metrics series, evaluated by promtool: KEDA scales chat from 1 to 3
    replicas at minute 5 (ready a minute later), between its bounds 1 and 4; chat-small must not leak in."""
    exprs = [e.replace("$namespace", "ns1").replace("$deployment", "chat").replace("$__rate_interval", "2m")
             for e in dashboard.queries() if "kube_" in e]
    hpa = 'namespace="ns1",horizontalpodautoscaler="keda-hpa-chat"'
    series = [
        s("kube_deployment_spec_replicas", 'namespace="ns1",deployment="chat"', "1 1 1 1 1 3 3 3 3 3"),
        s("kube_deployment_status_replicas_ready", 'namespace="ns1",deployment="chat"', "1 1 1 1 1 1 3 3 3 3"),
        s("kube_deployment_spec_replicas", 'namespace="ns1",deployment="chat-small"', "7x10"),
        s("kube_horizontalpodautoscaler_spec_max_replicas", hpa, "4x10"),
        s("kube_horizontalpodautoscaler_spec_min_replicas", hpa, "1x10"),
        s("kube_horizontalpodautoscaler_spec_max_replicas", 'namespace="ns1",horizontalpodautoscaler="keda-hpa-x"',
          "9x10"),
    ]
    expected = {  # (at minute 5, at minute 8) for each query, in the dashboard's order
        "max(kube_deployment_spec_replicas": (3, 3), "max(kube_deployment_status_replicas_ready": (1, 3),
        "max(kube_horizontalpodautoscaler_spec_max_replicas": (4, 4),
        "max(kube_horizontalpodautoscaler_spec_min_replicas": (1, 1),
    }
    tests = []
    for expr in exprs:
        if expr.startswith("max(kube_deployment_spec_replicas") and "offset" in expr:
            values = {5: 2, 8: 0}  # scaling events: +2 when KEDA scaled, nothing after
            if expr.endswith("!= 0"):
                values = {5: 2}  # the annotation: only the change
        else:
            key = next(k for k in expected if expr.startswith(k))
            values = dict(zip((5, 8), expected[key]))
        for minute in (5, 8):
            samples = [{"labels": "{}", "value": values[minute]}] if minute in values else []
            tests.append({"expr": expr, "eval_time": f"{minute}m", "exp_samples": samples})
    assert len(exprs) == 6 and len(tests) == 12
    spec = {"rule_files": [], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": tests}]}
    test_file = tmp_path / "tests.yaml"
    test_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    r = subprocess.run([tool("promtool"), "test", "rules", str(test_file)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

"""Recording rules and alerts for qwen-serve, scoped to one QwenDeployment or generic.

Scoped (what the operator puts in each PrometheusRule): every expression selects `namespace` and `service`,
the labels the ServiceMonitor gives every series, so two QwenDeployments never mix. Generic (the plain rule
file for Prometheus without the operator): the same rules over every deployment, aggregated by
`namespace` and `service`. The ServiceMonitor scrapes with `honorLabels: true`, so the server's own
`endpoint` label (the route) is kept; plain scrape configs should do the same.
"""

from __future__ import annotations

from typing import Any

RUNBOOK = "https://github.com/qwen-operator/qwen-operator/blob/main/README.md#alert-{anchor}"
# the routes that answer chat: chat completions, the Responses API and Anthropic's Messages API
CHAT = "/v1/chat/completions|/v1/responses|/v1/messages"
BY = "namespace, service"


def _matchers(*extra: str, **labels: str | None) -> str:
    """A PromQL label selector of the labels that are set (None: not scoped by that label), then `extra`."""
    parts = [f'{k}="{v}"' for k, v in labels.items() if v is not None]
    return "{" + ",".join(parts + list(extra)) + "}"


def _sel(namespace: str | None, service: str | None, *extra: str) -> str:
    return _matchers(*extra, namespace=namespace, service=service)


def _ksm_sel(namespace: str | None, name: str | None, *extra: str) -> str:
    """kube-state-metrics names the Deployment in a `deployment` label."""
    return _matchers(*extra, namespace=namespace, deployment=name)


def _pod_sel(namespace: str | None, name: str | None) -> str:
    """The server containers of the Deployment's pods: <name>-<replicaset hash>-<5 characters>."""
    pods = f'pod=~"{name}-[a-z0-9]+-[a-z0-9]{{5}}"' if name is not None else None
    return "{" + ",".join(['container="server"'] + ([f'namespace="{namespace}"'] if namespace is not None else [])
                          + ([pods] if pods else [])) + "}"


def _hpa(metric: str, namespace: str | None, name: str | None) -> str:
    """A kube-state-metrics HPA series of KEDA's HPA (keda-hpa-<ScaledObject>, the ScaledObject named after the
    QwenDeployment), labelled with the deployment's name as `service`, aggregated over kube-state-metrics
    replicas."""
    hpa = f'horizontalpodautoscaler="keda-hpa-{name}"' if name is not None else 'horizontalpodautoscaler=~"keda-hpa-.+"'
    return (f'max by ({BY}) (label_replace({metric}{_matchers(hpa, namespace=namespace)}, "service", "$1", '
            f'"horizontalpodautoscaler", "keda-hpa-(.+)"))')


def recording_rules(namespace: str | None = None, service: str | None = None) -> list[dict[str, Any]]:
    s = lambda *e: _sel(namespace, service, *e)  # noqa: E731
    chat = f'endpoint=~"{CHAT}"'
    server_error = 'status_code=~"5.."'
    rules = [
        {"record": "qwen:request_rate:5m",
         "expr": f'sum by ({BY}, code_class) (label_replace(rate(http_requests_total{s(chat)}[5m]), '
                 f'"code_class", "${{1}}xx", "status_code", "([0-9])[0-9][0-9]"))'},
        {"record": "qwen:error_ratio:5m",
         "expr": f"sum by ({BY}) (rate(http_requests_total{s(chat, server_error)}[5m])) / "
                 f"sum by ({BY}) (rate(http_requests_total{s(chat)}[5m]))"},
    ]
    for q in ("0.5", "0.95", "0.99"):
        tag = {"0.5": "p50", "0.95": "p95", "0.99": "p99"}[q]
        rules.append({"record": f"qwen:request_latency_seconds:{tag}",
                      "expr": f"histogram_quantile({q}, sum by ({BY}, le) "
                              f"(rate(http_request_duration_seconds_bucket{s(chat)}[5m])))"})
    rules += [
        {"record": "qwen:time_to_first_token_seconds:p95",
         "expr": f"histogram_quantile(0.95, sum by ({BY}, le) (rate(qwen_time_to_first_token_seconds_bucket{s()}[5m])))"},
        {"record": "qwen:time_per_output_token_seconds:p95",
         "expr": f"histogram_quantile(0.95, sum by ({BY}, le) "
                 f"(rate(qwen_time_per_output_token_seconds_bucket{s()}[5m])))"},
        {"record": "qwen:generation_tokens:rate5m",
         "expr": f"sum by ({BY}) (rate(qwen_generation_tokens_total{s()}[5m]))"},
    ]
    return rules


def alert_rules(namespace: str | None, name: str | None, thresholds) -> list[dict[str, Any]]:
    s = lambda *e: _sel(namespace, name, *e)  # noqa: E731
    scope = "{{ $labels.namespace }}/{{ $labels.service }}"

    def alert(alert: str, expr: str, for_: str, severity: str, summary: str, description: str) -> dict[str, Any]:
        return {
            "alert": alert,
            "expr": expr,
            "for": for_,
            "labels": {"severity": severity},
            "annotations": {"summary": summary, "description": description,
                            "runbook_url": RUNBOOK.format(anchor=alert.lower())},
        }

    ksm = _ksm_sel(namespace, name)
    pods = _pod_sel(namespace, name)
    return [
        alert("QwenHighLatency", f"qwen:request_latency_seconds:p99{s()} > {thresholds.p99_latency_seconds:g}", "2m",
              "warning", f"{scope}: P99 chat latency is high",
              f"P99 latency of chat requests is {{{{ $value | humanizeDuration }}}}, above "
              f"{thresholds.p99_latency_seconds:g}s, for 2 minutes."),
        alert("QwenHighErrorRate", f"qwen:error_ratio:5m{s()} > {thresholds.error_ratio:g}", "5m", "critical",
              f"{scope}: many chat requests fail",
              f"{{{{ $value | humanizePercentage }}}} of chat requests answer 5xx (threshold "
              f"{thresholds.error_ratio:g})."),
        alert("QwenModelNotReady",
              f"(kube_deployment_status_replicas_ready{ksm} == 0) and on (namespace, deployment) "
              f"(kube_deployment_spec_replicas{ksm} > 0)", "5m", "critical",
              "{{ $labels.namespace }}/{{ $labels.deployment }}: no replica is ready",
              "The Deployment wants replicas but none has been ready for 5 minutes: the model is not served."),
        alert("QwenQueueSaturated", f"max by ({BY}) (qwen_requests_waiting{s()}) > {thresholds.queue_depth}", "5m",
              "warning", f"{scope}: requests wait for a slot",
              f"{{{{ $value }}}} requests wait in a pod's queue (threshold {thresholds.queue_depth}): add replicas "
              "or raise engine.maxConcurrency."),
        alert("QwenHighTimeToFirstToken",
              f"qwen:time_to_first_token_seconds:p95{s()} > {thresholds.ttft_p95_seconds:g}", "5m", "warning",
              f"{scope}: the first token comes late",
              f"P95 time to first token is {{{{ $value | humanizeDuration }}}}, above "
              f"{thresholds.ttft_p95_seconds:g}s."),
        alert("QwenPodRestarting", f"increase(kube_pod_container_status_restarts_total{pods}[15m]) > 2", "0m",
              "warning", "{{ $labels.namespace }}/{{ $labels.pod }} restarts",
              "The server container restarted {{ $value | humanize }} times in 15 minutes."),
        alert("QwenOOMKilled",
              f'(kube_pod_container_status_last_terminated_reason{pods[:-1]},reason="OOMKilled"}} == 1) '
              f"and on (namespace, pod, container) "
              f"(increase(kube_pod_container_status_restarts_total{pods}[10m]) > 0)", "0m", "critical",
              "{{ $labels.namespace }}/{{ $labels.pod }} was killed for memory",
              "The server ran out of memory: raise resources.limits.memory or lower engine.kvCacheTokens."),
        alert("QwenAutoscalerAtMax",
              f"{_hpa('kube_horizontalpodautoscaler_status_current_replicas', namespace, name)} >= "
              f"{_hpa('kube_horizontalpodautoscaler_spec_max_replicas', namespace, name)} "
              f"and on ({BY}) deriv(sum by ({BY}) (qwen_requests_waiting{s()})[10m:1m]) > 0 "
              f"and on ({BY}) sum by ({BY}) (qwen_requests_waiting{s()}) > 0", "5m", "warning",
              f"{scope}: autoscaling is at its maximum and the queue grows",
              "KEDA runs {{ $value }} replicas, autoscaling.maxReplicas, and requests keep piling up: raise "
              "autoscaling.maxReplicas, or the capacity of each replica."),
        alert("QwenTargetDown", f"up{s()} == 0", "5m", "warning",
              f"{scope}: Prometheus cannot scrape a pod",
              "A qwen-serve target ({{ $labels.instance }}) has been down for 5 minutes."),
    ]


def prometheus_rule_groups(namespace: str | None, name: str | None, thresholds) -> list[dict[str, Any]]:
    suffix = f"-{namespace}-{name}" if name else ""
    return [
        {"name": f"qwen-recording{suffix}", "interval": "30s", "rules": recording_rules(namespace, name)},
        {"name": f"qwen-alerts{suffix}", "rules": alert_rules(namespace, name, thresholds)},
    ]

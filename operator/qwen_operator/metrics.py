"""The operator's own Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()
REGISTRY = CollectorRegistry()
RECONCILES = Counter("qwen_operator_reconciles_total", "Reconciles of QwenDeployments, by result.", ["result"],
                     registry=REGISTRY)
RECONCILE_SECONDS = Histogram("qwen_operator_reconcile_duration_seconds", "Time one reconcile takes.",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=REGISTRY)
QUEUE_DEPTH = Gauge("qwen_operator_queue_depth", "QwenDeployments waiting to be reconciled.", registry=REGISTRY)
APPLIES = Counter("qwen_operator_applies_total", "Objects applied, by kind.", ["kind"], registry=REGISTRY)
PHASES = Gauge("qwen_operator_deployments", "QwenDeployments by phase.", ["phase"], registry=REGISTRY)
for _r in ("ok", "error"):
    RECONCILES.labels(_r)

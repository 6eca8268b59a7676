"""The operator when things go away: the monitoring CRDs, the API server; and a burst of 50 resources."""

from __future__ import annotations

import collections
import copy
import re
import time

from .conftest import monitoring_crds
from .test_operator import demo


def test_without_monitoring_crds_everything_else_works(cluster, operator):
    ns = cluster.namespace("nomon")
    for crd in ("servicemonitors.monitoring.coreos.com", "prometheusrules.monitoring.coreos.com"):
        cluster.kubectl("delete", "crd", crd, "--wait=true", timeout=60)
    try:
        time.sleep(3)  # longer than the operator's look at the CRDs
        cluster.apply(demo(), ns)
        ready = cluster.wait_phase("demo", ns, "Ready")
        cond = {c["type"]: c for c in ready["status"]["conditions"]}
        assert cond["Monitoring"]["status"] == "False" and cond["Monitoring"]["reason"] == "MonitoringCRDsMissing"
        assert cond["Degraded"]["status"] == "False"
        events = cluster.events(ns, "demo")
        assert any(e["type"] == "Warning" and e["reason"] == "MonitoringCRDsMissing" for e in events)
    finally:
        for crd in monitoring_crds():
            cluster.kubectl("apply", "--server-side", "-f", str(crd))
        cluster.kubectl("wait", "--for=condition=Established", "crd/servicemonitors.monitoring.coreos.com",
                        "crd/prometheusrules.monitoring.coreos.com", "--timeout=60s")
    # once the Prometheus Operator arrives, monitoring follows
    cluster.wait("the ServiceMonitor", lambda: cluster.get("servicemonitor", "demo", ns) is not None, timeout=60)
    cluster.wait("the Monitoring condition", lambda: any(
        c["type"] == "Monitoring" and c["status"] == "True" for c in cluster.qwd("demo", ns)["status"]["conditions"]))
    # and disabling it removes what was made
    cluster.apply(demo(monitoring={"serviceMonitor": {"enabled": False}, "prometheusRule": {"enabled": False}}), ns)
    cluster.wait("monitoring objects to go", lambda: cluster.get("servicemonitor", "demo", ns) is None
                 and cluster.get("prometheusrule", "demo", ns) is None)
    assert {c["type"]: c["reason"] for c in cluster.qwd("demo", ns)["status"]["conditions"]}["Monitoring"] == "Disabled"


def test_api_server_goes_away_and_comes_back(cluster, operator):
    ns = cluster.namespace("apidown")
    cluster.apply(demo("before"), ns)
    cluster.wait_phase("before", ns, "Ready")
    cluster.dc.stop_apiserver()
    time.sleep(5)
    assert operator.proc.poll() is None  # the operator rides it out
    cluster.dc.start_apiserver()
    cluster.apply(demo("after"), ns)
    cluster.wait_phase("after", ns, "Ready", timeout=120)
    cluster.kubectl("delete", "service", "before", "-n", ns)
    cluster.wait("the Service to come back", lambda: cluster.get("service", "before", ns) is not None, timeout=60)
    assert operator.proc.poll() is None


def test_a_burst_of_50_reconciles_without_errors_or_duplicates(cluster, operator):
    ns = cluster.namespace("burst")
    errors_before = len(operator.errors())
    docs = []
    for i in range(50):
        obj = copy.deepcopy(demo(f"q{i:02d}"))
        obj["spec"]["resources"] = {"requests": {"cpu": "10m", "memory": "64Mi"}}
        docs.append(obj)
    cluster.apply(docs, ns)

    def all_ready():
        items = cluster.get("qwendeployments", namespace=ns)
        phases = collections.Counter(i.get("status", {}).get("phase") for i in items)
        return phases.get("Ready") == 50 and phases
    cluster.wait("50 Ready", all_ready, timeout=240, interval=2)
    for kind in ("deployments", "jobs", "services", "pvc", "servicemonitors", "prometheusrules"):
        names = [o["metadata"]["name"] for o in cluster.get(kind, namespace=ns)]
        assert len(names) == 50 == len(set(names)), kind
    assert len(operator.errors()) == errors_before
    m = re.search(r'qwen_operator_reconciles_total\{result="ok"\} (\S+)', operator.metrics())
    assert m and float(m.group(1)) >= 50
    cluster.kubectl("delete", "namespace", ns, "--wait=false")

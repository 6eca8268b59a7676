"""Autoscaling and inference routing on the real API server, with KEDA's, the KEDA HTTP add-on's and the
Gateway API Inference Extension's CRDs from their Go modules: the objects the operator makes are accepted and
target the right things, scale-subresource writes (as KEDA's HPA and `kubectl scale` make them) become pods
without a rollout, and each missing CRD is reported while everything else works. The KEDA operator itself
does not run here (see test_keda.py); what it writes on a ScaledObject's status is written by hand where a
test needs it."""

from __future__ import annotations

import copy
import json

import pytest

from .conftest import OPTIONAL_CRDS, example, install_crds, remove_crds
from .test_operator import SERVER_LABELS, demo, owned_by

PROM = "http://prometheus.monitoring.svc:9090"
QWD = "/apis/qwen-operator.io/v1alpha1/namespaces/{ns}/qwendeployments/{name}"


def autoscaled(name: str = "demo", **autoscaling) -> dict:
    spec = {"minReplicas": 1, "maxReplicas": 3, "prometheus": {"address": PROM}}
    spec.update(autoscaling)
    return demo(name, autoscaling=spec)


def condition(cluster, name: str, ns: str, ctype: str) -> dict | None:
    st = (cluster.qwd(name, ns) or {}).get("status") or {}
    return next((c for c in st.get("conditions") or [] if c["type"] == ctype), None)


def wait_condition(cluster, name: str, ns: str, ctype: str, reason: str | None, timeout: float = 60) -> dict | None:
    """Until the condition has this reason (None: until it is gone)."""
    def check():
        c = condition(cluster, name, ns, ctype)
        if reason is None:
            return c is None
        return c if c and c["reason"] == reason else None
    return cluster.wait(f"{ns}/{name}: {ctype} {reason}", check, timeout)


def scale(cluster, ns: str, name: str) -> dict:
    return json.loads(cluster.kubectl("get", "--raw", QWD.format(ns=ns, name=name) + "/scale").stdout)


def write_scale_as_keda(cluster, ns: str, name: str, replicas: int) -> None:
    """What KEDA (from and to zero) and its HPA (in between) do: read the Scale, then update it."""
    obj = scale(cluster, ns, name)
    obj["spec"]["replicas"] = replicas
    cluster.kubectl("replace", "--raw", QWD.format(ns=ns, name=name) + "/scale", "-f", "-", input=json.dumps(obj))


def wait_replicas(cluster, ns: str, name: str, n: int, timeout: float = 90) -> dict:
    def check():
        obj = cluster.qwd(name, ns)
        st = obj.get("status") or {}
        pods = cluster.get("pods", namespace=ns, selector=SERVER_LABELS.format(name=name))
        ready = [p for p in pods if any(c["type"] == "Ready" and c["status"] == "True"
                                        for c in (p.get("status") or {}).get("conditions") or [])
                 and not p["metadata"].get("deletionTimestamp")]
        if (st.get("readyReplicas") or 0) == n and st.get("replicas") == n and len(ready) == n \
                and st.get("phase") == "Ready" and st.get("observedGeneration") == obj["metadata"]["generation"]:
            return obj
        return None
    try:
        return cluster.wait(f"{ns}/{name} at {n} ready replicas", check, timeout)
    except AssertionError:
        obj = cluster.qwd(name, ns)
        pods = cluster.get("pods", namespace=ns, selector=SERVER_LABELS.format(name=name))
        raise AssertionError(f"{ns}/{name} not at {n} ready replicas: spec.replicas={obj['spec'].get('replicas')} "
                             f"status={json.dumps(obj.get('status'))} pods={[p['status'].get('phase') for p in pods]}")


# ---- the API server's own validation ---------------------------------------------------------------------


@pytest.mark.parametrize("autoscaling, message", [
    ({"minReplicas": 3, "maxReplicas": 2}, "autoscaling.minReplicas must not be more than maxReplicas"),
    ({"maxReplicas": 2, "idleSecondsToZero": 60}, "autoscaling.idleSecondsToZero is only for minReplicas 0"),
    ({"maxReplicas": 2, "hosts": ["chat.example.com"]}, "autoscaling.hosts is only for minReplicas 0"),
    ({"minReplicas": 0, "maxReplicas": 2, "hosts": ["Not A Host"]}, "spec.autoscaling.hosts[0]"),
    ({"minReplicas": 1}, "spec.autoscaling.maxReplicas: Required value"),
    ({"maxReplicas": 2, "targetWaitingRequests": 0}, "should be greater than or equal to 1"),
    ({"maxReplicas": 2, "prometheus": {"address": "prometheus:9090"}}, "spec.autoscaling.prometheus.address"),
    ({"maxReplicas": 2, "scaleUpFast": True}, 'unknown field "spec.autoscaling.scaleUpFast"'),
])
def test_api_server_rejects_invalid_autoscaling(cluster, autoscaling, message):
    obj = demo("invalid", autoscaling=autoscaling)
    obj["metadata"]["namespace"] = "default"
    r = cluster.apply(obj, check=False)
    assert r.returncode != 0 and message in r.stderr, r.stderr


def test_api_server_rejects_an_inference_pool_without_a_picker_name(cluster):
    obj = demo("invalid", gateway={"inferencePool": {"enabled": True, "endpointPickerRef": {"port": 9002}}})
    obj["metadata"]["namespace"] = "default"
    r = cluster.apply(obj, check=False)
    assert r.returncode != 0 and "spec.gateway.inferencePool.endpointPickerRef.name: Required value" in r.stderr


# ---- KEDA's ScaledObject, the scale subresource, and removal --------------------------------------------


def test_scaled_object_targets_the_deployment_and_scale_writes_become_pods(cluster, operator):
    ns = cluster.namespace("autoscale")
    cluster.apply(autoscaled(targetWaitingRequests=6, targetRunningRequests=12, scaleDownDelaySeconds=120,
                             pollingIntervalSeconds=5), ns)
    qwd = cluster.wait_phase("demo", ns, "Ready")
    so = cluster.wait("the ScaledObject", lambda: cluster.get("scaledobject", "demo", ns))
    assert owned_by(so, qwd)
    assert so["metadata"]["labels"]["app.kubernetes.io/component"] == "autoscaling"
    spec = so["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "qwen-operator.io/v1alpha1", "kind": "QwenDeployment",
                                      "name": "demo"}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"], spec["pollingInterval"]) == (1, 3, 5)
    assert "cooldownPeriod" not in spec  # only to scale to zero
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"] == \
        {"stabilizationWindowSeconds": 120}
    triggers = {t["name"]: t for t in spec["triggers"]}
    assert set(triggers) == {"waiting", "running"} and all(t["type"] == "prometheus" for t in triggers.values())
    assert triggers["waiting"]["metadata"] == {
        "serverAddress": PROM, "query": f'sum(qwen_requests_waiting{{namespace="{ns}",service="demo"}})',
        "threshold": "6", "activationThreshold": "0"}
    assert triggers["running"]["metadata"]["threshold"] == "12"
    assert cluster.get("interceptorroute", "demo", ns) is None and cluster.get("service", "demo-interceptor", ns) is None
    # no KEDA operator runs: the condition says it waits for one
    assert wait_condition(cluster, "demo", ns, "Autoscaling", "WaitingForKEDA")["status"] == "Unknown"

    # the scale subresource, written as KEDA's HPA writes it, becomes pods; the pod template stays the same
    rs_before = {r["metadata"]["name"] for r in cluster.get("replicasets", namespace=ns,
                                                             selector=SERVER_LABELS.format(name="demo"))}
    write_scale_as_keda(cluster, ns, "demo", 3)
    wait_replicas(cluster, ns, "demo", 3)
    assert scale(cluster, ns, "demo")["status"]["replicas"] == 3
    rs_after = {r["metadata"]["name"] for r in cluster.get("replicasets", namespace=ns,
                                                            selector=SERVER_LABELS.format(name="demo"))}
    assert rs_after == rs_before, "scaling rolled the pods out"
    # what a person sees: the replicas KEDA decided and the bounds
    wide = cluster.kubectl("get", "qwd", "demo", "-n", ns, "-o", "wide").stdout.splitlines()
    row = dict(zip(wide[0].split(), wide[1].split()))
    assert (row["REPLICAS"], row["READY"], row["MIN"], row["MAX"]) == ("3", "3", "1", "3")
    cluster.kubectl("scale", "qwd/demo", "-n", ns, "--replicas=2")
    wait_replicas(cluster, ns, "demo", 2)

    # KEDA's word on its ScaledObject is carried into the condition
    so = cluster.get("scaledobject", "demo", ns)
    so["status"] = {"conditions": [
        {"type": "Ready", "status": "False", "reason": "ScaledObjectCheckFailed",
         "message": "ScaledObject doesn't have correct Idle/Min/Max Replica Counts specification"},
        {"type": "Active", "status": "False", "reason": "ScalerNotActive", "message": ""}]}
    cluster.kubectl("replace", "--subresource=status", "-n", ns, "-f", "-", input=json.dumps(so))
    c = wait_condition(cluster, "demo", ns, "Autoscaling", "ScaledObjectNotReady")
    assert c["status"] == "False" and "Idle/Min/Max Replica Counts" in c["message"]
    so = cluster.get("scaledobject", "demo", ns)
    so["status"]["conditions"] = [{"type": "Ready", "status": "True", "reason": "ScaledObjectReady", "message": ""},
                                  {"type": "Active", "status": "True", "reason": "ScalerActive", "message": ""}]
    cluster.kubectl("replace", "--subresource=status", "-n", ns, "-f", "-", input=json.dumps(so))
    c = wait_condition(cluster, "demo", ns, "Autoscaling", "Active")
    assert c["status"] == "True" and "between 1 and 3 replicas" in c["message"]

    # a new bound is applied to the ScaledObject; removing spec.autoscaling removes it, and replicas stay
    cluster.apply(autoscaled(maxReplicas=5, pollingIntervalSeconds=5), ns)
    cluster.wait("maxReplicaCount 5", lambda: cluster.get("scaledobject", "demo", ns)["spec"]["maxReplicaCount"] == 5)
    plain = demo()
    plain["spec"]["replicas"] = 2
    cluster.apply(plain, ns)
    cluster.wait("the ScaledObject to go", lambda: cluster.get("scaledobject", "demo", ns) is None)
    wait_condition(cluster, "demo", ns, "Autoscaling", None)
    wait_replicas(cluster, ns, "demo", 2)


def test_scale_from_zero_goes_through_the_http_add_on(cluster, operator):
    ns = cluster.namespace("zero")
    cluster.apply(autoscaled(minReplicas=0, maxReplicas=4, idleSecondsToZero=90, hosts=["chat.example.com"],
                             targetWaitingRequests=3), ns)
    qwd = cluster.wait_phase("demo", ns, "Ready")
    route = cluster.wait("the InterceptorRoute", lambda: cluster.get("interceptorroute", "demo", ns))
    assert owned_by(route, qwd)
    hosts = ["demo-interceptor", f"demo-interceptor.{ns}", f"demo-interceptor.{ns}.svc",
             f"demo-interceptor.{ns}.svc.cluster.local", "chat.example.com"]
    assert route["spec"]["target"] == {"service": "demo", "portName": "http"}
    assert route["spec"]["rules"] == [{"hosts": hosts}]
    assert route["spec"]["scalingMetric"] == {"concurrency": {"targetValue": 16 + 3}}  # a batch and the queue
    assert route["spec"]["timeouts"]["responseHeader"] == "600s"
    svc = cluster.get("service", "demo-interceptor", ns)
    assert owned_by(svc, qwd) and svc["spec"]["type"] == "ExternalName"
    assert svc["spec"]["externalName"] == "keda-add-ons-http-interceptor-proxy.keda.svc.cluster.local"
    so = cluster.get("scaledobject", "demo", ns)
    assert (so["spec"]["minReplicaCount"], so["spec"]["cooldownPeriod"]) == (0, 90)
    http = next(t for t in so["spec"]["triggers"] if t["type"] == "external-push")
    assert http["metadata"] == {"scalerAddress": "keda-add-ons-http-external-scaler.keda:9090",
                                "interceptorRoute": "demo"}
    # the route points at the Service that selects the server pods, by its port name
    target = cluster.get("service", route["spec"]["target"]["service"], ns)
    assert [p["name"] for p in target["spec"]["ports"]] == [route["spec"]["target"]["portName"]]
    ep = cluster.wait("the endpoint through the interceptor",
                      lambda: cluster.qwd("demo", ns)["status"].get("endpoint", "").startswith("http://demo-interceptor"))
    assert ep and cluster.qwd("demo", ns)["status"]["endpoint"] == f"http://demo-interceptor.{ns}.svc:8080/v1"

    # KEDA takes it to zero when idle, and back
    write_scale_as_keda(cluster, ns, "demo", 0)
    zero = cluster.wait("zero replicas", lambda: (q := cluster.qwd("demo", ns))["status"].get("reason") == "ScaledToZero"
                        and q["status"]["replicas"] == 0 and q)
    assert zero["status"]["phase"] == "Ready"
    assert {c["type"]: c["reason"] for c in zero["status"]["conditions"]}["Available"] == "ScaledToZero"
    assert not cluster.get("pods", namespace=ns, selector=SERVER_LABELS.format(name="demo"))
    write_scale_as_keda(cluster, ns, "demo", 1)
    wait_replicas(cluster, ns, "demo", 1)

    # a routing change reaches the route
    cluster.apply(autoscaled(minReplicas=0, maxReplicas=4, idleSecondsToZero=90, hosts=["chat2.example.com"],
                             targetWaitingRequests=3), ns)
    cluster.wait("the new host", lambda: "chat2.example.com" in cluster.get("interceptorroute", "demo", ns)["spec"]["rules"][0]["hosts"])

    # an HTTP add-on older than InterceptorRoute: an HTTPScaledObject that leaves the ScaledObject to the operator
    remove_crds(cluster, "interceptorroutes.http.keda.sh")
    try:
        hso = cluster.wait("the HTTPScaledObject", lambda: cluster.get("httpscaledobject", "demo", ns), timeout=60)
        assert owned_by(hso, qwd)
        assert hso["metadata"]["annotations"]["httpscaledobject.keda.sh/skip-scaledobject-creation"] == "true"
        assert hso["spec"]["scaleTargetRef"] == {"apiVersion": "qwen-operator.io/v1alpha1", "kind": "QwenDeployment",
                                                 "name": "demo", "service": "demo", "portName": "http"}
        assert hso["spec"]["hosts"][:4] == hosts[:4] and hso["spec"]["replicas"] == {"min": 0, "max": 4}
        cluster.wait("the trigger to name it", lambda: next(
            t for t in cluster.get("scaledobject", "demo", ns)["spec"]["triggers"] if t["type"] == "external-push"
        )["metadata"].get("httpScaledObject") == "demo")
        cluster.apply(autoscaled(minReplicas=0, maxReplicas=4, idleSecondsToZero=90, hosts=["chat3.example.com"],
                                 targetWaitingRequests=3), ns)
        cluster.wait("the new host", lambda: "chat3.example.com" in cluster.get("httpscaledobject", "demo", ns)["spec"]["hosts"])
    finally:
        install_crds(cluster, "interceptorroutes.http.keda.sh")
    # with InterceptorRoute back, it is preferred and the HTTPScaledObject goes
    cluster.wait("the InterceptorRoute back", lambda: cluster.get("interceptorroute", "demo", ns) is not None
                 and cluster.get("httpscaledobject", "demo", ns) is None, timeout=60)

    # a floor of one: the HTTP add-on's objects go, and clients call the Service itself again
    cluster.apply(autoscaled(minReplicas=1, maxReplicas=4), ns)
    cluster.wait("the HTTP add-on's objects to go", lambda: cluster.get("interceptorroute", "demo", ns) is None
                 and cluster.get("service", "demo-interceptor", ns) is None)
    cluster.wait("the plain endpoint", lambda: cluster.qwd("demo", ns)["status"]["endpoint"] == f"http://demo.{ns}.svc:8000/v1")
    so = cluster.get("scaledobject", "demo", ns)
    assert so["spec"]["minReplicaCount"] == 1 and [t["type"] for t in so["spec"]["triggers"]] == ["prometheus"]


def test_missing_crds_are_reported_and_everything_else_works(cluster, operator):
    ns = cluster.namespace("nokeda")
    pool = {"inferencePool": {"enabled": True}}
    obj = autoscaled(minReplicas=0, maxReplicas=2)
    obj["spec"]["gateway"] = pool
    http = ["interceptorroutes.http.keda.sh", "httpscaledobjects.http.keda.sh"]
    remove_crds(cluster, *http)
    try:
        cluster.apply(obj, ns)
        cluster.wait_phase("demo", ns, "Ready")
        # without the HTTP add-on, KEDA keeps a floor of one replica: a deployment at zero could not wake
        c = wait_condition(cluster, "demo", ns, "Autoscaling", "HTTPAddOnMissing")
        assert c["status"] == "False" and "between 1 and 2 replicas" in c["message"]
        so = cluster.get("scaledobject", "demo", ns)
        assert so["spec"]["minReplicaCount"] == 1 and "cooldownPeriod" not in so["spec"]
        assert [t["type"] for t in so["spec"]["triggers"]] == ["prometheus"]
        assert cluster.get("service", "demo-interceptor", ns) is None

        remove_crds(cluster, "scaledobjects.keda.sh", "inferencepools.inference.networking.k8s.io")
        try:
            c = wait_condition(cluster, "demo", ns, "Autoscaling", "KEDACRDsMissing")
            assert c["status"] == "False" and "replicas stay at spec.replicas (1)" in c["message"]
            c = wait_condition(cluster, "demo", ns, "InferencePool", "InferencePoolCRDMissing")
            assert c["status"] == "False"
            st = cluster.wait_phase("demo", ns, "Ready")["status"]
            assert st["readyReplicas"] == 1
            # the pods were never replaced
            assert len(cluster.get("replicasets", namespace=ns, selector=SERVER_LABELS.format(name="demo"))) == 1
            reasons = {e["reason"] for e in cluster.events(ns, "demo") if e["type"] == "Warning"}
            assert {"HTTPAddOnMissing", "KEDACRDsMissing", "InferencePoolCRDMissing"} <= reasons
        finally:
            install_crds(cluster, "scaledobjects.keda.sh", "inferencepools.inference.networking.k8s.io")
    finally:
        install_crds(cluster, *http)
    # once they are installed, the objects follow
    cluster.wait("the objects", lambda: cluster.get("interceptorroute", "demo", ns) is not None
                 and cluster.get("inferencepool", "demo", ns) is not None, timeout=60)
    assert cluster.get("scaledobject", "demo", ns)["spec"]["minReplicaCount"] == 0
    assert wait_condition(cluster, "demo", ns, "InferencePool", "Applied")["status"] == "True"


def test_without_a_prometheus_address_no_scaled_object_is_made(cluster, operator):
    ns = cluster.namespace("noprom")
    obj = autoscaled()
    del obj["spec"]["autoscaling"]["prometheus"]
    cluster.apply(obj, ns)
    cluster.wait_phase("demo", ns, "Ready")
    c = wait_condition(cluster, "demo", ns, "Autoscaling", "PrometheusAddressMissing")
    assert c["status"] == "False" and "autoscaling.prometheus.address" in c["message"]
    assert cluster.get("scaledobject", "demo", ns) is None


# ---- InferencePool -------------------------------------------------------------------------------------------


def test_inference_pool_selects_the_server_pods_and_port(cluster, operator):
    ns = cluster.namespace("pool")
    obj = demo(replicas=2, cache={"size": "1Gi", "accessMode": "ReadWriteMany"},
               gateway={"inferencePool": {"enabled": True, "endpointPickerRef": {"name": "demo-epp"}}})
    cluster.apply(obj, ns)
    qwd = cluster.wait_phase("demo", ns, "Ready")
    pool = cluster.wait("the InferencePool", lambda: cluster.get("inferencepool", "demo", ns))
    assert owned_by(pool, qwd)
    assert pool["spec"]["endpointPickerRef"] == {"group": "", "kind": "Service", "name": "demo-epp",
                                                 "port": {"number": 9002}, "failureMode": "FailClose"}
    selector = ",".join(f"{k}={v}" for k, v in pool["spec"]["selector"]["matchLabels"].items())
    selected = cluster.get("pods", namespace=ns, selector=selector)
    servers = cluster.get("pods", namespace=ns, selector=SERVER_LABELS.format(name="demo"))
    assert len(selected) == 2 and {p["metadata"]["name"] for p in selected} == {p["metadata"]["name"] for p in servers}
    ports = {p["containerPort"] for p in selected[0]["spec"]["containers"][0]["ports"]}
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [8000] and 8000 in ports
    c = wait_condition(cluster, "demo", ns, "InferencePool", "Applied")
    assert c["status"] == "True"
    moved = copy.deepcopy(obj)
    moved["spec"]["gateway"]["inferencePool"]["endpointPickerRef"]["port"] = 9003
    cluster.apply(moved, ns)
    cluster.wait("the picker's new port", lambda: cluster.get("inferencepool", "demo", ns)["spec"]
                 ["endpointPickerRef"]["port"] == {"number": 9003})
    # switched off, it goes
    off = copy.deepcopy(obj)
    off["spec"]["gateway"] = {"inferencePool": {"enabled": False}}
    cluster.apply(off, ns)
    cluster.wait("the InferencePool to go", lambda: cluster.get("inferencepool", "demo", ns) is None)
    wait_condition(cluster, "demo", ns, "InferencePool", None)


def test_optional_crds_are_installed_from_their_modules(cluster):
    for name in OPTIONAL_CRDS:
        crd = cluster.get("crd", name)
        assert {c["type"]: c["status"] for c in crd["status"]["conditions"]}["Established"] == "True", name


def test_the_autoscaled_example(cluster, operator):
    ns = cluster.namespace("example")
    obj = example("autoscaled")
    obj["spec"]["autoscaling"]["prometheus"] = {"address": PROM}
    cluster.apply(obj, ns)
    ready = cluster.wait_phase("chat", ns, "Ready", timeout=120)
    assert ready["status"]["endpoint"] == f"http://chat-interceptor.{ns}.svc:8080/v1"
    for kind in ("scaledobject", "interceptorroute", "inferencepool"):
        assert owned_by(cluster.get(kind, "chat", ns), ready), kind
    assert "replicas" not in example("autoscaled")["spec"]

"""Autoscaling and inference routing on pure data: KEDA's ScaledObject, the KEDA HTTP add-on's objects and the
InferencePool are valid against the CRDs their projects publish (fetched from their Go modules), say what the
spec asks, and scaling leaves the pods alone."""

from __future__ import annotations

import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from qwen_operator import builders
from qwen_operator.builders import OperatorDefaults, Owner
from qwen_operator.spec import QwenDeploymentSpec
from qwen_operator.status import Observed, derive_status

from .test_operator_status import deployment, job, pvc

ROOT = Path(__file__).resolve().parents[2]
OWNER = Owner("chat", "team-a", "0c7f6a1e-1111-2222-3333-444455556666")
DEFAULTS = OperatorDefaults(image="registry.example/qwen-inference:1", prometheus_address="http://prom.mon:9090")
NO_PROM = OperatorDefaults(image="registry.example/qwen-inference:1")


def spec(**kw) -> QwenDeploymentSpec:
    kw.setdefault("model", {"name": "Qwen/Qwen2.5-0.5B-Instruct"})
    return QwenDeploymentSpec.model_validate(kw)


def scaling(**a) -> QwenDeploymentSpec:
    a.setdefault("maxReplicas", 4)
    return spec(autoscaling=a)


def crd_schema(which: str, file: str, version: str) -> dict:
    r = subprocess.run([str(ROOT / "scripts" / "k8s-bin"), "crds", which], capture_output=True, text=True, check=True)
    doc = yaml.safe_load((Path(r.stdout.strip()) / file).read_text())
    return next(v for v in doc["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]


def validate(obj: dict, which: str, file: str) -> None:
    schema = crd_schema(which, file, obj["apiVersion"].split("/")[1])
    jsonschema.Draft7Validator(schema).validate(obj)
    # properties the CRD does not know would be pruned by the API server: none may be sent
    def walk(o, s, path):
        if isinstance(o, dict) and s.get("type") == "object" and "properties" in s:
            for k, v in o.items():
                assert k in s["properties"] or path == "" and k in ("apiVersion", "kind", "metadata"), f"{path}.{k}"
                if k in s["properties"]:
                    walk(v, s["properties"][k], f"{path}.{k}")
        elif isinstance(o, list) and "items" in s:
            for i, v in enumerate(o):
                walk(v, s["items"], f"{path}[{i}]")
    walk(obj, schema, "")


def triggers(so: dict) -> dict:
    return {t["name"]: t for t in so["spec"]["triggers"]}


# ---- KEDA's ScaledObject -------------------------------------------------------------------------------


def test_scaled_object_targets_the_qwendeployment_on_queue_depth():
    s = scaling(minReplicas=2, maxReplicas=6, targetWaitingRequests=5, scaleDownDelaySeconds=60)
    so = builders.build_scaled_object(OWNER, s, DEFAULTS, http_add_on="InterceptorRoute")
    validate(so, "keda", "keda.sh_scaledobjects.yaml")
    assert so["metadata"]["name"] == "chat" and so["metadata"]["namespace"] == "team-a"
    assert so["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid
    assert so["spec"]["scaleTargetRef"] == {"apiVersion": "qwen-operator.io/v1alpha1", "kind": "QwenDeployment",
                                            "name": "chat"}
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"], so["spec"]["pollingInterval"]) == (2, 6, 15)
    assert "cooldownPeriod" not in so["spec"]
    assert so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"] == \
        {"stabilizationWindowSeconds": 60}
    t = triggers(so)
    assert list(t) == ["waiting"]  # a floor above zero needs no HTTP add-on
    assert t["waiting"]["type"] == "prometheus"
    assert t["waiting"]["metadata"] == {"serverAddress": "http://prom.mon:9090",
                                        "query": 'sum(qwen_requests_waiting{namespace="team-a",service="chat"})',
                                        "threshold": "5", "activationThreshold": "0"}


def test_running_requests_add_a_trigger_and_the_spec_address_wins():
    s = scaling(targetRunningRequests=12, prometheus={"address": "https://thanos.example:9091"})
    t = triggers(builders.build_scaled_object(OWNER, s, DEFAULTS, None))
    assert list(t) == ["waiting", "running"]
    assert t["running"]["metadata"]["query"] == 'sum(qwen_requests_running{namespace="team-a",service="chat"})'
    assert t["running"]["metadata"]["threshold"] == "12"
    assert {x["metadata"]["serverAddress"] for x in t.values()} == {"https://thanos.example:9091"}


@pytest.mark.parametrize("add_on, key", [("InterceptorRoute", "interceptorRoute"),
                                         ("HTTPScaledObject", "httpScaledObject")])
def test_scale_from_zero_wakes_through_the_http_add_on(add_on, key):
    s = scaling(minReplicas=0, idleSecondsToZero=120)
    so = builders.build_scaled_object(OWNER, s, DEFAULTS, add_on)
    validate(so, "keda", "keda.sh_scaledobjects.yaml")
    assert (so["spec"]["minReplicaCount"], so["spec"]["cooldownPeriod"]) == (0, 120)
    t = triggers(so)
    assert t["http"] == {"type": "external-push", "name": "http",
                         "metadata": {"scalerAddress": "keda-add-ons-http-external-scaler.keda:9090", key: "chat"}}
    assert builders.build_scaled_object(OWNER, scaling(minReplicas=0), DEFAULTS, add_on)["spec"]["cooldownPeriod"] == 300


def test_without_the_http_add_on_the_floor_is_one_replica():
    so = builders.build_scaled_object(OWNER, scaling(minReplicas=0), DEFAULTS, None)
    assert so["spec"]["minReplicaCount"] == 1 and "cooldownPeriod" not in so["spec"]
    assert list(triggers(so)) == ["waiting"]


def test_no_scaled_object_without_autoscaling_or_prometheus():
    assert builders.build_scaled_object(OWNER, spec(), DEFAULTS, "InterceptorRoute") is None
    assert builders.build_scaled_object(OWNER, scaling(), NO_PROM, None) is None
    assert builders.build_scaled_object(OWNER, scaling(prometheus={"address": "http://p:9090"}), NO_PROM, None)


# ---- the KEDA HTTP add-on ----------------------------------------------------------------------------------


def test_interceptor_route_holds_requests_for_a_cold_start():
    s = scaling(minReplicas=0, hosts=["chat.example.com", "chat-interceptor"], targetWaitingRequests=2)
    s = s.model_copy(update={"engine": s.engine.model_copy(update={"max_concurrency": 8,
                                                                    "request_timeout_seconds": 900})})
    route = builders.build_interceptor_route(OWNER, s, DEFAULTS)
    validate(route, "keda-http", "http.keda.sh_interceptorroutes.yaml")
    assert route["spec"]["target"] == {"service": "chat", "portName": "http"}
    assert route["spec"]["rules"] == [{"hosts": [
        "chat-interceptor", "chat-interceptor.team-a", "chat-interceptor.team-a.svc",
        "chat-interceptor.team-a.svc.cluster.local", "chat.example.com"]}]
    assert route["spec"]["scalingMetric"] == {"concurrency": {"targetValue": 10}}
    # a cold start may take the startup probe's whole budget; a reply that is not streamed sends its headers last
    probe = template(s)["spec"]["containers"][0]["startupProbe"]
    readiness = int(route["spec"]["timeouts"]["readiness"].removesuffix("s"))
    assert readiness >= probe["periodSeconds"] * probe["failureThreshold"] + 60
    assert route["spec"]["timeouts"]["responseHeader"] == "900s"


def test_http_scaled_object_leaves_the_scaled_object_to_the_operator():
    s = scaling(minReplicas=0, maxReplicas=3)
    hso = builders.build_http_scaled_object(OWNER, s, DEFAULTS)
    validate(hso, "keda-http", "http.keda.sh_httpscaledobjects.yaml")
    assert hso["metadata"]["annotations"]["httpscaledobject.keda.sh/skip-scaledobject-creation"] == "true"
    assert hso["spec"]["scaleTargetRef"] == {"apiVersion": "qwen-operator.io/v1alpha1", "kind": "QwenDeployment",
                                             "name": "chat", "service": "chat", "portName": "http"}
    assert hso["spec"]["replicas"] == {"min": 0, "max": 3}
    route = builders.build_interceptor_route(OWNER, s, DEFAULTS)
    assert hso["spec"]["timeouts"] == {"conditionWait": route["spec"]["timeouts"]["readiness"],
                                       "responseHeader": "600s"}


def test_interceptor_service_is_a_name_for_the_interceptor():
    d = OperatorDefaults(interceptor_host="interceptor.keda-system.svc.example.org", interceptor_port=9080,
                         cluster_domain="example.org")
    svc = builders.build_interceptor_service(OWNER, scaling(minReplicas=0), d)
    kubernetes_validate.validate(svc, "1.37.0", strict=True)
    assert svc["metadata"]["name"] == "chat-interceptor"
    assert svc["spec"] == {"type": "ExternalName", "externalName": "interceptor.keda-system.svc.example.org",
                           "ports": [{"name": "http", "port": 9080, "protocol": "TCP"}]}
    assert builders.interceptor_hosts(OWNER, scaling(minReplicas=0), d)[-1] == "chat-interceptor.team-a.svc.example.org"


def test_http_add_on_objects_only_to_scale_from_zero():
    for s in (spec(), scaling(minReplicas=1)):
        assert builders.build_interceptor_route(OWNER, s, DEFAULTS) is None
        assert builders.build_http_scaled_object(OWNER, s, DEFAULTS) is None
        assert builders.build_interceptor_service(OWNER, s, DEFAULTS) is None


# ---- InferencePool ----------------------------------------------------------------------------------------


def test_inference_pool_selects_the_server_pods():
    s = spec(gateway={"inferencePool": {"enabled": True, "endpointPickerRef": {"name": "chat-epp",
                                                                                "failureMode": "FailOpen"}}})
    pool = builders.build_inference_pool(OWNER, s)
    validate(pool, "inference", "inference.networking.k8s.io_inferencepools.yaml")
    dep = builders.build_deployment(OWNER, s, DEFAULTS, builders.model_key(s))
    assert pool["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    port = dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    assert pool["spec"]["targetPorts"] == [{"number": port}]
    assert pool["spec"]["endpointPickerRef"] == {"kind": "Service", "name": "chat-epp", "port": {"number": 9002},
                                                 "failureMode": "FailOpen"}
    bare = builders.build_inference_pool(OWNER, spec(gateway={"inferencePool": {"enabled": True}}))
    validate(bare, "inference", "inference.networking.k8s.io_inferencepools.yaml")
    assert "endpointPickerRef" not in bare["spec"]
    assert builders.build_inference_pool(OWNER, spec()) is None


# ---- scaling leaves the pods alone --------------------------------------------------------------------------


def template(s: QwenDeploymentSpec) -> dict:
    return builders.build_deployment(OWNER, s, DEFAULTS, builders.model_key(s))["spec"]["template"]


def test_scaling_never_changes_the_pod_template():
    # what KEDA or `kubectl scale` changes: spec.replicas; and the autoscaling bounds themselves
    base = scaling(minReplicas=0, maxReplicas=4)
    for replicas in (0, 1, 3):
        assert template(base.model_copy(update={"replicas": replicas})) == template(base)
    assert template(scaling(minReplicas=1, maxReplicas=4, targetWaitingRequests=9)) == template(base)
    # a single-node cache: several replicas share a node whenever the spec allows several, even at one now
    aff = template(base)["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert aff[0]["topologyKey"] == "kubernetes.io/hostname"
    assert "affinity" not in template(scaling(maxReplicas=1))["spec"]
    plain = spec(replicas=2)
    assert template(plain.model_copy(update={"replicas": 5})) == template(plain)
    assert template(spec(gateway={"inferencePool": {"enabled": True}})) == template(spec())


# ---- the conditions ---------------------------------------------------------------------------------------------


def status(s: QwenDeploymentSpec, **obs) -> dict:
    return derive_status(OWNER, Observed(generation=1, spec=s, now="t", pvc=pvc(), service={"metadata": {}},
                                         jobs=[job("done", builders.job_name(OWNER, builders.model_key(s)))],
                                         deployment=deployment(key=builders.model_key(s)), **obs))


def conds(st: dict) -> dict:
    return {c["type"]: c for c in st["conditions"]}


def so_status(*conditions: tuple[str, str, str]) -> dict:
    return {"status": {"conditions": [{"type": t, "status": v, "message": m} for t, v, m in conditions]}}


@pytest.mark.parametrize("obs, status_, reason, words", [
    (dict(autoscaling="keda-missing"), "False", "KEDACRDsMissing", "replicas stay at spec.replicas (1)"),
    (dict(autoscaling="no-prometheus"), "False", "PrometheusAddressMissing", "autoscaling.prometheus.address"),
    (dict(autoscaling="http-missing"), "False", "HTTPAddOnMissing", "between 1 and 4 replicas"),
    (dict(autoscaling="applied"), "Unknown", "WaitingForKEDA", "is the KEDA operator running"),
    (dict(autoscaling="applied", scaled_object=so_status(("Ready", "Unknown", "Some triggers defined in "
                                                          "ScaledObject are not working correctly"))),
     "Unknown", "WaitingForKEDA", "KEDA: Some triggers defined in ScaledObject are not working correctly; KEDA "),
    (dict(autoscaling="applied", scaled_object=so_status(("Ready", "False", "no metrics: connection refused"))),
     "False", "ScaledObjectNotReady", "KEDA: no metrics: connection refused"),
    (dict(autoscaling="applied", scaled_object=so_status(("Ready", "True", ""), ("Active", "True", ""))),
     "True", "Active", "between 0 and 4 replicas, aiming at 4 waiting requests per replica"),
    (dict(autoscaling="applied", scaled_object=so_status(("Ready", "True", ""), ("Active", "False", ""))),
     "True", "Idle", "no load now"),
])
def test_autoscaling_condition(obs, status_, reason, words):
    st = status(scaling(minReplicas=0), **obs)
    c = conds(st)["Autoscaling"]
    assert (c["status"], c["reason"]) == (status_, reason) and words in c["message"], c
    assert st["phase"] == "Ready"  # autoscaling problems never stop serving


def test_conditions_only_when_asked_for_and_the_endpoint_through_the_interceptor():
    st = status(spec())
    assert "Autoscaling" not in conds(st) and "InferencePool" not in conds(st)
    assert st["endpoint"] == "http://chat.team-a.svc:8000/v1"
    pool = spec(gateway={"inferencePool": {"enabled": True}})
    assert conds(status(pool, inference_pool="missing"))["InferencePool"]["reason"] == "InferencePoolCRDMissing"
    assert conds(status(pool, inference_pool="applied"))["InferencePool"]["status"] == "True"
    s = scaling(minReplicas=0)
    svc = builders.build_interceptor_service(OWNER, s, DEFAULTS)
    assert status(s, autoscaling="applied", interceptor=svc)["endpoint"] == \
        "http://chat-interceptor.team-a.svc:8080/v1"

"""The operator against a real API server, controllers, scheduler and kwok nodes."""

from __future__ import annotations

import copy
import json
import time

import pytest

from .conftest import example

SERVER_LABELS = "app.kubernetes.io/instance={name},app.kubernetes.io/component=server"


def owned_by(obj: dict, owner: dict) -> bool:
    return any(r["uid"] == owner["metadata"]["uid"] and r.get("controller")
               for r in obj["metadata"].get("ownerReferences", []))


def demo(name: str = "demo", **spec) -> dict:
    obj = copy.deepcopy(example("demo"))
    obj["metadata"]["name"] = name
    obj["spec"].update(spec)
    return obj


# ---- the CRD and the API server's own validation ---------------------------------------------------------


def test_crd_is_structural_and_established(cluster):
    crd = cluster.get("crd", "qwendeployments.qwen-operator.io")
    conds = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conds["Established"] == "True" and conds["NamesAccepted"] == "True"
    assert "NonStructuralSchema" not in conds
    out = cluster.kubectl("api-resources", "--api-group=qwen-operator.io").stdout
    assert "qwd" in out and "QwenDeployment" in out


@pytest.mark.parametrize("spec, message", [
    ({"model": {"name": "demo", "source": "demo"}, "gpus": 2}, "gpus is only for device 'gpu'"),
    ({"model": {"name": "demo"}}, "model.name 'demo' goes with model.source 'demo'"),
    ({"model": {"name": "qwen-without-org"}}, "a hub model name is org/name"),
    ({"model": {"name": "Qwen/X", "source": "pvc"}}, "model.source 'pvc' needs cache.existingClaim"),
    ({"model": {"name": "Qwen/X"}, "device": "tpu"}, 'Unsupported value: "tpu"'),
    ({"model": {"name": "Qwen/X"}, "replicas": -1}, "should be greater than or equal to 0"),
    ({"model": {"name": "Qwen/X"}, "engine": {"maxConcurrency": 0}}, "should be greater than or equal to 1"),
    ({"model": {"name": "Qwen/X"}, "cache": {"size": "ten gigs"}}, "spec.cache.size"),
    ({"model": {"name": "bad name!"}}, "spec.model.name"),
    ({}, "spec.model: Required value"),
    ({"model": {"name": "Qwen/X"}, "device": "gpu", "engine": {"quantize": "int8"}},
     "engine.quantize runs on device 'cpu' only"),
    ({"model": {"name": "Qwen/X"}, "engine": {"ropeScaling": {"ropeType": "linear", "factor": 2,
                                                              "originalMaxPositionEmbeddings": 4096}}},
     "engine.ropeScaling.originalMaxPositionEmbeddings goes with ropeType yarn only"),
    ({"model": {"name": "Qwen/X"}, "engine": {"ropeScaling": {"ropeType": "dynamic", "factor": 2}}},
     'spec.engine.ropeScaling.ropeType: Unsupported value: "dynamic"'),
])
def test_api_server_rejects_invalid_specs(cluster, spec, message):
    obj = {"apiVersion": "qwen-operator.io/v1alpha1", "kind": "QwenDeployment",
           "metadata": {"name": "invalid", "namespace": "default"}, "spec": spec}
    r = cluster.apply(obj, check=False)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr


def test_transition_rules(cluster):
    ns = cluster.namespace("rules")
    obj = demo("imm", cache={"size": "2Gi"})
    cluster.apply(obj, ns)
    changed = copy.deepcopy(obj)
    changed["spec"]["model"] = {"name": "Qwen/Qwen2.5-0.5B-Instruct", "source": "huggingface"}
    r = cluster.apply(changed, ns, check=False)
    assert r.returncode != 0 and "model.source is immutable" in r.stderr
    shrunk = copy.deepcopy(obj)
    shrunk["spec"]["cache"] = {"size": "1Gi"}
    r = cluster.apply(shrunk, ns, check=False)
    assert r.returncode != 0 and "cache.size may grow but not shrink" in r.stderr
    grown = copy.deepcopy(obj)
    grown["spec"]["cache"] = {"size": "3Gi"}
    assert cluster.apply(grown, ns, check=False).returncode == 0


def test_defaults_from_the_api_server_match_the_pydantic_model(cluster):
    from qwen_operator.spec import QwenDeploymentSpec

    ns = cluster.namespace("defaults")
    cluster.apply(demo("defaults", resources=None), ns)
    live = cluster.qwd("defaults", ns)["spec"]
    model = QwenDeploymentSpec.model_validate({"model": {"name": "demo", "source": "demo"}})
    expected = model.model_dump(by_alias=True, exclude_none=True, mode="json")
    expected["cache"]["size"] = "1Gi"  # set by the example
    assert live == expected


# ---- the examples ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, node_prefix, replicas", [
    ("demo", "cpu-node", 1), ("cpu-qwen2.5-0.5b", "cpu-node", 2), ("cpu-qwen3.5-2b", "cpu-node", 1),
    ("gpu-qwen2.5-7b", "gpu-node", 1)])
def test_examples_reach_ready_with_every_child(cluster, operator, name, node_prefix, replicas):
    ns = cluster.namespace("ex")
    obj = example(name)
    qname = obj["metadata"]["name"]
    cluster.apply(obj, ns)
    ready = cluster.wait_phase(qname, ns, "Ready", timeout=120)
    st = ready["status"]
    assert st["readyReplicas"] == replicas and st["replicas"] == replicas
    assert st["endpoint"] == f"http://{qname}.{ns}.svc:8000/v1"
    assert st["cache"]["ready"] is True and st["cache"]["claim"] == f"{qname}-cache"
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["CacheReady"]["status"] == "True" and conds["Available"]["status"] == "True"
    assert conds["Degraded"]["status"] == "False" and conds["Monitoring"]["status"] == "True"
    assert all(c["observedGeneration"] == ready["metadata"]["generation"] for c in conds.values())

    # every child, owned by the QwenDeployment (the retained cache excepted)
    pvc = cluster.get("pvc", f"{qname}-cache", ns)
    assert pvc["status"]["phase"] == "Bound" and not pvc["metadata"].get("ownerReferences")
    jobs = cluster.get("jobs", namespace=ns)
    assert len(jobs) == 1 and owned_by(jobs[0], ready)
    assert jobs[0]["status"].get("succeeded") == 1
    for kind in ("deployment", "service", "servicemonitor", "prometheusrule"):
        child = cluster.get(kind, qname, ns)
        assert child is not None and owned_by(child, ready), kind
    pdb = cluster.get("pdb", qname, ns)
    assert (pdb is not None) == (replicas > 1)
    if pdb:
        assert owned_by(pdb, ready)
    svc = cluster.get("service", qname, ns)
    assert [p["name"] for p in svc["spec"]["ports"]] == ["http"]

    pods = cluster.get("pods", namespace=ns, selector=SERVER_LABELS.format(name=qname))
    assert len(pods) == replicas
    assert all(p["spec"]["nodeName"].startswith(node_prefix) for p in pods), [p["spec"]["nodeName"] for p in pods]
    if node_prefix == "gpu-node":
        limits = pods[0]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "2"

    # what a person sees
    table = cluster.kubectl("get", "qwendeployments", "-n", ns).stdout.splitlines()
    assert table[0].split() == ["NAME", "MODEL", "DEVICE", "REPLICAS", "READY", "PHASE", "AGE"]
    row = table[1].split()
    assert row[:6] == [qname, obj["spec"]["model"]["name"], obj["spec"].get("device", "cpu"), str(replicas),
                       str(replicas), "Ready"]
    wide = cluster.kubectl("get", "qwd", "-n", ns, "-o", "wide").stdout.splitlines()
    assert "ENDPOINT" in wide[0] and st["endpoint"] in wide[1]
    reasons = [e["reason"] for e in cluster.events(ns, qname)]
    assert "Ready" in reasons


def test_spec_update_rolls_and_scale_subresource(cluster, operator):
    ns = cluster.namespace("update")
    cluster.apply(demo(), ns)
    first = cluster.wait_phase("demo", ns, "Ready")
    dep = cluster.get("deployment", "demo", ns)
    old_hash = dep["spec"]["template"]["metadata"]["annotations"]["qwen-operator.io/spec-hash"]

    updated = demo(dtype="float32", engine={"maxConcurrency": 4, "maxQueue": 8})
    cluster.apply(updated, ns)
    second = cluster.wait_phase("demo", ns, "Ready")
    assert second["metadata"]["generation"] > first["metadata"]["generation"]
    assert second["status"]["observedGeneration"] == second["metadata"]["generation"]
    dep = cluster.get("deployment", "demo", ns)
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["QWEN_DTYPE"] == "float32" and env["QWEN_MAX_CONCURRENCY"] == "4" and env["QWEN_MAX_QUEUE"] == "8"
    assert dep["spec"]["template"]["metadata"]["annotations"]["qwen-operator.io/spec-hash"] != old_hash
    assert len(cluster.get("replicasets", namespace=ns, selector=SERVER_LABELS.format(name="demo"))) == 2

    cluster.kubectl("scale", "qwd/demo", "-n", ns, "--replicas=3")
    cluster.wait("3 ready replicas", lambda: (cluster.qwd("demo", ns)["status"].get("readyReplicas") == 3
                                             and cluster.qwd("demo", ns)["status"]["phase"] == "Ready"))
    assert cluster.get("deployment", "demo", ns)["spec"]["replicas"] == 3
    scale = json.loads(cluster.kubectl("get", "--raw",
                                       f"/apis/qwen-operator.io/v1alpha1/namespaces/{ns}/qwendeployments/demo/scale").stdout)
    assert scale["spec"]["replicas"] == 3 and scale["status"]["replicas"] == 3
    assert "app.kubernetes.io/instance=demo" in scale["status"]["selector"]
    assert cluster.get("pdb", "demo", ns) is not None  # more than one replica: a disruption budget
    cluster.kubectl("scale", "qwd/demo", "-n", ns, "--replicas=1")
    cluster.wait("the PDB to go", lambda: cluster.get("pdb", "demo", ns) is None)


def test_drift_is_undone(cluster, operator):
    ns = cluster.namespace("drift")
    cluster.apply(demo(), ns)
    cluster.wait_phase("demo", ns, "Ready")
    uid = cluster.get("service", "demo", ns)["metadata"]["uid"]
    cluster.kubectl("delete", "service", "demo", "-n", ns)
    back = cluster.wait("the Service to come back",
                        lambda: (s := cluster.get("service", "demo", ns)) and s["metadata"]["uid"] != uid and s)
    assert back["spec"]["ports"][0]["port"] == 8000
    cluster.kubectl("patch", "service", "demo", "-n", ns, "--type=json",
                    "-p", '[{"op": "replace", "path": "/spec/ports/0/port", "value": 9999}]')
    cluster.wait("the hand edit to be undone",
                 lambda: cluster.get("service", "demo", ns)["spec"]["ports"][0]["port"] == 8000, timeout=30)
    cluster.kubectl("delete", "deployment", "demo", "-n", ns)
    cluster.wait("the Deployment to come back", lambda: cluster.get("deployment", "demo", ns) is not None)
    cluster.wait_phase("demo", ns, "Ready")


def test_operator_restart_mid_reconcile_converges_without_duplicates(cluster, operator):
    ns = cluster.namespace("restart")
    operator.stop(kill=True)
    try:
        cluster.apply(demo(), ns)
        cluster.apply(demo("second"), ns)
    finally:
        operator.start()
    # kill it again while it works, then let it finish
    time.sleep(0.5)
    operator.stop(kill=True)
    operator.start()
    for name in ("demo", "second"):
        cluster.wait_phase(name, ns, "Ready")
    assert len(cluster.get("jobs", namespace=ns)) == 2
    assert len(cluster.get("deployments", namespace=ns)) == 2
    assert len(cluster.get("services", namespace=ns)) == 2
    assert len(cluster.get("pvc", namespace=ns)) == 2


def test_deletion_collects_children_and_keeps_a_retained_cache(cluster, operator):
    ns = cluster.namespace("delete")
    cluster.apply(demo("keep"), ns)
    cluster.apply(demo("drop", cache={"size": "1Gi", "retainOnDelete": False}), ns)
    for name in ("keep", "drop"):
        cluster.wait_phase(name, ns, "Ready")
    drop_pvc = cluster.get("pvc", "drop-cache", ns)
    assert drop_pvc["metadata"]["ownerReferences"][0]["kind"] == "QwenDeployment"
    cluster.kubectl("delete", "qwd", "keep", "drop", "-n", ns, "--wait=true", timeout=60)
    cluster.wait("children to be collected", lambda: not cluster.get("deployments", namespace=ns)
                 and not cluster.get("jobs", namespace=ns) and not cluster.get("services", namespace=ns)
                 and not cluster.get("servicemonitors", namespace=ns), timeout=60)
    cluster.wait("the unretained cache to go", lambda: cluster.get("pvc", "drop-cache", ns) is None
                 or cluster.get("pvc", "drop-cache", ns)["metadata"].get("deletionTimestamp"), timeout=60)
    assert cluster.get("pvc", "keep-cache", ns) is not None


def test_failed_fetch_ends_failed_with_the_last_log_line(cluster, operator):
    ns = cluster.namespace("fetchfail")
    obj = {"apiVersion": "qwen-operator.io/v1alpha1", "kind": "QwenDeployment", "metadata": {"name": "nope"},
           "spec": {"model": {"name": "qwen-test/unfetchable"}, "cache": {"size": "1Gi"},
                    "resources": {"requests": {"cpu": "100m", "memory": "1Gi"}}}}
    cluster.apply(obj, ns)
    failed = cluster.wait_phase("nope", ns, "Failed", timeout=120)
    st = failed["status"]
    assert st["reason"] == "DownloadFailed"
    assert "RepositoryNotFoundError: the model does not exist" in st["message"]
    cond = {c["type"]: c for c in st["conditions"]}
    assert cond["CacheReady"]["status"] == "False" and cond["CacheReady"]["reason"] == "DownloadFailed"
    assert cluster.get("deployment", "nope", ns) is None  # no pods before the cache is ready
    events = cluster.events(ns, "nope")
    assert any(e["type"] == "Warning" and e["reason"] == "DownloadFailed" for e in events)


def test_invalid_spec_past_the_schema_fails_once_without_a_retry_storm(cluster, operator):
    ns = cluster.namespace("invalid")
    obj = demo(resources={"requests": {"cpu": "4", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}})
    cluster.apply(obj, ns)
    failed = cluster.wait_phase("demo", ns, "Failed")
    assert failed["status"]["reason"] == "InvalidSpec"
    assert "resources.requests.cpu (4) is more than resources.limits.cpu (1)" in failed["status"]["message"]
    rv = failed["metadata"]["resourceVersion"]
    time.sleep(8)  # several resyncs
    assert cluster.qwd("demo", ns)["metadata"]["resourceVersion"] == rv
    assert len([e for e in cluster.events(ns, "demo") if e["reason"] == "InvalidSpec"]) == 1
    assert cluster.get("deployment", "demo", ns) is None
    # fixing the spec recovers
    cluster.apply(demo(), ns)
    cluster.wait_phase("demo", ns, "Ready")


@pytest.mark.parametrize("simulate, reason", [("oom", "OOMKilled"), ("crashloop", "CrashLoopBackOff")])
def test_failing_pods_make_it_degraded_with_the_reason(cluster, operator, simulate, reason):
    ns = cluster.namespace(simulate)
    cluster.apply(demo(podAnnotations={"qwen-test.io/simulate": simulate}), ns)
    degraded = cluster.wait_phase("demo", ns, "Degraded")
    assert degraded["status"]["reason"] == reason
    cond = {c["type"]: c for c in degraded["status"]["conditions"]}
    assert cond["Degraded"]["status"] == "True" and cond["Degraded"]["reason"] == reason


def test_unschedulable_pods_are_reported(cluster, operator):
    ns = cluster.namespace("sched")
    cluster.apply(demo(resources={"requests": {"cpu": "500", "memory": "1Gi"}, "limits": {"cpu": "500", "memory": "1Gi"}}), ns)
    degraded = cluster.wait_phase("demo", ns, "Degraded")
    assert degraded["status"]["reason"] == "Unschedulable"
    assert "Insufficient cpu" in degraded["status"]["message"]


def test_restricted_namespace_admits_the_pods(cluster, operator):
    ns = cluster.namespace("restricted", labels={"pod-security.kubernetes.io/enforce": "restricted",
                                                 "pod-security.kubernetes.io/enforce-version": "latest"})
    cluster.apply(demo(), ns)
    cluster.wait_phase("demo", ns, "Ready")
    # the fetch Job's pod was admitted too
    assert cluster.get("jobs", namespace=ns)[0]["status"].get("succeeded") == 1


def test_existing_claim_and_pvc_source(cluster, operator):
    ns = cluster.namespace("pvc")
    cluster.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "models"},
                   "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "10Gi"}}}}, ns)
    obj = {"apiVersion": "qwen-operator.io/v1alpha1", "kind": "QwenDeployment", "metadata": {"name": "prefilled"},
           "spec": {"model": {"name": "my-model", "source": "pvc", "path": "models/qwen"},
                    "cache": {"existingClaim": "models", "accessMode": "ReadWriteMany"},
                    "resources": {"requests": {"cpu": "1", "memory": "2Gi"}}}}
    cluster.apply(obj, ns)
    ready = cluster.wait_phase("prefilled", ns, "Ready")
    assert ready["status"]["cache"]["claim"] == "models"
    job = cluster.get("jobs", namespace=ns)[0]
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["verify", "/cache/models/qwen"]
    assert cluster.get("pvc", "prefilled-cache", ns) is None
    dep = cluster.get("deployment", "prefilled", ns)
    vol = dep["spec"]["template"]["spec"]["volumes"][0]
    assert vol["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}


def test_missing_existing_claim_is_pending_with_the_reason(cluster, operator):
    ns = cluster.namespace("noclaim")
    obj = {"apiVersion": "qwen-operator.io/v1alpha1", "kind": "QwenDeployment", "metadata": {"name": "x"},
           "spec": {"model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"}, "cache": {"existingClaim": "absent"}}}
    cluster.apply(obj, ns)
    pending = cluster.wait_phase("x", ns, "Pending")
    assert pending["status"]["reason"] == "ClaimNotFound"
    cluster.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "absent"},
                   "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Gi"}}}}, ns)
    cluster.wait_phase("x", ns, "Ready")


def test_model_change_keeps_serving_until_the_new_cache_is_ready(cluster, operator):
    ns = cluster.namespace("modelchange")
    obj = {"apiVersion": "qwen-operator.io/v1alpha1", "kind": "QwenDeployment", "metadata": {"name": "m"},
           "spec": {"model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"}, "cache": {"size": "5Gi"},
                    "resources": {"requests": {"cpu": "1", "memory": "2Gi"}}}}
    cluster.apply(obj, ns)
    cluster.wait_phase("m", ns, "Ready")
    obj["spec"]["model"] = {"name": "qwen-test/unfetchable"}
    cluster.apply(obj, ns)
    degraded = cluster.wait_phase("m", ns, "Degraded", timeout=120)
    assert degraded["status"]["reason"] == "DownloadFailed"
    assert "still serving Qwen/Qwen2.5-0.5B-Instruct@main" in degraded["status"]["message"]
    dep = cluster.get("deployment", "m", ns)
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["QWEN_MODEL"] == "/cache/Qwen--Qwen2.5-0.5B-Instruct/main"
    assert degraded["status"]["readyReplicas"] == 1
    obj["spec"]["model"] = {"name": "Qwen/Qwen2.5-1.5B-Instruct"}
    cluster.apply(obj, ns)
    cluster.wait_phase("m", ns, "Ready", timeout=120)
    dep = cluster.get("deployment", "m", ns)
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["QWEN_MODEL"] == "/cache/Qwen--Qwen2.5-1.5B-Instruct/main"
    names = [j["metadata"]["name"] for j in cluster.get("jobs", namespace=ns)]
    assert len(names) == 1  # superseded fetch Jobs are cleaned up

"""Every status transition, derived from children on pure data."""

from __future__ import annotations

import pytest

from qwen_operator import builders
from qwen_operator.builders import Owner
from qwen_operator.controller import parse_spec, subset
from qwen_operator.spec import QwenDeploymentSpec
from qwen_operator.status import Observed, comparable, derive_status, last_log_line

OWNER = Owner("chat", "ns", "uid-1")
SPEC = QwenDeploymentSpec.model_validate({"model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"}, "replicas": 2})
KEY = builders.model_key(SPEC)
JOB = builders.job_name(OWNER, KEY)


def pvc(phase="Bound"):
    return {"metadata": {"name": "chat-cache"}, "status": {"phase": phase}}


def job(state=None, name=JOB):
    conds = {"done": [{"type": "Complete", "status": "True"}], "failed": [{"type": "Failed", "status": "True"}]}
    return {"metadata": {"name": name}, "status": {"conditions": conds.get(state, [])}}


def failed_pod(message="line one\nqwen-model: error: no such model\n"):
    return {"metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"phase": "Failed", "containerStatuses": [{"state": {"terminated": {
                "exitCode": 3, "reason": "Error", "message": message}}}]}}


def deployment(ready=2, updated=2, desired=2, generation=1, observed=1, key=KEY, replicas=None):
    return {"metadata": {"generation": generation, "annotations": {builders.ANNOTATION_MODEL_KEY: str(key)}},
            "spec": {"replicas": desired},
            "status": {"observedGeneration": observed, "readyReplicas": ready, "updatedReplicas": updated,
                       "replicas": desired if replicas is None else replicas}}


def pod(waiting=None, last=None, unschedulable=False):
    st: dict = {"containerStatuses": [{"state": {"waiting": {"reason": waiting}} if waiting else {"running": {}},
                                       "lastState": {"terminated": {"reason": last}} if last else {}}]}
    if unschedulable:
        st = {"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                              "message": "0/3 nodes are available: 3 Insufficient cpu."}]}
    return {"metadata": {"name": "chat-x"}, "status": st}


def status(**obs) -> dict:
    obs.setdefault("generation", 3)
    obs.setdefault("spec", SPEC)
    obs.setdefault("now", "2026-01-01T00:00:00Z")
    obs.setdefault("service", {"metadata": {}})
    return derive_status(OWNER, Observed(**obs))


def conds(st: dict) -> dict:
    return {c["type"]: (c["status"], c["reason"]) for c in st["conditions"]}


@pytest.mark.parametrize("obs, phase, reason", [
    (dict(spec=None, spec_error="spec.model: bad"), "Failed", "InvalidSpec"),
    (dict(pvc=None), "Pending", "CachePending"),
    (dict(pvc=pvc("Pending")), "Pending", "CachePending"),
    (dict(pvc=pvc(), jobs=[]), "Downloading", "Downloading"),
    (dict(pvc=pvc(), jobs=[job()]), "Downloading", "Downloading"),
    (dict(pvc=pvc(), jobs=[job()], job_pods=[pod(waiting="ImagePullBackOff")]), "Downloading", "ImagePullBackOff"),
    (dict(pvc=pvc(), jobs=[job("failed")], job_pods=[failed_pod()]), "Failed", "DownloadFailed"),
    (dict(pvc=pvc(), jobs=[job("done")]), "Starting", "Starting"),
    (dict(pvc=pvc(), jobs=[job("done")], deployment=deployment(ready=0, updated=2)), "Starting", "Starting"),
    (dict(pvc=pvc(), jobs=[job("done")], deployment=deployment(generation=2, observed=1)), "Starting", "RollingOut"),
    (dict(pvc=pvc(), jobs=[job("done")], deployment=deployment(ready=2, updated=1)), "Starting", "RollingOut"),
    (dict(pvc=pvc(), jobs=[job("done")], deployment=deployment()), "Ready", "Ready"),
    # the new pods are all ready, but a pod of the old revision still runs: not rolled out yet
    (dict(pvc=pvc(), jobs=[job("done")], deployment=deployment(ready=3, updated=2, replicas=3)), "Starting",
     "RollingOut"),
    (dict(pvc=pvc(), jobs=[job("done")], deployment=deployment(ready=1)), "Degraded", "ReplicasUnavailable"),
    (dict(pvc=pvc(), jobs=[job("done")], deployment=deployment(ready=1), pods=[pod(waiting="CrashLoopBackOff")]),
     "Degraded", "CrashLoopBackOff"),
    (dict(pvc=pvc(), jobs=[job("done")], deployment=deployment(ready=0), pods=[pod(last="OOMKilled",
                                                                                waiting="CrashLoopBackOff")]),
     "Degraded", "OOMKilled"),
    (dict(pvc=pvc(), jobs=[job("done")], deployment=deployment(ready=0), pods=[pod(waiting="ErrImagePull")]),
     "Degraded", "ImagePullBackOff"),
    (dict(pvc=pvc(), jobs=[job("done")], deployment=deployment(ready=0), pods=[pod(unschedulable=True)]),
     "Degraded", "Unschedulable"),
    (dict(pvc=pvc(), jobs=[job("done")], deployment=deployment(ready=0, updated=0, desired=0)), "Ready", "ScaledToZero"),
    # a new model downloads while the old one serves
    (dict(pvc=pvc(), jobs=[job()], deployment=deployment(key="huggingface:Qwen/Old@main")), "Downloading", "Downloading"),
    (dict(pvc=pvc(), jobs=[job("failed")], job_pods=[failed_pod()], deployment=deployment(key="huggingface:Qwen/Old@main")),
     "Degraded", "DownloadFailed"),
])
def test_phases(obs, phase, reason):
    st = status(**obs)
    assert (st["phase"], st["reason"]) == (phase, reason), st["message"]
    c = conds(st)
    assert c["Degraded"][0] == ("True" if phase in ("Degraded", "Failed") else "False")
    assert c["Progressing"][0] == ("True" if phase in ("Pending", "Downloading", "Starting") else "False")
    assert st["observedGeneration"] == 3
    assert all(x["observedGeneration"] == 3 for x in st["conditions"])


def test_failed_download_message_carries_the_last_log_line():
    st = status(pvc=pvc(), jobs=[job("failed")], job_pods=[failed_pod()])
    assert st["message"].endswith("qwen-model: error: no such model")
    assert conds(st)["CacheReady"] == ("False", "DownloadFailed")
    still = status(pvc=pvc(), jobs=[job("failed")], job_pods=[failed_pod()],
                   deployment=deployment(key="huggingface:Qwen/Old@main"))
    assert "still serving Qwen/Old@main from huggingface" in still["message"]
    assert conds(still)["Available"][0] == "True"


def test_last_log_line_falls_back_to_the_exit_reason():
    p = failed_pod(message="")
    assert last_log_line([p]) == "the container ended with Error (exit code 3)"
    assert last_log_line([]) is None


def test_existing_claim_not_found():
    spec = QwenDeploymentSpec.model_validate({"model": {"name": "Qwen/X"}, "cache": {"existingClaim": "models"}})
    st = derive_status(OWNER, Observed(generation=1, spec=spec, now="t"))
    assert (st["phase"], st["reason"]) == ("Pending", "ClaimNotFound")


def test_monitoring_condition():
    assert conds(status(monitoring="missing"))["Monitoring"] == ("False", "MonitoringCRDsMissing")
    assert conds(status(monitoring="applied"))["Monitoring"] == ("True", "Applied")
    assert conds(status(monitoring="disabled"))["Monitoring"] == ("False", "Disabled")


def test_transition_times_hold_while_the_status_holds():
    first = status(pvc=pvc(), jobs=[job("done")], deployment=deployment(), now="2026-01-01T00:00:00Z")
    again = status(pvc=pvc(), jobs=[job("done")], deployment=deployment(), now="2026-01-01T01:00:00Z",
                   previous=first)
    assert again == first  # the same cluster state gives the same status
    lost = status(pvc=pvc(), jobs=[job("done")], deployment=deployment(ready=1), now="2026-01-01T02:00:00Z",
                  previous=first)
    times = {c["type"]: c["lastTransitionTime"] for c in lost["conditions"]}
    assert times["Degraded"] == "2026-01-01T02:00:00Z"
    assert times["CacheReady"] == "2026-01-01T00:00:00Z"
    assert comparable(first) != comparable(lost)


def test_status_fields():
    st = status(pvc=pvc(), jobs=[job("done")], deployment=deployment())
    assert st["endpoint"] == "http://chat.ns.svc:8000/v1"
    assert st["cache"] == {"claim": "chat-cache", "ready": True, "bytes": None,
                           "modelPath": "/cache/Qwen--Qwen2.5-0.5B-Instruct/main"}
    assert st["selector"] == "app.kubernetes.io/name=qwen-inference,app.kubernetes.io/instance=chat," \
                             "app.kubernetes.io/component=server"
    assert st["readyReplicas"] == 2 and st["model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    ok = {"metadata": {"name": JOB}, "status": {"succeeded": 1}}
    done_pod = {"metadata": {"name": "f"}, "status": {"containerStatuses": [{"state": {"terminated": {
        "exitCode": 0, "message": '{"path": "/cache/x", "bytes": 12345}'}}}]}}
    assert status(pvc=pvc(), jobs=[ok], job_pods=[done_pod], deployment=deployment())["cache"]["bytes"] == 12345


def test_parse_spec():
    spec, err = parse_spec({"model": {"name": "Qwen/X"}}, "chat")
    assert spec is not None and err is None
    spec, err = parse_spec({"model": {"name": "Qwen/X"}}, "x" * 43)
    assert spec is None and "at most 42" in err
    spec, err = parse_spec({"model": {}}, "chat")
    assert spec is None and err.startswith("spec.model.name")
    spec, err = parse_spec({"model": {"name": "Qwen/X"}, "resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}}, "c")
    assert spec is not None and "more than" in err


def test_subset():
    assert subset({"a": [1, {"b": "2"}]}, {"a": [1, {"b": 2, "c": 3}], "d": 4})
    assert not subset({"a": [1]}, {"a": [1, 2]})
    assert not subset({"ports": [{"port": 8000}]}, {"ports": [{"port": 9999}]})
    assert subset(None, None) and not subset({"x": 1}, None)


def test_download_progress_from_the_fetch_pods_last_progress_line():
    from qwen_inference.modelcache import progress_line

    log = "\n".join([
        "downloading Qwen/Qwen2.5-0.5B-Instruct@main from huggingface into /cache/...",
        progress_line(100_000_000, 1_000_000_000, 5e6),
        progress_line(250_000_000, 1_000_000_000, 12.5e6),
        "[1/9] config.json (0.0 MB)",
    ])
    st = status(pvc=pvc(), jobs=[job()], fetch_log=log)
    assert st["phase"] == "Downloading"
    assert st["download"] == {"bytes": 250_000_000, "totalBytes": 1_000_000_000, "bytesPerSecond": 12_500_000,
                              "etaSeconds": 60, "progress": "25% of 1.0 GB, 12.5 MB/s, ETA 1m"}
    # no total known (the modelscope fetcher): bytes and rate, no ETA
    st = status(pvc=pvc(), jobs=[job()], fetch_log=progress_line(3_500_000, None, 0.25e6))
    assert st["download"] == {"bytes": 3_500_000, "bytesPerSecond": 250_000, "progress": "3.5 MB, 0.2 MB/s"}
    # stalled: the rate is 0 and the time left unknown
    st = status(pvc=pvc(), jobs=[job()], fetch_log=progress_line(10, 100, 0.0))
    assert st["download"]["bytesPerSecond"] == 0 and "etaSeconds" not in st["download"]


@pytest.mark.parametrize("obs", [
    dict(pvc=pvc(), jobs=[job()], fetch_log=""),  # no line yet (or no log to read)
    dict(pvc=pvc(), jobs=[job()], fetch_log="progress: garbled"),
    dict(pvc=pvc(), jobs=[job("done")], fetch_log="progress: 1 of 2 bytes (50.0%), 1.00 MB/s, ETA 1s"),
    dict(pvc=pvc(), jobs=[job()], job_pods=[pod(waiting="ImagePullBackOff")],
         fetch_log="progress: 1 of 2 bytes (50.0%), 1.00 MB/s, ETA 1s"),
])
def test_no_download_progress_unless_a_fetch_is_under_way(obs):
    assert "download" not in status(**obs)


def test_a_crash_loop_says_how_the_container_last_ended():
    p = {"metadata": {"name": "chat-x"}, "status": {"containerStatuses": [{
        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s restarting failed container"}},
        "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                                     "message": "loading the model failed: bad config\n"}}}]}}
    st = status(pvc=pvc(), jobs=[job("done")], deployment=deployment(ready=0), pods=[p])
    assert st["phase"] == "Degraded" and st["reason"] == "CrashLoopBackOff"
    assert st["message"] == ("pod chat-x: CrashLoopBackOff: back-off 10s restarting failed container; the container "
                             "last exited with code 1: loading the model failed: bad config")


def test_a_server_that_cannot_serve_its_model_says_model_not_supported():
    """qwen-serve's exit code for an architecture it does not run (the contract's EXIT_MODEL_NOT_SUPPORTED),
    from the server container only, turns the crash loop into ModelNotSupported with the server's line."""
    from qwen_inference.contract import EXIT_MODEL_NOT_SUPPORTED

    def crashed(code, name="server"):
        line = "model not supported: model type 'qwen3_5_moe': not yet (supported: llama, qwen2)"
        return {"metadata": {"name": "chat-x"}, "status": {"containerStatuses": [{
            "name": name, "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}},
            "lastState": {"terminated": {"exitCode": code, "reason": "Error", "message": line + "\n"}}}]}}

    st = status(pvc=pvc(), jobs=[job("done")], deployment=deployment(ready=0), pods=[crashed(EXIT_MODEL_NOT_SUPPORTED)])
    assert st["phase"] == "Degraded" and st["reason"] == "ModelNotSupported"
    assert st["message"] == ("pod chat-x: model not supported: model type 'qwen3_5_moe': not yet (supported: "
                             "llama, qwen2)")
    for other in (crashed(1), crashed(EXIT_MODEL_NOT_SUPPORTED, name="sidecar")):
        st = status(pvc=pvc(), jobs=[job("done")], deployment=deployment(ready=0), pods=[other])
        assert st["reason"] == "CrashLoopBackOff"

"""The operator end to end with pods that really run (on the process node): the fetch Job runs `qwen-model`,
the servers run `qwen-serve` on the volume it filled, probes hit the real `/health`, and clients talk to the
addresses the Service's EndpointSlices list."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import threading
import time

import httpx
import openai
import pytest

from ..conftest import make_model
from ..hubserver import FakeHub
from .conftest import example, on_process_node

SERVER_LABELS = "app.kubernetes.io/instance={name},app.kubernetes.io/component=server"
RESOURCES = {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}


def qwd(name: str, **spec) -> dict:
    obj = copy.deepcopy(example("demo"))
    obj["metadata"]["name"] = name
    obj["spec"]["resources"] = copy.deepcopy(RESOURCES)
    obj["spec"].update(spec)
    on_process_node(obj["spec"])
    return obj


def server_pods(cluster, ns: str, name: str) -> list[dict]:
    return cluster.get("pods", namespace=ns, selector=SERVER_LABELS.format(name=name)) or []


def ready_addresses(cluster, ns: str, service: str) -> list[tuple[str, int]]:
    """(address, port) of the ready endpoints of the Service's port `http`, from its EndpointSlices."""
    out = []
    for sl in cluster.get("endpointslices", namespace=ns, selector=f"kubernetes.io/service-name={service}") or []:
        port = next((p["port"] for p in sl.get("ports") or [] if p.get("name") == "http"), None)
        for ep in sl.get("endpoints") or []:
            if (ep.get("conditions") or {}).get("ready") and port:
                out.extend((a, port) for a in ep["addresses"])
    return sorted(out)


def wait_ready_addresses(cluster, ns: str, service: str, count: int) -> list[tuple[str, int]]:
    """`ready_addresses` once the EndpointSlice controller lists `count` of them: it follows the pods' readiness
    (which the QwenDeployment's phase reports) on its own, a moment later."""
    return cluster.wait(f"{count} ready endpoints of {service}",
                        lambda: (lambda a: a if len(a) == count else None)(ready_addresses(cluster, ns, service)), 30,
                        0.2)


def container(p: dict, name: str) -> dict:
    return next(c for c in p["status"].get("containerStatuses") or [] if c["name"] == name)


def pid_of(p: dict, name: str) -> int:
    return int(container(p, name)["containerID"].split("://")[1])


def chat_stream(address: str, port: int, model: str, max_tokens: int = 16, progress: list | None = None,
                **extra) -> tuple[str, str, int]:
    """A streamed chat completion with the official client: (text, finish_reason, chunks). `progress` gets one
    item per chunk as it arrives."""
    client = openai.OpenAI(base_url=f"http://{address}:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    text, finish, chunks = "", None, 0
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello!"}],
                                            max_tokens=max_tokens, stream=True, extra_body=extra or None)
    for chunk in stream:
        chunks += 1
        if progress is not None:
            progress.append(1)
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish, chunks


def test_the_demo_really_serves_and_survives_a_killed_server(cluster, operator):
    ns = cluster.namespace("real-demo")
    cluster.apply(qwd("demo"), ns)
    st = cluster.wait_phase("demo", ns, "Ready", timeout=240)["status"]
    assert st["readyReplicas"] == 1 and st["cache"]["ready"] and st["cache"]["bytes"] > 0  # from the fetch Job
    job_pod = cluster.get("pods", namespace=ns, selector="app.kubernetes.io/component=fetch")[0]
    assert job_pod["status"]["phase"] == "Succeeded" and job_pod["spec"]["nodeName"] == "process-node-1"
    assert "ok: /cache/demo" in cluster.kubectl("logs", "-n", ns, job_pod["metadata"]["name"]).stdout

    (p,) = server_pods(cluster, ns, "demo")
    addresses = wait_ready_addresses(cluster, ns, "demo", 1)
    assert addresses == [(p["status"]["podIP"], 8000)]
    text, finish, chunks = chat_stream(*addresses[0], model="demo")
    assert finish == "length" and chunks > 2 and text
    # the ServiceMonitor scrapes the Service's port by name: it answers /metrics
    sm = cluster.get("servicemonitors", "demo", ns)
    assert sm["spec"]["endpoints"][0]["port"] == "http"
    metrics = httpx.get(f"http://{addresses[0][0]}:{addresses[0][1]}{sm['spec']['endpoints'][0]['path']}").text
    assert "qwen_e2e_request_latency_seconds_count" in metrics
    logs = cluster.kubectl("logs", "-n", ns, p["metadata"]["name"]).stdout
    assert any(json.loads(line).get("message") == "model ready" for line in logs.splitlines() if line.startswith("{"))

    # the server process dies: the kubelet restarts it, the probes see it come back, the status follows
    os.kill(pid_of(p, "server"), signal.SIGKILL)
    cluster.wait("the server restarted", lambda: (lambda ps: ps and container(ps[0], "server")["restartCount"] == 1
                                                   and container(ps[0], "server")["ready"])(
        server_pods(cluster, ns, "demo")), 180)
    assert cluster.wait_phase("demo", ns, "Ready", timeout=60)["status"]["readyReplicas"] == 1
    (p,) = server_pods(cluster, ns, "demo")
    assert container(p, "server")["lastState"]["terminated"]["exitCode"] == 137
    assert chat_stream(*ready_addresses(cluster, ns, "demo")[0], model="demo")[1] == "length"


@pytest.fixture(scope="module")
def hub(cluster, tmp_path_factory):
    """The fake hub on the pod bridge: a tiny random model, and one whose config does not match its weights."""
    tiny = make_model("tiny", "float32")
    broken = tmp_path_factory.mktemp("broken")
    for f in tiny.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, broken / f.name)
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["hidden_size"] *= 2
    (broken / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import save_file
    import torch

    save_file({"model.embed_tokens.weight": torch.zeros(4, 4)}, str(broken / "model.safetensors"))
    moe = tmp_path_factory.mktemp("moe")  # an architecture the server does not run
    for f in tiny.iterdir():
        shutil.copy(f, moe / f.name)
    (moe / "config.json").write_text(json.dumps({**json.loads((tiny / "config.json").read_text()),
                                                 "model_type": "qwen3_5_moe"}))
    with FakeHub(host=cluster.host_ip) as h:
        h.state.repos = {"qwen-test/tiny": tiny, "qwen-test/broken": broken, "qwen-test/moe": moe}
        yield h


def test_a_hub_model_downloads_with_progress_resumes_after_its_pod_is_killed_and_serves(cluster, operator, hub):
    ns = cluster.namespace("real-hub")
    size = (make_model("tiny", "float32") / "model.safetensors").stat().st_size
    hub.state.bytes_per_second = max(256 * 1024, size // 25)  # about 25 seconds for the weights
    cluster.apply(qwd("tiny", model={"name": "qwen-test/tiny", "source": "huggingface", "hubEndpoint": hub.url},
                      cache={"size": "1Gi"}, dtype="float32"), ns)

    def progress():
        st = (cluster.qwd("tiny", ns) or {}).get("status") or {}
        d = st.get("download") or {}
        return st if d.get("bytes", 0) > size // 10 and d.get("bytesPerSecond", 0) > 0 else None

    st = cluster.wait("download progress in the status", progress, 120, 0.5)
    d = st["download"]
    assert st["phase"] == "Downloading" and d["totalBytes"] >= size and d["bytes"] < d["totalBytes"]
    assert d["etaSeconds"] > 0 and "% of " in d["progress"] and "ETA" in d["progress"]
    wide = cluster.kubectl("get", "qwd", "tiny", "-n", ns, "-o", "wide").stdout.splitlines()
    assert "PROGRESS" in wide[0].split() and "% of " in wide[1]

    # kill the fetch pod's process mid-download: the Job's next pod resumes the partial file
    (fetch,) = [p for p in cluster.get("pods", namespace=ns, selector="app.kubernetes.io/component=fetch")
                if p["status"].get("phase") == "Running"]
    os.kill(pid_of(fetch, "fetch"), signal.SIGKILL)
    cluster.wait("a second fetch pod", lambda: len(cluster.get(
        "pods", namespace=ns, selector="app.kubernetes.io/component=fetch") or []) == 2, 60)
    hub.state.bytes_per_second = None
    st = cluster.wait_phase("tiny", ns, "Ready", timeout=240)["status"]
    assert "download" not in st and st["cache"]["ready"] and st["cache"]["bytes"] >= size
    resumed = [r for r in hub.ranges("model.safetensors") if r]
    assert resumed and int(resumed[-1].split("=")[1].rstrip("-")) > 0, hub.ranges("model.safetensors")
    failed = [p for p in cluster.get("pods", namespace=ns, selector="app.kubernetes.io/component=fetch")
              if p["status"]["phase"] == "Failed"]
    assert len(failed) == 1 and container(failed[0], "fetch")["state"]["terminated"]["exitCode"] == 137
    (address,) = wait_ready_addresses(cluster, ns, "tiny", 1)
    assert chat_stream(*address, model="qwen-test/tiny")[1] == "length"


def test_a_model_that_cannot_load_is_reported_with_the_reason(cluster, operator, hub):
    """Two at once: a checkpoint that does not match its config (the server exits 1 and the pods crash-loop,
    the status carrying the server's last line), and an architecture the server does not run (exit 3: the
    status says ModelNotSupported with the model type and the supported ones)."""
    ns = cluster.namespace("real-broken")
    for name, repo in (("broken", "qwen-test/broken"), ("moe", "qwen-test/moe")):
        cluster.apply(qwd(name, model={"name": repo, "source": "huggingface", "hubEndpoint": hub.url},
                          cache={"size": "1Gi"}, dtype="float32"), ns)

    def reported(name, words):
        def check():
            st = (cluster.qwd(name, ns) or {}).get("status") or {}
            return st if st.get("phase") == "Degraded" and words in st.get("message", "") else None
        return check

    st = cluster.wait("Degraded with the reason", reported("broken", "loading the model failed"), 240, 0.5)
    assert st["reason"] == "CrashLoopBackOff" and st["cache"]["ready"], st
    assert "the checkpoint has no tensor" in st["message"], st
    # the server exited by itself with the reason (exit 1), rather than being killed (137) once its startup
    # probe's budget of 300 seconds ran out
    (p,) = server_pods(cluster, ns, "broken")
    last = container(p, "server")["lastState"]["terminated"]
    assert last["exitCode"] == 1 and last["message"].startswith("loading the model failed"), last

    st = cluster.wait("ModelNotSupported", reported("moe", "qwen3_5_moe"), 120, 0.5)
    assert st["reason"] == "ModelNotSupported", st
    assert "model not supported: model type 'qwen3_5_moe'" in st["message"] and "qwen3_5" in st["message"], st
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Degraded"]["reason"] == "ModelNotSupported" and conds["Available"]["status"] == "False"
    (p,) = server_pods(cluster, ns, "moe")
    assert container(p, "server")["lastState"]["terminated"]["exitCode"] == 3


def test_a_rolling_update_drains_in_flight_requests_while_the_operator_restarts(cluster, operator):
    ns = cluster.namespace("real-roll")
    obj = qwd("roll", replicas=2, cache={"size": "1Gi", "accessMode": "ReadWriteMany"}, engine={"maxTokens": 4000})
    cluster.apply(obj, ns)
    cluster.wait_phase("roll", ns, "Ready", timeout=300)
    old = {p["metadata"]["name"]: p["status"]["podIP"] for p in server_pods(cluster, ns, "roll")}
    assert len(old) == 2
    assert sorted(a for a, _ in wait_ready_addresses(cluster, ns, "roll", 2)) == sorted(old.values())
    # the replicas read each other's responses: a conversation begun on one goes on on the other
    one, other = sorted(old.values())
    first = httpx.post(f"http://{one}:8000/v1/responses", timeout=60,
                       json={"model": "demo", "input": "Hello!", "max_output_tokens": 4}).json()
    follow = httpx.post(f"http://{other}:8000/v1/responses", timeout=60, json={
        "model": "demo", "input": "And then?", "previous_response_id": first["id"], "max_output_tokens": 4})
    assert follow.status_code == 200, follow.text
    assert follow.json()["usage"]["input_tokens"] > first["usage"]["input_tokens"] + first["usage"]["output_tokens"]
    assert httpx.get(f"http://{other}:8000/v1/responses/{first['id']}", timeout=60).json() == \
        httpx.get(f"http://{one}:8000/v1/responses/{first['id']}", timeout=60).json()
    # a request that outlasts the rest of the preStop pause but not the server's 25-second shutdown grace, whatever
    # this machine's speed (and the rollout's pods loading beside it): tokens for about 5 seconds, measured now
    started = time.monotonic()
    chat_stream(next(iter(old.values())), 8000, "demo", max_tokens=64, ignore_eos=True)
    max_tokens = min(4000, max(64, int(64 / (time.monotonic() - started) * 5)))

    changed = copy.deepcopy(obj)
    changed["spec"]["engine"]["maxQueue"] = 32
    cluster.apply(changed, ns)
    cluster.wait("the Deployment to roll", lambda: (lambda d: d and d["metadata"]["generation"] > 1)(
        cluster.get("deployment", "roll", ns)), 60)
    operator.stop(kill=True)  # the operator is away for the rest of the rollout
    try:
        # the first old pod told to stop gets a request near the end of its preStop pause; SIGTERM arrives while
        # it runs: the server stops taking connections, finishes the request, then exits
        def terminating():
            for p in server_pods(cluster, ns, "roll"):
                if p["metadata"]["name"] in old and p["metadata"].get("deletionTimestamp"):
                    return p
            return None

        victim = cluster.wait("an old pod to be told to stop", terminating, 240, 0.1)
        # its 5-second preStop pause runs, then SIGTERM comes: send the request 2 seconds or so before that
        time.sleep(3)
        address = old[victim["metadata"]["name"]]
        result: dict = {}
        chunks: list = []

        def request():
            try:
                result["value"] = chat_stream(address, 8000, "demo", max_tokens=max_tokens, progress=chunks,
                                              ignore_eos=True)
            except Exception as exc:  # noqa: BLE001: reported by the assertions below
                result["error"] = exc

        t = threading.Thread(target=request)
        t.start()
        refused_at = None  # chunks received when the server stopped taking connections
        while t.is_alive() and refused_at is None:
            try:
                httpx.get(f"http://{address}:8000/livez", timeout=2)
            except httpx.TransportError:
                refused_at = len(chunks)
            time.sleep(0.2)
        t.join(120)
        assert "error" not in result, (result.get("error"), f"{len(chunks)} of {max_tokens} tokens came")
        text, finish, total = result["value"]
        assert refused_at is not None, "the request ended before the server was told to stop: nothing was drained"
        assert finish == "length" and 0 < refused_at < total, (refused_at, total)
    finally:
        operator.start()
    st = cluster.wait_phase("roll", ns, "Ready", timeout=300)["status"]
    serving = {p["metadata"]["name"] for p in server_pods(cluster, ns, "roll") if not p["metadata"].get(
        "deletionTimestamp")}
    assert st["readyReplicas"] == 2 and len(serving) == 2 and not serving & set(old)
    dep = cluster.get("deployment", "roll", ns)
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["QWEN_MAX_QUEUE"] == "32"

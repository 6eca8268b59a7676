"""`scripts/dev-cluster up|env|down`, as a person runs it: a second control plane of its own, in its own
state folder, with the CRD installed and a process node that runs every pod asking for no GPU; `down` stops
what `up` started and nothing else."""

from __future__ import annotations

import json
import os
import subprocess

from ..conftest import ROOT


def run(state, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, QWEN_DEV_CLUSTER_STATE=str(state))
    return subprocess.run([str(ROOT / "scripts" / "dev-cluster"), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_up_env_and_down(cluster, tmp_path):
    state = tmp_path / "dc"
    r = run(state, "up")
    assert r.returncode == 0, r.stderr[-2000:]
    try:
        kubeconfig = state / "admin.kubeconfig"
        assert f"export KUBECONFIG={kubeconfig}" in r.stdout
        assert run(state, "env").stdout.strip() == f"export KUBECONFIG={kubeconfig}"
        nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json", kubeconfig=kubeconfig).stdout)["items"]
        gpu = [n for n in nodes if "nvidia.com/gpu" in n["status"]["capacity"]]
        assert len(nodes) == 2 and len(gpu) == 1 and gpu[0]["spec"]["taints"][0]["key"] == "nvidia.com/gpu"
        (process,) = [n for n in nodes if n["metadata"]["labels"].get("type") == "process"]
        assert not process["spec"].get("taints")
        assert cluster.kubectl("get", "crd", "qwendeployments.qwen-operator.io", kubeconfig=kubeconfig).returncode == 0
        pids = [int(p.read_text()) for p in (state / "run").glob("*.pid")]
        assert len(pids) == 6
        # a pod that asks for no GPU lands on the process node and really runs
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "hello", "namespace": "default"},
               "spec": {"restartPolicy": "Never", "containers": [{
                   "name": "hello", "image": "qwen-inference:dev",
                   "command": ["python", "-c", "import socket; print('hello from', socket.gethostname())"]}]}}
        cluster.kubectl("apply", "-f", "-", input=json.dumps(pod), kubeconfig=kubeconfig)
        cluster.wait("the pod to succeed", lambda: json.loads(cluster.kubectl(
            "get", "pod", "hello", "-o", "json", kubeconfig=kubeconfig).stdout)["status"].get("phase") == "Succeeded",
            60)
        got = json.loads(cluster.kubectl("get", "pod", "hello", "-o", "json", kubeconfig=kubeconfig).stdout)
        assert got["spec"]["nodeName"] == process["metadata"]["name"]
        assert cluster.kubectl("logs", "hello", kubeconfig=kubeconfig).stdout.strip() == "hello from hello"
        bridge = json.loads((state / "run" / "node-agent.json").read_text())["bridge"]
        assert subprocess.run(["ip", "link", "show", bridge], capture_output=True).returncode == 0
    finally:
        r = run(state, "down")
    assert r.returncode == 0
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        assert not alive, pid
    # the process node's network went with it
    assert subprocess.run(["ip", "link", "show", bridge], capture_output=True).returncode != 0
    # the session's own control plane is untouched
    assert cluster.kubectl("get", "nodes").returncode == 0

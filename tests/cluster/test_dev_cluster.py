"""`scripts/dev-cluster up|env|down`, as a person runs it: a second control plane of its own, in its own
state folder, with the CRD installed; `down` stops what `up` started and nothing else."""

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
        assert len(nodes) == 3 and len(gpu) == 1 and gpu[0]["spec"]["taints"][0]["key"] == "nvidia.com/gpu"
        assert cluster.kubectl("get", "crd", "qwendeployments.qwen-operator.io", kubeconfig=kubeconfig).returncode == 0
        pids = [int(p.read_text()) for p in (state / "run").glob("*.pid")]
        assert len(pids) == 5
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
    # the session's own control plane is untouched
    assert cluster.kubectl("get", "nodes").returncode == 0

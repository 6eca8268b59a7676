"""One local control plane for the whole session (scripts/devcluster.py), the CRDs, and the operator running
as a process under the ServiceAccount and RBAC the Helm chart installs. These tests fail, never skip, when
the control plane cannot start.

Pods land on kwok's simulated nodes unless a test places them on the process node (`on_process_node`):
there they really run, as processes with their own address on the pod bridge (`cluster.host_ip` is the
host's address on it, where test servers listen for pods)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from ..conftest import ROOT, free_port

import devcluster  # noqa: E402  (scripts/, on the path from tests/conftest.py)

OPERATOR_NS = "qwen-system"
RELEASE = "qwen"
pytestmark = pytest.mark.cluster


def k8s_bin() -> Path:
    r = subprocess.run([str(ROOT / "scripts" / "k8s-bin")], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"scripts/k8s-bin failed:\n{r.stderr}")
    return Path(r.stdout.strip().splitlines()[-1])


def on_process_node(spec: dict) -> dict:
    """A pod spec (or QwenDeployment spec) placed on the process node, where it really runs."""
    spec["nodeSelector"] = dict(devcluster.PROCESS_LABEL)
    spec["tolerations"] = [{"key": devcluster.PROCESS_TAINT["key"], "operator": "Exists", "effect": "NoSchedule"}]
    return spec


class Cluster:
    def __init__(self, dc: devcluster.DevCluster) -> None:
        self.dc = dc
        self.bins = dc.bins
        self.made: list[str] = []  # namespaces made by the running test, deleted after it

    @property
    def host_ip(self) -> str:
        """The host's address on the process nodes' pod bridge."""
        return self.dc.pod_network["hostIP"]

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60,
                kubeconfig: Path | None = None) -> subprocess.CompletedProcess:
        return self.dc.kubectl(*args, input=input, check=check, timeout=timeout, kubeconfig=kubeconfig)

    def apply(self, obj: dict | list | str, namespace: str | None = None, check: bool = True,
              kubeconfig: Path | None = None) -> subprocess.CompletedProcess:
        if isinstance(obj, str):
            text = obj
        else:
            docs = obj if isinstance(obj, list) else [obj]
            text = "\n---\n".join(yaml.safe_dump(d) for d in docs)
        args = ["apply", "-f", "-"] + (["-n", namespace] if namespace else [])
        return self.kubectl(*args, input=text, check=check, kubeconfig=kubeconfig)

    def get(self, kind: str, name: str | None = None, namespace: str | None = None, selector: str | None = None):
        args = ["get", kind] + ([name] if name else []) + (["-n", namespace] if namespace else [])
        if selector:
            args += ["-l", selector]
        r = self.kubectl(*args, "-o", "json", check=False)
        if r.returncode != 0:
            if "NotFound" in r.stderr or "not found" in r.stderr:
                return None
            raise RuntimeError(r.stderr)
        data = json.loads(r.stdout)
        return data["items"] if name is None else data

    def namespace(self, prefix: str, labels: dict | None = None) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        meta = {"name": name}
        if labels:
            meta["labels"] = labels
        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": meta})
        self.made.append(name)
        return name

    def wait(self, what: str, check, timeout: float = 90, interval: float = 0.5):
        try:
            return devcluster.wait_for(what, check, timeout, interval)
        except devcluster.StartError as exc:
            raise AssertionError(str(exc)) from None

    def qwd(self, name: str, namespace: str) -> dict | None:
        return self.get("qwendeployments", name, namespace)

    def wait_phase(self, name: str, namespace: str, phase: str, timeout: float = 90) -> dict:
        def check():
            obj = self.qwd(name, namespace)
            st = (obj or {}).get("status") or {}
            if st.get("phase") == phase and st.get("observedGeneration") == obj["metadata"]["generation"]:
                return obj
            return None
        try:
            return self.wait(f"{namespace}/{name} to be {phase}", check, timeout)
        except AssertionError:
            obj = self.qwd(name, namespace)
            pods = [{"name": p["metadata"]["name"], "node": p["spec"].get("nodeName"),
                     "phase": (p.get("status") or {}).get("phase"),
                     "containers": [c.get("state") for c in (p.get("status") or {}).get("containerStatuses") or []]}
                    for p in self.get("pods", namespace=namespace) or []]
            raise AssertionError(f"{namespace}/{name} did not reach {phase}: status={json.dumps((obj or {}).get('status'), indent=1)}"
                                 f"\npods={json.dumps(pods, indent=1)}")

    def events(self, namespace: str, name: str) -> list[dict]:
        r = self.kubectl("get", "events", "-n", namespace, "--field-selector",
                         f"involvedObject.kind=QwenDeployment,involvedObject.name={name}", "-o", "json")
        return json.loads(r.stdout)["items"]


class Operator:
    """qwen-operator as a process, authenticated as the chart's ServiceAccount."""

    def __init__(self, cluster: Cluster, state: Path) -> None:
        self.cluster = cluster
        self.state = state
        self.proc: subprocess.Popen | None = None
        self.log = state / "operator.log"
        self.metrics_port = free_port()
        self.liveness_port = free_port()
        self.kubeconfig = state / "operator.kubeconfig"

    def credentials(self) -> None:
        token = self.cluster.kubectl("create", "token", f"{RELEASE}-qwen-operator", "-n", OPERATOR_NS,
                                     "--duration=24h").stdout.strip()
        devcluster.kubeconfig(self.kubeconfig, self.cluster.dc.server, self.cluster.dc.pki, "operator", token=token)

    def start(self, **env: str) -> "Operator":
        assert self.proc is None or self.proc.poll() is not None
        e = dict(os.environ, KUBECONFIG=str(self.kubeconfig), QWEN_OPERATOR_RESYNC_SECONDS="3",
                 QWEN_OPERATOR_FORCE_APPLY_SECONDS="4", QWEN_OPERATOR_METRICS_PORT=str(self.metrics_port),
                 QWEN_OPERATOR_LIVENESS_PORT=str(self.liveness_port), QWEN_OPERATOR_MONITORING_CHECK_SECONDS="2",
                 QWEN_OPERATOR_DEFAULT_IMAGE="registry.example/qwen-inference:test", PYTHONUNBUFFERED="1",
                 QWEN_OPERATOR_PROGRESS_SECONDS="2")
        e.update(env)
        out = open(self.log, "ab")
        cmd = [sys.executable, "-c", "from qwen_operator.main import main; raise SystemExit(main())"]
        self.proc = subprocess.Popen(cmd, env=e, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        import httpx

        self.cluster.wait("the operator's liveness endpoint", lambda: httpx.get(
            f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=2).status_code == 200, 60)
        return self

    def stop(self, kill: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.kill() if kill else self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def metrics(self) -> str:
        import httpx

        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text

    def errors(self) -> list[dict]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("level") in ("error", "critical"):
                out.append(entry)
        return out


def render_chart(cluster: Cluster, *sets: str) -> list[dict]:
    args = [str(cluster.bins / "helm"), "template", RELEASE, str(ROOT / "charts" / "qwen-operator"), "--namespace",
            OPERATOR_NS, "--kube-version", "1.37.2", "--include-crds"]
    for s in sets:
        args += ["--set", s]
    r = subprocess.run(args, capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def crds_folder(which: str) -> Path:
    """A set of CRDs from its Go module (scripts/k8s-bin crds)."""
    r = subprocess.run([str(ROOT / "scripts" / "k8s-bin"), "crds", which], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot fetch the {which} CRDs: {r.stderr}")
    return Path(r.stdout.strip())


def monitoring_crds() -> list[Path]:
    d = crds_folder("prometheus")
    return [d / "monitoring.coreos.com_servicemonitors.yaml", d / "monitoring.coreos.com_prometheusrules.yaml"]


# CRD name -> (set, file): KEDA's, the KEDA HTTP add-on's and the Gateway API Inference Extension's
OPTIONAL_CRDS = {
    "scaledobjects.keda.sh": ("keda", "keda.sh_scaledobjects.yaml"),
    "scaledjobs.keda.sh": ("keda", "keda.sh_scaledjobs.yaml"),
    "triggerauthentications.keda.sh": ("keda", "keda.sh_triggerauthentications.yaml"),
    "clustertriggerauthentications.keda.sh": ("keda", "keda.sh_clustertriggerauthentications.yaml"),
    "cloudeventsources.eventing.keda.sh": ("keda", "eventing.keda.sh_cloudeventsources.yaml"),
    "clustercloudeventsources.eventing.keda.sh": ("keda", "eventing.keda.sh_clustercloudeventsources.yaml"),
    "interceptorroutes.http.keda.sh": ("keda-http", "http.keda.sh_interceptorroutes.yaml"),
    "httpscaledobjects.http.keda.sh": ("keda-http", "http.keda.sh_httpscaledobjects.yaml"),
    "inferencepools.inference.networking.k8s.io": ("inference", "inference.networking.k8s.io_inferencepools.yaml"),
}


def install_crds(cluster: "Cluster", *names: str) -> None:
    """Install these CRDs (all of OPTIONAL_CRDS when none are named) and wait until they are served."""
    names = names or tuple(OPTIONAL_CRDS)
    for name in names:
        which, file = OPTIONAL_CRDS[name]
        cluster.kubectl("apply", "--server-side", "-f", str(crds_folder(which) / file))
    cluster.kubectl("wait", "--for=condition=Established", *[f"crd/{n}" for n in names], "--timeout=60s")


def remove_crds(cluster: "Cluster", *names: str) -> None:
    cluster.kubectl("delete", "crd", *names, "--wait=true", timeout=90)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> Cluster:
    bins = k8s_bin()
    state = tmp_path_factory.mktemp("dev-cluster")
    dc = devcluster.DevCluster(state, bins=bins)
    try:
        dc.up()
    except devcluster.StartError as exc:
        dc.down()
        pytest.fail(f"the local control plane did not start: {exc}")
    c = Cluster(dc)
    c.apply((ROOT / "crds" / "qwendeployments.yaml").read_text())
    for crd in monitoring_crds():
        c.kubectl("apply", "--server-side", "-f", str(crd))
    c.kubectl("wait", "--for=condition=Established", "crd/qwendeployments.qwen-operator.io",
              "crd/servicemonitors.monitoring.coreos.com", "crd/prometheusrules.monitoring.coreos.com",
              "--timeout=60s")
    install_crds(c)
    yield c
    dc.down()


@pytest.fixture(scope="session")
def operator(cluster, tmp_path_factory) -> Operator:
    """The chart's ServiceAccount, ClusterRoles and bindings, and the operator running under them."""
    cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NS}})
    docs = [d for d in render_chart(cluster) if d["kind"] in
            ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")]
    cluster.apply(docs)
    op = Operator(cluster, tmp_path_factory.mktemp("operator"))
    op.rbac_applied_at = time.time()
    op.credentials()
    op.start()
    yield op
    op.stop()


@pytest.fixture(autouse=True)
def _clean_namespaces(request):
    """Each test's namespaces go when it ends, so the fake nodes never fill up."""
    yield
    if "cluster" in request.fixturenames:
        c = request.getfixturevalue("cluster")
        if c.made:
            c.kubectl("delete", "namespace", *c.made, "--wait=false", check=False)
            c.made.clear()


def example(name: str) -> dict:
    return yaml.safe_load((ROOT / "manifests" / "examples" / f"{name}.yaml").read_text())

"""The real KEDA scales a QwenDeployment on the queue of a real qwen-serve, read by a real Prometheus.

KEDA's operator and metrics adapter, and the KEDA HTTP add-on's external scaler, are built from their Go
modules (`scripts/k8s-bin keda`, a build of many minutes: this test is opt-in, `make test-keda` or
QWEN_TEST_KEDA=1) and run as processes against the local control plane, under the ServiceAccounts and
ClusterRoles of their own manifests; the API server's aggregation layer serves KEDA's external metrics to the
real HPA controller, which writes the QwenDeployment's scale subresource.

kwok's pods run no process, so one qwen-serve on loopback stands in for the deployment's pods: Prometheus
scrapes it with the labels a ServiceMonitor gives the pods' series (namespace, and service: the
QwenDeployment's name), which is what the ScaledObject's query selects. The path: a queue builds, KEDA wakes
the deployment from zero, its HPA adds replicas up to maxReplicas; the queue drains, replicas go, and once
idle KEDA takes the deployment back to zero. The HTTP add-on's interceptor does not run (it would forward to
pods that do not exist), so its scaler counts no request in flight; it runs because KEDA neither scales down
nor to zero while one of a ScaledObject's scalers cannot be reached.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from qwen_operator.spec import parse_quantity

from ..conftest import ROOT, free_port, running_server
from .conftest import crds_folder
from .test_operator import SERVER_LABELS, demo

pytestmark = pytest.mark.skipif(not os.environ.get("QWEN_TEST_KEDA"),
                                reason="opt-in, as KEDA is a long build: make test-keda (QWEN_TEST_KEDA=1)")

NS = "keda"


def keda_bins() -> Path:
    r = subprocess.run([str(ROOT / "scripts" / "k8s-bin"), "keda"], capture_output=True, text=True, timeout=5400)
    if r.returncode != 0:
        pytest.fail(f"scripts/k8s-bin keda failed:\n{r.stderr[-3000:]}")
    return Path(r.stdout.strip().splitlines()[-1])


def certificates(folder: Path) -> None:
    """ca.crt, tls.crt, tls.key: the mTLS between KEDA's adapter and operator, and the adapter's serving
    certificate, under the names the API server's aggregation layer checks (<service>.<namespace>.svc)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    later = now + dt.timedelta(days=2)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keda-test-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(later)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    names = ["localhost", "keda-operator", "keda-operator.keda.svc", "keda-operator.keda.svc.cluster.local",
             "keda-metrics-apiserver", "keda-metrics-apiserver.keda.svc"]
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keda")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(later)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]
                                                       + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    (folder / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "tls.crt").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (folder / "tls.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                                       serialization.NoEncryption()))


def module_manifests(which: str, *files: str) -> list[dict]:
    """Documents of a project's own manifests, from the module `scripts/k8s-bin crds <which>` fetched."""
    root = crds_folder(which).parents[1]  # <module>/config/crd/bases -> <module>/config
    return [d for f in files for d in yaml.safe_load_all((root / f).read_text()) if d]


class Processes:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        log = open(self.folder / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def keda(cluster, tmp_path_factory):
    """KEDA's operator and metrics adapter and the HTTP add-on's scaler, registered and running."""
    bins = keda_bins()
    tmp = tmp_path_factory.mktemp("keda")
    certs = tmp / "certs"
    certificates(certs)
    adapter_port, grpc_port, http_scaler_port = free_port(), free_port(), free_port()

    # KEDA's namespace, ServiceAccount, ClusterRoles and bindings as its own manifests have them
    docs = module_manifests("keda", "general/namespace.yaml", "service_account/service_account.yaml",
                            "rbac/role.yaml", "rbac/role_binding.yaml", "metrics-server/role.yaml",
                            "metrics-server/role_binding.yaml")
    # the HTTP add-on's scaler, named as its kustomization names it
    for d in module_manifests("keda-http", "scaler/service-account.yaml", "scaler/role.yaml",
                              "scaler/role-binding.yaml"):
        d["metadata"]["name"] = "keda-add-ons-http-" + d["metadata"]["name"]
        if d["kind"] == "ServiceAccount":
            d["metadata"]["namespace"] = NS
        if "roleRef" in d:
            d["roleRef"]["name"] = "keda-add-ons-http-" + d["roleRef"]["name"]
            d["subjects"] = [{"kind": "ServiceAccount", "name": "keda-add-ons-http-scaler", "namespace": NS}]
        docs.append(d)
    # the adapter runs on loopback: its Service is a name for it, and the APIService trusts its certificate
    api_service = next(d for d in module_manifests("keda", "metrics-server/api_service.yaml")
                       if d["kind"] == "APIService")
    api_service["spec"]["service"]["port"] = adapter_port
    api_service["spec"]["caBundle"] = base64.b64encode((certs / "ca.crt").read_bytes()).decode()
    docs += [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "keda-metrics-apiserver", "namespace": NS},
              "spec": {"type": "ExternalName", "externalName": "localhost",
                       "ports": [{"name": "https", "port": adapter_port}]}}, api_service]
    cluster.kubectl("apply", "--server-side", "-f", "-", input="\n---\n".join(yaml.safe_dump(d) for d in docs))

    def kubeconfig(sa: str) -> Path:
        import devcluster

        token = cluster.kubectl("create", "token", sa, "-n", NS, "--duration=6h").stdout.strip()
        path = tmp / f"{sa}.kubeconfig"
        devcluster.kubeconfig(path, cluster.dc.server, cluster.dc.pki, sa, token=token)
        return path

    keda_kc, scaler_kc = kubeconfig("keda-operator"), kubeconfig("keda-add-ons-http-scaler")
    procs = Processes(tmp)
    health = free_port()
    env = {"KUBECONFIG": str(keda_kc), "WATCH_NAMESPACE": "", "POD_NAMESPACE": NS,
           "KEDA_CLUSTER_OBJECT_NAMESPACE": NS}
    procs.start("keda-operator", [str(bins / "keda-operator"), f"--metrics-bind-address=127.0.0.1:{free_port()}",
                                  f"--health-probe-bind-address=127.0.0.1:{health}",
                                  f"--metrics-service-bind-address=127.0.0.1:{grpc_port}", f"--cert-dir={certs}",
                                  "--enable-cert-rotation=false", "--enable-webhook-patching=false",
                                  "--enable-apiservice-patching=false", "--zap-log-level=info",
                                  "--zap-encoder=console"], env)
    procs.start("keda-adapter", [str(bins / "keda-adapter"), f"--secure-port={adapter_port}",
                                 "--bind-address=127.0.0.1", f"--cert-dir={certs}",
                                 f"--tls-cert-file={certs / 'tls.crt'}", f"--tls-private-key-file={certs / 'tls.key'}",
                                 f"--metrics-service-address=127.0.0.1:{grpc_port}",
                                 "--metrics-service-grpc-authority=keda-operator.keda.svc",
                                 f"--lister-kubeconfig={keda_kc}", f"--authentication-kubeconfig={keda_kc}",
                                 f"--authorization-kubeconfig={keda_kc}",
                                 f"--port={free_port()}", "--zap-log-level=info", "--zap-encoder=console"], env)
    procs.start("keda-http-scaler", [str(bins / "keda-http-scaler")], {
        "KUBECONFIG": str(scaler_kc), "KEDA_HTTP_SCALER_PORT": str(http_scaler_port),
        "KEDA_HTTP_SCALER_TARGET_ADMIN_NAMESPACE": NS,
        "KEDA_HTTP_SCALER_TARGET_ADMIN_SERVICE": "keda-add-ons-http-interceptor-admin",
        "KEDA_HTTP_SCALER_TARGET_ADMIN_DEPLOYMENT": "keda-add-ons-http-interceptor",
        "KEDA_HTTP_SCALER_TARGET_ADMIN_PORT": "9090", "KEDA_HTTP_QUEUE_TICK_DURATION": "5s",
        "OTEL_PROM_EXPORTER_ENABLED": "false"})
    try:
        for name in procs.procs:
            time.sleep(0.5)
            assert procs.alive(name), f"{name} exited:\n{procs.log(name)}"
        cluster.wait("KEDA's operator", lambda: httpx.get(f"http://127.0.0.1:{health}/healthz").status_code == 200, 60)
        cluster.wait("the HTTP add-on's scaler", lambda: port_open(http_scaler_port), 60)
        cluster.wait("external.metrics.k8s.io through the aggregation layer", lambda: cluster.kubectl(
            "get", "--raw", "/apis/external.metrics.k8s.io/v1beta1", check=False).returncode == 0, 90)
        yield {"procs": procs, "http_scaler": f"127.0.0.1:{http_scaler_port}"}
    finally:
        # an APIService nobody serves would stall discovery, and with it namespace deletion, for the other tests
        cluster.kubectl("delete", "apiservice", api_service["metadata"]["name"], check=False)
        procs.stop()


class Prometheus:
    """A real Prometheus scraping qwen-serve every second, with the labels a ServiceMonitor would give."""

    def __init__(self, tmp: Path, target: int, labels: dict[str, str]) -> None:
        import shutil

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {"global": {"scrape_interval": "1s"},
                  "scrape_configs": [{"job_name": "qwen", "honor_labels": True,
                                      "static_configs": [{"targets": [f"127.0.0.1:{target}"], "labels": labels}]}]}
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        binary = shutil.which("prometheus")
        assert binary, "prometheus is missing: scripts/system-deps installs it"
        self.proc = subprocess.Popen([binary, f"--config.file={tmp / 'prometheus.yml'}",
                                      f"--storage.tsdb.path={tmp / 'data'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                                     stdout=subprocess.DEVNULL, stderr=open(tmp / "prometheus.log", "wb"))

    def query(self, expr: str) -> float | None:
        r = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=5).json()
        result = r["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


class Load:
    """Streams that ask for long replies from a server with one slot: one runs, the others wait."""

    def __init__(self, url: str, streams: int) -> None:
        self.stop_event = threading.Event()
        body = {"messages": [{"role": "user", "content": "count"}], "max_tokens": 2000, "ignore_eos": True,
                "stream": True}
        self.statuses: list[int] = []

        def run():
            while not self.stop_event.is_set():
                with httpx.Client(base_url=url, timeout=600) as c:
                    with c.stream("POST", "/v1/chat/completions", json=body) as r:
                        self.statuses.append(r.status_code)
                        for _ in r.iter_lines():
                            if self.stop_event.is_set():
                                return
        self.threads = [threading.Thread(target=run, daemon=True) for _ in range(streams)]
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(60)


def test_keda_scales_on_the_queue_from_zero_to_max_and_back(cluster, operator, keda, tiny_model, tmp_path):
    ns = cluster.namespace("keda-scale")
    # the operator, told where the HTTP add-on's scaler runs
    operator.stop()
    operator.start(QWEN_OPERATOR_KEDA_HTTP_SCALER_ADDRESS=keda["http_scaler"])
    history: list[int] = []
    try:
        with running_server(tiny_model, max_concurrency=1, max_queue=64) as server:
            prom = Prometheus(tmp_path, server.port, {"namespace": ns, "service": "chat"})
            try:
                cluster.wait("Prometheus", lambda: prom.query("up") == 1.0, 60)
                obj = demo("chat", replicas=0, cache={"size": "1Gi", "accessMode": "ReadWriteMany"},
                           autoscaling={"minReplicas": 0, "maxReplicas": 3, "targetWaitingRequests": 2,
                                        "pollingIntervalSeconds": 1, "scaleDownDelaySeconds": 0,
                                        "idleSecondsToZero": 15, "prometheus": {"address": prom.url}})
                cluster.apply(obj, ns)

                def state():
                    q = cluster.qwd("chat", ns)
                    replicas = q["spec"]["replicas"]
                    if not history or history[-1] != replicas:
                        history.append(replicas)
                    return q

                # KEDA takes the ScaledObject: its HPA, and a ready, idle deployment at zero
                cluster.wait("KEDA's HPA", lambda: cluster.get("hpa", "keda-hpa-chat", ns), 90)
                c = cluster.wait("KEDA to report the deployment idle", lambda: next(
                    (c for c in (state().get("status") or {}).get("conditions") or []
                     if c["type"] == "Autoscaling" and c["reason"] == "Idle"), None), 90)
                assert c["status"] == "True"
                cluster.wait("Ready at zero replicas", lambda: state()["status"]["phase"] == "Ready"
                             and state()["status"]["reason"] == "ScaledToZero", 90)

                # a queue builds on the server: KEDA wakes the deployment, its HPA scales it to maxReplicas
                load = Load(server.url, streams=7)
                try:
                    cluster.wait("a queue in Prometheus", lambda: (prom.query(
                        f'sum(qwen_requests_waiting{{namespace="{ns}",service="chat"}})') or 0) >= 4, 60)
                    def at_max():
                        q = state()
                        pods = cluster.get("pods", namespace=ns, selector=SERVER_LABELS.format(name="chat"))
                        return q["spec"]["replicas"] == 3 and (q["status"].get("readyReplicas") or 0) == 3 \
                            and len(pods) == 3 and q
                    top = cluster.wait("3 replicas", at_max, 180, interval=1)
                    assert {c["type"]: c["reason"] for c in top["status"]["conditions"]}["Autoscaling"] == "Active"
                    # what the HPA read: KEDA's external metric, the deployment's queue
                    hpa = cluster.get("hpa", "keda-hpa-chat", ns)
                    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "qwen-operator.io/v1alpha1",
                                                             "kind": "QwenDeployment", "name": "chat"}
                    metric = next(m for m in hpa["status"]["currentMetrics"] if m["type"] == "External")
                    assert parse_quantity(metric["external"]["current"]["averageValue"]) > 0
                    assert all(s == 200 for s in load.statuses)
                finally:
                    load.stop()

                # the queue drains: replicas go, and once idle for idleSecondsToZero, the last one
                cluster.wait("zero replicas", lambda: state()["spec"]["replicas"] == 0
                             and state()["status"].get("reason") == "ScaledToZero", 240, interval=1)
                assert history[0] == 0 and 3 in history and history[-1] == 0, history
                up = history[:history.index(3) + 1]
                assert up == sorted(up), history  # only up while the queue grew
                print("spec.replicas as KEDA and its HPA set them:", history)
            finally:
                prom.stop()
    except BaseException:
        print("replicas:", history)
        print("HPA:", json.dumps((cluster.get("hpa", "keda-hpa-chat", ns) or {}).get("status"), indent=1))
        print("QwenDeployment:", json.dumps((cluster.qwd("chat", ns) or {}).get("status"), indent=1))
        print({name: keda["procs"].log(name)[-1500:] for name in keda["procs"].procs if name != "keda-http-scaler"})
        cm = cluster.dc.logs / "kube-controller-manager.log"
        print("controller manager:", "\n".join(l for l in cm.read_text(errors="replace").splitlines()
                                                if "horizontal" in l.lower() or "hpa" in l.lower())[-3000:])
        raise
    finally:
        operator.stop()
        operator.start()

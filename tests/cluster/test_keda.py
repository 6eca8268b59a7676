"""The real KEDA scales a QwenDeployment on the queue of a real qwen-serve, read by a real Prometheus.

KEDA's operator and metrics adapter, and the KEDA HTTP add-on's external scaler and interceptor, are built from
their Go modules (`scripts/k8s-bin keda`, a build of many minutes: this test is opt-in, `make test-keda` or
QWEN_TEST_KEDA=1) and run as processes against the local control plane, under the ServiceAccounts and
ClusterRoles of their own manifests; the API server's aggregation layer serves KEDA's external metrics to the
real HPA controller, which writes the QwenDeployment's scale subresource.

Two tests:

- On kwok's nodes (pods that run no process), one qwen-serve on loopback stands in for the deployment's pods:
  Prometheus scrapes it with the labels a ServiceMonitor gives the pods' series. A queue builds, KEDA wakes the
  deployment from zero, its HPA adds replicas up to maxReplicas; the queue drains, replicas go, and once idle
  KEDA takes the deployment back to zero.
- On the process node, where the pods really run: a request sent to the HTTP add-on's interceptor while the
  deployment sits at zero is held until KEDA has woken it and its first pod is ready, then answered by that pod;
  Prometheus finds the pods through the API server (the scrape configuration the Prometheus Operator makes of
  the deployment's ServiceMonitor) and the queue on them takes the deployment to maxReplicas of real pods, and
  back to zero. kube-proxy (built from the Kubernetes module, nftables mode) routes the interceptor's
  connections to the Service's cluster IP to its pods; cluster DNS is the one part played by a file: the
  interceptor runs in its own mount namespace, where /etc/hosts names the Service's cluster IP.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import devcluster  # scripts/, on the path from tests/conftest.py
import httpx
import pytest
import yaml

from qwen_operator.spec import parse_quantity

from ..conftest import ROOT, free_port, running_server
from .conftest import crds_folder
from .test_operator import SERVER_LABELS, demo
from .test_process_serving import qwd as process_qwd, ready_addresses, server_pods

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
    """KEDA's operator and metrics adapter, the HTTP add-on's scaler and interceptor, and kube-proxy, registered and
    running."""
    bins = keda_bins()
    tmp = tmp_path_factory.mktemp("keda")
    certs = tmp / "certs"
    certificates(certs)
    adapter_port, grpc_port, http_scaler_port = free_port(), free_port(), free_port()
    admin_port, proxy_port = free_port(), free_port()

    # KEDA's namespace, ServiceAccount, ClusterRoles and bindings as its own manifests have them
    docs = module_manifests("keda", "general/namespace.yaml", "service_account/service_account.yaml",
                            "rbac/role.yaml", "rbac/role_binding.yaml", "metrics-server/role.yaml",
                            "metrics-server/role_binding.yaml")
    # the HTTP add-on's scaler and interceptor, named as its kustomization names them; then the interceptor's admin
    # Service (where the scaler reads the queue of every interceptor) naming the interceptor's process: the host's
    # address on the pod bridge
    for part in ("scaler", "interceptor"):
        for d in module_manifests("keda-http", f"{part}/service-account.yaml", f"{part}/role.yaml",
                                  f"{part}/role-binding.yaml"):
            d["metadata"]["name"] = "keda-add-ons-http-" + d["metadata"]["name"]
            if d["kind"] == "ServiceAccount":
                d["metadata"]["namespace"] = NS
            if "roleRef" in d:
                d["roleRef"]["name"] = "keda-add-ons-http-" + d["roleRef"]["name"]
                d["subjects"] = [{"kind": "ServiceAccount", "name": f"keda-add-ons-http-{part}", "namespace": NS}]
            docs.append(d)
    admin = "keda-add-ons-http-interceptor-admin"
    docs += [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": admin, "namespace": NS},
              "spec": {"ports": [{"name": "admin", "port": admin_port}]}},
             {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
              "metadata": {"name": admin, "namespace": NS,
                           "labels": {"kubernetes.io/service-name": admin,
                                      "endpointslice.kubernetes.io/managed-by": "qwen-operator-tests"}},
              "addressType": "IPv4", "ports": [{"name": "admin", "port": admin_port}],
              "endpoints": [{"addresses": [cluster.host_ip], "conditions": {"ready": True}}]}]
    # kube-proxy's identity, bound as kubeadm binds it
    docs += [{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "kube-proxy", "namespace": NS}},
             {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
              "metadata": {"name": "qwen-test-kube-proxy"},
              "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                          "name": "system:node-proxier"},
              "subjects": [{"kind": "ServiceAccount", "name": "kube-proxy", "namespace": NS}]}]
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
        token = cluster.kubectl("create", "token", sa, "-n", NS, "--duration=6h").stdout.strip()
        path = tmp / f"{sa}.kubeconfig"
        devcluster.kubeconfig(path, cluster.dc.server, cluster.dc.pki, sa, token=token)
        return path

    keda_kc, scaler_kc = kubeconfig("keda-operator"), kubeconfig("keda-add-ons-http-scaler")
    interceptor_kc, proxy_kc = kubeconfig("keda-add-ons-http-interceptor"), kubeconfig("kube-proxy")
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
        "KEDA_HTTP_SCALER_TARGET_ADMIN_PORT": str(admin_port), "KEDA_HTTP_QUEUE_TICK_DURATION": "1s",
        "OTEL_PROM_EXPORTER_ENABLED": "false"})
    # the interceptor, in a mount namespace of its own whose /etc/hosts is `hosts` (tests add the Services' names)
    hosts = tmp / "hosts"
    shutil.copy("/etc/hosts", hosts)
    procs.start("keda-http-interceptor", [
        "unshare", "--mount", "--propagation", "private", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$1"',
        str(hosts), str(bins / "keda-http-interceptor")], {
        "KUBECONFIG": str(interceptor_kc), "KEDA_HTTP_PROXY_PORT": str(proxy_port),
        "KEDA_HTTP_ADMIN_PORT": str(admin_port), "OTEL_PROM_EXPORTER_ENABLED": "false",
        "KEDA_HTTP_LOG_REQUESTS": "true"})
    net = cluster.dc.pod_network
    proxy_health = free_port()
    procs.start("kube-proxy", [str(bins / "kube-proxy"), f"--kubeconfig={proxy_kc}", "--proxy-mode=nftables",
                               f"--hostname-override={devcluster.PROCESS_NODE}", f"--cluster-cidr={net['subnet']}",
                               f"--healthz-bind-address=127.0.0.1:{proxy_health}",
                               f"--metrics-bind-address=127.0.0.1:{free_port()}", "--conntrack-max-per-core=0",
                               "--conntrack-tcp-timeout-established=0", "--conntrack-tcp-timeout-close-wait=0",
                               "--v=2"], {})
    try:
        for name in procs.procs:
            time.sleep(0.5)
            assert procs.alive(name), f"{name} exited:\n{procs.log(name)}"
        cluster.wait("KEDA's operator", lambda: httpx.get(f"http://127.0.0.1:{health}/healthz").status_code == 200, 60)
        cluster.wait("the HTTP add-on's scaler", lambda: port_open(http_scaler_port), 60)
        cluster.wait("the HTTP add-on's interceptor", lambda: port_open(proxy_port) and port_open(admin_port), 60)
        cluster.wait("kube-proxy", lambda: httpx.get(f"http://127.0.0.1:{proxy_health}/healthz").status_code == 200,
                     60)
        cluster.wait("external.metrics.k8s.io through the aggregation layer", lambda: cluster.kubectl(
            "get", "--raw", "/apis/external.metrics.k8s.io/v1beta1", check=False).returncode == 0, 90)
        yield {"procs": procs, "http_scaler": f"127.0.0.1:{http_scaler_port}", "proxy": proxy_port,
               "hosts": hosts, "bins": bins}
    finally:
        # an APIService nobody serves would stall discovery, and with it namespace deletion, for the other tests
        cluster.kubectl("delete", "apiservice", api_service["metadata"]["name"], check=False)
        procs.stop()
        for family in ("ip", "ip6"):  # kube-proxy's rules go with it
            subprocess.run(["nft", "delete", "table", family, "kube-proxy"], capture_output=True)


class Prometheus:
    """A real Prometheus scraping every second: a static target with the labels a ServiceMonitor would give, or
    (`for_service_monitor`) the pods behind a ServiceMonitor, found through the API server."""

    def __init__(self, tmp: Path, binary: Path | None = None) -> None:
        self.tmp = tmp
        self.binary = str(binary) if binary else shutil.which("prometheus")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, scrape_config: dict) -> "Prometheus":
        config = {"global": {"scrape_interval": "1s"}, "scrape_configs": [scrape_config]}
        (self.tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        assert self.binary, "prometheus is missing: scripts/system-deps installs it"
        self.proc = subprocess.Popen([self.binary, f"--config.file={self.tmp / 'prometheus.yml'}",
                                      f"--storage.tsdb.path={self.tmp / 'data'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                                     stdout=subprocess.DEVNULL, stderr=open(self.tmp / "prometheus.log", "wb"))
        return self

    @staticmethod
    def static(target: int, labels: dict[str, str]) -> dict:
        return {"job_name": "qwen", "honor_labels": True,
                "static_configs": [{"targets": [f"127.0.0.1:{target}"], "labels": labels}]}

    @staticmethod
    def for_service_monitor(cluster, sm: dict) -> dict:
        """What the Prometheus Operator makes of a ServiceMonitor: the EndpointSlices of the Services its selector
        matches, on its endpoint's port, with the namespace, service and pod labels on every series."""
        def label(name: str) -> str:
            return re.sub(r"[^a-zA-Z0-9_]", "_", name)

        ep = sm["spec"]["endpoints"][0]
        relabel = [{"action": "keep", "regex": f"{re.escape(v)};true",
                    "source_labels": [f"__meta_kubernetes_service_label_{label(k)}",
                                      f"__meta_kubernetes_service_labelpresent_{label(k)}"]}
                   for k, v in sm["spec"]["selector"]["matchLabels"].items()]
        relabel += [{"action": "keep", "source_labels": ["__meta_kubernetes_endpointslice_port_name"],
                     "regex": ep["port"]},
                    {"target_label": "namespace", "source_labels": ["__meta_kubernetes_namespace"]},
                    {"target_label": "service", "source_labels": ["__meta_kubernetes_service_name"]},
                    {"target_label": "pod", "source_labels": ["__meta_kubernetes_pod_name"]}]
        pki = cluster.dc.pki
        return {"job_name": f"serviceMonitor/{sm['metadata']['namespace']}/{sm['metadata']['name']}/0",
                "metrics_path": ep.get("path", "/metrics"), "relabel_configs": relabel,
                "kubernetes_sd_configs": [{
                    "role": "endpointslice", "api_server": cluster.dc.server,
                    "namespaces": {"names": [sm["metadata"]["namespace"]]},
                    "tls_config": {"ca_file": str(pki / "ca.crt"), "cert_file": str(pki / "admin.crt"),
                                   "key_file": str(pki / "admin.key")}}]}

    def query(self, expr: str) -> float | None:
        r = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=5).json()
        result = r["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def series(self, expr: str) -> list[dict]:
        return httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=5).json()["data"]["result"]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(20)


class Load:
    """Streams that ask for long replies from a server with one slot: one runs, the others wait."""

    def __init__(self, url: str, streams: int, headers: dict | None = None) -> None:
        self.stop_event = threading.Event()
        body = {"messages": [{"role": "user", "content": "count"}], "max_tokens": 2000, "ignore_eos": True,
                "stream": True}
        self.statuses: list[int] = []

        def run():
            while not self.stop_event.is_set():
                with httpx.Client(base_url=url, timeout=600, headers=headers) as c:
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
            prom = Prometheus(tmp_path).start(Prometheus.static(server.port, {"namespace": ns, "service": "chat"}))
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


def test_from_zero_a_held_request_is_answered_by_a_real_pod_and_the_queue_scales_real_pods(cluster, operator, keda,
                                                                                         tmp_path):
    ns = cluster.namespace("keda-real")
    operator.stop()
    operator.start(QWEN_OPERATOR_KEDA_HTTP_SCALER_ADDRESS=keda["http_scaler"])
    # Debian's Prometheus is built without its Kubernetes service discovery: scripts/k8s-bin keda builds one with it
    prom = Prometheus(tmp_path, keda["bins"] / "prometheus")
    history: list[int] = []

    def state():
        q = cluster.qwd("chat", ns)
        replicas = q["spec"].get("replicas")
        if not history or history[-1] != replicas:
            history.append(replicas)
        return q

    try:
        obj = process_qwd("chat")
        obj["spec"]["engine"] = {"maxConcurrency": 1, "maxQueue": 64}
        obj["spec"]["autoscaling"] = {"minReplicas": 0, "maxReplicas": 2, "targetWaitingRequests": 2,
                                      "pollingIntervalSeconds": 1, "scaleDownDelaySeconds": 0,
                                      "idleSecondsToZero": 20, "prometheus": {"address": prom.url}}
        cluster.apply(obj, ns)
        sm = cluster.wait("the ServiceMonitor", lambda: cluster.get("servicemonitors", "chat", ns), 60)
        prom.start(Prometheus.for_service_monitor(cluster, sm))
        cluster.wait("Ready at zero replicas, the model fetched", lambda: (lambda st: st.get("phase") == "Ready"
                     and st.get("reason") == "ScaledToZero" and (st.get("cache") or {}).get("ready"))(
                         state().get("status") or {}), 300, interval=1)
        assert not server_pods(cluster, ns, "chat") and history[-1] == 0
        history[:] = [0]  # from here on (the example's own replicas: 1 went first)

        # cluster DNS for the interceptor: the Service's names for its cluster IP (Go reads a changed /etc/hosts
        # again within 5 seconds)
        ip = cluster.get("services", "chat", ns)["spec"]["clusterIP"]
        with open(keda["hosts"], "a") as f:
            f.write(f"{ip} chat.{ns} chat.{ns}.svc chat.{ns}.svc.cluster.local\n")
        time.sleep(6)

        # a request while at zero: the interceptor holds it, KEDA wakes the deployment, its first pod answers it
        host = {"Host": f"chat-interceptor.{ns}"}
        proxy = f"http://127.0.0.1:{keda['proxy']}"
        started = time.monotonic()
        with httpx.Client(base_url=proxy, headers=host, timeout=600) as c:
            r = c.post("/v1/chat/completions", json={"model": "demo", "max_tokens": 8,
                                                     "messages": [{"role": "user", "content": "Hello!"}]})
        held = time.monotonic() - started
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] == "length"
        assert r.headers.get("x-keda-http-cold-start") == "true"
        (pod,) = server_pods(cluster, ns, "chat")
        assert pod["spec"]["nodeName"] == devcluster.PROCESS_NODE and state()["spec"]["replicas"] == 1, history
        served = httpx.get(f"http://{pod['status']['podIP']}:8000/metrics").text
        assert re.search(r'^qwen_request_success_total\{finish_reason="length"\} 1\.0$', served, re.M), served[-3000:]
        print(f"the first request was held {held:.1f}s while the deployment woke from zero")

        # streams wait on the one slot: Prometheus reads the queue on the pods it found through the API server,
        # and KEDA's HPA takes the deployment to maxReplicas, real pods ready behind the Service
        load = Load(proxy, streams=5, headers=host)
        try:
            waiting = f'sum(qwen_requests_waiting{{namespace="{ns}",service="chat"}})'
            cluster.wait("a queue in Prometheus", lambda: (prom.query(waiting) or 0) >= 2, 120)

            def at_max():
                q = state()
                return q["spec"]["replicas"] == 2 and (q["status"].get("readyReplicas") or 0) == 2 \
                    and len(ready_addresses(cluster, ns, "chat")) == 2 and q
            cluster.wait("2 real pods ready", at_max, 300, interval=1)
            assert {p["spec"]["nodeName"] for p in server_pods(cluster, ns, "chat")} == {devcluster.PROCESS_NODE}
            cluster.wait("Prometheus scraping both pods", lambda: len({s["metric"].get("pod") for s in prom.series(
                f'qwen_requests_waiting{{namespace="{ns}",service="chat"}}')}) == 2, 60)
            assert load.statuses and all(s == 200 for s in load.statuses), load.statuses
        finally:
            load.stop()

        # idle: back to zero pods
        cluster.wait("zero replicas and no pod", lambda: state()["spec"]["replicas"] == 0
                     and not server_pods(cluster, ns, "chat"), 300, interval=1)
        assert history[0] == 0 and 2 in history and history[-1] == 0, history
        print("spec.replicas as KEDA and its HPA set them:", history)
    except BaseException:
        print("replicas:", history)
        print("QwenDeployment:", json.dumps((cluster.qwd("chat", ns) or {}).get("status"), indent=1))
        print("HPA:", json.dumps((cluster.get("hpa", "keda-hpa-chat", ns) or {}).get("status"), indent=1))
        for name in ("keda-http-interceptor", "kube-proxy", "keda-http-scaler", "keda-operator"):
            print(f"--- {name}:", keda["procs"].log(name)[-2500:])
        print(subprocess.run(["nft", "list", "table", "ip", "kube-proxy"], capture_output=True, text=True).stdout[-3000:])
        raise
    finally:
        prom.stop()
        operator.stop()
        operator.start()

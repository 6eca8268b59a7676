"""A local Kubernetes control plane without containers: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok's simulated nodes, on loopback ports, from binaries `scripts/k8s-bin` builds.

The API server is real (schema and CEL validation, RBAC, admission with Pod Security, garbage collection),
so are the Deployment, Job, ReplicaSet, PV, EndpointSlice and garbage-collector controllers and the
scheduler. Two kinds of node play the kubelets:

- kwok's simulated nodes mark scheduled pods running and ready and Job pods succeeded, and run nothing;
- process nodes (scripts/nodeagent, needs root) run every pod bound to them for real, as processes with
  their own network namespace and address on a local bridge, volumes, probes and restarts. The project's
  two images map to their Dockerfile ENTRYPOINTs run from the project's virtualenv.

In the test session's cluster the process node carries a taint (PROCESS_TAINT), so only pods that tolerate
it run for real; in the developer's cluster (`scripts/dev-cluster up`) it is the only CPU node, so every pod
that asks for no GPU runs for real, and the kwok GPU node stays for GPU scheduling. There is no volume
provisioner, so a default StorageClass and a pool of pre-made hostPath PersistentVolumes (in the cluster's
state folder) stand in for one, bound by the real PV controller.

Used by `scripts/dev-cluster up|down|env` (and `make dev-cluster`) and by the cluster tests.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KWOK_VERSION = "v0.8.0"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "node-agent")
SIMULATE = "qwen-test.io/simulate"  # pod annotation the test stages react to (what a kubelet would report)
UNFETCHABLE = "qwen-test/unfetchable"  # a model whose fetch Job fails, as a missing hub repo would

NODES = [
    {"name": "cpu-node-1", "cpu": "32", "memory": "128Gi", "gpu": None},
    {"name": "cpu-node-2", "cpu": "32", "memory": "128Gi", "gpu": None},
    {"name": "gpu-node-1", "cpu": "32", "memory": "256Gi", "gpu": "2"},
]
PV_POOL = 160
PROCESS_NODE = "process-node-1"
PROCESS_LABEL = {"qwen-test.io/node-kind": "process"}
PROCESS_TAINT = {"key": "qwen-test.io/process-node", "value": "true", "effect": "NoSchedule"}


def bin_dir() -> Path:
    out = subprocess.run([str(ROOT / "scripts" / "k8s-bin"), "dir"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def free_port() -> int:
    """A loopback port free now (the project's one copy: tests and the bench import it from here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StartError(RuntimeError):
    pass


def wait_for(what: str, check, timeout: float, interval: float = 0.2, logs: Path | None = None):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001: keep the last reason for the error message
            last = exc
        time.sleep(interval)
    tail = ""
    if logs is not None and logs.exists():
        tail = "\n--- last log lines ---\n" + "\n".join(logs.read_text(errors="replace").splitlines()[-25:])
    raise StartError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r}){tail}")


# ---- certificates ------------------------------------------------------------------------------------


def _key():
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(path: Path, key) -> None:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _write_cert(path: Path, cert) -> None:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_pki(pki: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    pki.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    later = now + dt.timedelta(days=365)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "qwen-dev-cluster-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(later)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    _write_key(pki / "ca.key", ca_key)
    _write_cert(pki / "ca.crt", ca)

    def issue(name: str, cn: str, orgs: list[str], server: bool) -> None:
        key = _key()
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] + [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
        b = (x509.CertificateBuilder().subject_name(x509.Name(attrs)).issuer_name(ca_name)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now).not_valid_after(later)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
        if server:
            sans = [x509.DNSName(n) for n in ("localhost", "kubernetes", "kubernetes.default",
                                              "kubernetes.default.svc", "kubernetes.default.svc.cluster.local")]
            sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "10.0.0.1")]
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        else:
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        _write_key(pki / f"{name}.key", key)
        _write_cert(pki / f"{name}.crt", b.sign(ca_key, hashes.SHA256()))

    issue("apiserver", "kube-apiserver", [], server=True)
    issue("admin", "qwen-dev-admin", ["system:masters"], server=False)
    issue("controller-manager", "system:kube-controller-manager", [], server=False)
    issue("scheduler", "system:kube-scheduler", [], server=False)
    issue("front-proxy-client", "front-proxy-client", [], server=False)  # the aggregation layer's client
    issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client", ["system:masters"], server=False)
    sa = _key()
    _write_key(pki / "sa.key", sa)
    (pki / "sa.pub").write_bytes(sa.public_key().public_bytes(serialization.Encoding.PEM,
                                                              serialization.PublicFormat.SubjectPublicKeyInfo))


def kubeconfig(path: Path, server: str, pki: Path, user: str, token: str | None = None) -> None:
    entry = {"token": token} if token else {"client-certificate": str(pki / f"{user}.crt"),
                                           "client-key": str(pki / f"{user}.key")}
    cfg = {
        "apiVersion": "v1", "kind": "Config", "current-context": "qwen-dev",
        "clusters": [{"name": "qwen-dev", "cluster": {"server": server, "certificate-authority": str(pki / "ca.crt")}}],
        "users": [{"name": user, "user": entry}],
        "contexts": [{"name": "qwen-dev", "context": {"cluster": "qwen-dev", "user": user}}],
    }
    path.write_text(json.dumps(cfg, indent=2))
    path.chmod(0o600)


# ---- kwok stages -------------------------------------------------------------------------------------


def _kwok_stage_dir() -> Path:
    out = subprocess.run(["go", "mod", "download", "-json", f"sigs.k8s.io/kwok@{KWOK_VERSION}"],
                         capture_output=True, text=True, env={**os.environ, "GOFLAGS": ""}, cwd="/")
    if out.returncode != 0:
        raise StartError(f"cannot fetch kwok's stages: {out.stderr.strip()}")
    return Path(json.loads(out.stdout)["Dir"]) / "kustomize" / "stage"


def kwok_config() -> str:
    """kwok's own fast stages, plus stages that play what a kubelet would report for the tests: a fetch that
    fails, an OOM-killed server, a crash loop."""
    import yaml

    stage_dir = _kwok_stage_dir()
    docs = []
    for rel in ("node/fast/node-initialize.yaml", "node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
                "pod/fast/pod-ready.yaml", "pod/fast/pod-complete.yaml", "pod/fast/pod-delete.yaml"):
        docs.extend(d for d in yaml.safe_load_all((stage_dir / rel).read_text()) if d)
    not_simulated = {"key": f'.metadata.annotations["{SIMULATE}"]', "operator": "DoesNotExist"}
    not_unfetchable = {"key": ".spec.containers.[0].args.[1]", "operator": "NotIn", "values": [UNFETCHABLE]}
    for d in docs:
        if d["metadata"]["name"] == "pod-ready":
            d["spec"]["selector"]["matchExpressions"].append(not_simulated)
        if d["metadata"]["name"] == "pod-complete":
            d["spec"]["selector"]["matchExpressions"].append(not_unfetchable)
    docs.append(_stage("pod-fetch-fails", [
        {"key": ".metadata.deletionTimestamp", "operator": "DoesNotExist"},
        {"key": ".status.phase", "operator": "In", "values": ["Running"]},
        {"key": ".spec.containers.[0].args.[1]", "operator": "In", "values": [UNFETCHABLE]},
    ], """\
{{ $now := Now }}
phase: Failed
containerStatuses:
{{ range .spec.containers }}
- name: {{ .name | Quote }}
  image: {{ .image | Quote }}
  ready: false
  restartCount: 0
  started: false
  state:
    terminated:
      exitCode: 3
      reason: Error
      startedAt: {{ $now | Quote }}
      finishedAt: {{ $now | Quote }}
      message: "downloading qwen-test/unfetchable@main from huggingface\\nqwen-model: error: downloading \
qwen-test/unfetchable@main failed: RepositoryNotFoundError: the model does not exist, or it is private and no \
valid token was given"
{{ end }}
"""))
    for mode, waiting, last in (("oom", "CrashLoopBackOff", "OOMKilled"), ("crashloop", "CrashLoopBackOff", "Error")):
        docs.append(_stage(f"pod-{mode}", [
            {"key": ".metadata.deletionTimestamp", "operator": "DoesNotExist"},
            {"key": ".status.phase", "operator": "In", "values": ["Pending"]},
            {"key": f'.metadata.annotations["{SIMULATE}"]', "operator": "In", "values": [mode]},
        ], f"""\
{{{{ $now := Now }}}}
phase: Running
conditions:
- type: Initialized
  status: "True"
  lastTransitionTime: {{{{ $now | Quote }}}}
- type: Ready
  status: "False"
  reason: ContainersNotReady
  lastTransitionTime: {{{{ $now | Quote }}}}
- type: ContainersReady
  status: "False"
  lastTransitionTime: {{{{ $now | Quote }}}}
- type: PodScheduled
  status: "True"
  lastTransitionTime: {{{{ $now | Quote }}}}
containerStatuses:
{{{{ range .spec.containers }}}}
- name: {{{{ .name | Quote }}}}
  image: {{{{ .image | Quote }}}}
  ready: false
  restartCount: 3
  started: false
  state:
    waiting:
      reason: {waiting}
      message: "back-off restarting failed container"
  lastState:
    terminated:
      exitCode: 137
      reason: {last}
      startedAt: {{{{ $now | Quote }}}}
      finishedAt: {{{{ $now | Quote }}}}
{{{{ end }}}}
"""))
    return yaml.safe_dump_all(docs, sort_keys=False)


def _stage(name: str, exprs: list[dict], template: str) -> dict:
    return {"apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "Stage", "metadata": {"name": name},
            "spec": {"resourceRef": {"apiGroup": "v1", "kind": "Pod"}, "selector": {"matchExpressions": exprs},
                     "next": {"statusTemplate": template}}}


# ---- the cluster ---------------------------------------------------------------------------------------


class DevCluster:
    """`process_nodes`: run a process node (needs root). `process_default`: it is the only CPU node and takes
    every pod that asks for no GPU (the developer's cluster); otherwise it is tainted with PROCESS_TAINT and
    the kwok CPU nodes take the rest (the test session's cluster)."""

    def __init__(self, state: Path, bins: Path | None = None, process_nodes: bool = True,
                 process_default: bool = False) -> None:
        self.state = Path(state)
        self.bins = bins or bin_dir()
        self.process_nodes = process_nodes
        self.process_default = process_default and process_nodes
        self.pki = self.state / "pki"
        self.logs = self.state / "logs"
        self.run = self.state / "run"
        self.ports_file = self.state / "ports.json"
        self.apiserver_starts: list[float] = []  # wall-clock times the API server was (re)started
        self.procs: dict[str, subprocess.Popen] = {}  # what this object started (reaped when it stops)

    # paths and addresses
    @property
    def kubeconfig_path(self) -> Path:
        return self.state / "admin.kubeconfig"

    @property
    def ports(self) -> dict[str, int]:
        return json.loads(self.ports_file.read_text())

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig_path)}

    @property
    def components(self) -> tuple[str, ...]:
        return COMPONENTS if self.process_nodes else COMPONENTS[:-1]

    @property
    def kwok_nodes(self) -> list[dict]:
        return [n for n in NODES if n["gpu"]] if self.process_default else NODES

    @property
    def node_names(self) -> list[str]:
        return [n["name"] for n in self.kwok_nodes] + ([PROCESS_NODE] if self.process_nodes else [])

    @property
    def pod_network(self) -> dict:
        """The process nodes' network: hostIP (the host's address on the pod bridge), subnet, bridge."""
        return json.loads((self.run / "node-agent.json").read_text())

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60,
                kubeconfig: Path | None = None) -> subprocess.CompletedProcess:
        cmd = [str(self.bins / "kubectl"), "--kubeconfig", str(kubeconfig or self.kubeconfig_path), *args]
        r = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {r.stderr.strip()}")
        return r

    # processes
    def _pidfile(self, name: str) -> Path:
        return self.run / f"{name}.pid"

    def _start(self, name: str, args: list[str], cmd: list[str] | None = None,
               env: dict[str, str] | None = None) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.run.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")
        binary = str(self.bins / ("etcd" if name == "etcd" else name))
        p = subprocess.Popen([*(cmd or [binary]), *args], stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        self._pidfile(name).write_text(str(p.pid))
        self.procs[name] = p
        return p

    def _alive(self, name: str) -> bool:
        pf = self._pidfile(name)
        if not pf.exists():
            return False
        try:
            os.kill(int(pf.read_text()), 0)
            return True
        except (ProcessLookupError, ValueError):
            return False

    def stop_component(self, name: str, timeout: float = 5) -> None:
        pf = self._pidfile(name)
        if not pf.exists():
            return
        try:
            pid = int(pf.read_text())
            os.kill(pid, signal.SIGTERM)
            proc = self.procs.pop(name, None)
            if proc is not None and proc.pid == pid:
                # our own child: wait for it (and reap it: a zombie would look alive to kill(pid, 0))
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            else:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    try:
                        os.kill(pid, 0)
                    except ProcessLookupError:
                        break
                    time.sleep(0.1)
                else:
                    os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
        pf.unlink(missing_ok=True)

    def _ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return ctx

    def _get(self, url: str, ctx: ssl.SSLContext | None = None) -> str:
        with urllib.request.urlopen(url, context=ctx, timeout=5) as r:
            return r.read().decode()

    def _insecure(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx

    # lifecycle
    def up(self, timeout: float = 180) -> "DevCluster":
        if self.ports_file.exists() and all(self._alive(c) for c in self.components):
            return self
        self.down()
        started = time.monotonic()
        for binary in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "kubectl"):
            if not (self.bins / binary).exists():
                raise StartError(f"{self.bins / binary} is missing: run scripts/k8s-bin first")
        if self.process_nodes and os.geteuid() != 0:
            raise StartError("process nodes need root (network namespaces, mounts, cgroups); run as root, or "
                             "without them: QWEN_DEV_CLUSTER_PROCESS_NODES=0")
        self.state.mkdir(parents=True, exist_ok=True)
        if not (self.pki / "apiserver-kubelet-client.key").exists():
            make_pki(self.pki)
        ports = {k: free_port() for k in ("etcd", "etcd_peer", "apiserver", "controller_manager", "scheduler",
                                          "kwok")}
        self.ports_file.write_text(json.dumps(ports))
        kubeconfig(self.kubeconfig_path, self.server, self.pki, "admin")
        kubeconfig(self.state / "controller-manager.kubeconfig", self.server, self.pki, "controller-manager")
        kubeconfig(self.state / "scheduler.kubeconfig", self.server, self.pki, "scheduler")

        self._start("etcd", [
            "--name=qwen-dev", f"--data-dir={self.state / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{ports['etcd']}",
            f"--advertise-client-urls=http://127.0.0.1:{ports['etcd']}",
            f"--listen-peer-urls=http://127.0.0.1:{ports['etcd_peer']}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{ports['etcd_peer']}",
            f"--initial-cluster=qwen-dev=http://127.0.0.1:{ports['etcd_peer']}",
            "--unsafe-no-fsync", "--quota-backend-bytes=4294967296", "--log-level=warn",
        ])
        wait_for("etcd", lambda: "true" in self._get(f"http://127.0.0.1:{ports['etcd']}/health"), 30,
                 logs=self.logs / "etcd.log")
        self.start_apiserver()
        self._start("kube-controller-manager", [
            f"--kubeconfig={self.state / 'controller-manager.kubeconfig'}",
            f"--authentication-kubeconfig={self.state / 'controller-manager.kubeconfig'}",
            f"--authorization-kubeconfig={self.state / 'controller-manager.kubeconfig'}",
            "--bind-address=127.0.0.1", f"--secure-port={ports['controller_manager']}",
            f"--service-account-private-key-file={self.pki / 'sa.key'}",
            f"--root-ca-file={self.pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={self.pki / 'ca.crt'}", f"--cluster-signing-key-file={self.pki / 'ca.key'}",
            "--use-service-account-credentials=true", "--leader-elect=false",
            "--controllers=*,-node-ipam-controller",
            "--concurrent-deployment-syncs=10", "--concurrent-job-syncs=10", "--concurrent-gc-syncs=40",
            "--v=1",
        ])
        self._start("kube-scheduler", [
            f"--kubeconfig={self.state / 'scheduler.kubeconfig'}",
            f"--authentication-kubeconfig={self.state / 'scheduler.kubeconfig'}",
            f"--authorization-kubeconfig={self.state / 'scheduler.kubeconfig'}",
            "--bind-address=127.0.0.1", f"--secure-port={ports['scheduler']}", "--leader-elect=false", "--v=1",
        ])
        (self.state / "kwok.yaml").write_text(kwok_config())
        self._start("kwok", [
            f"--kubeconfig={self.kubeconfig_path}", f"--config={self.state / 'kwok.yaml'}",
            "--manage-all-nodes=false", "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            "--cidr=10.244.0.0/16", "--node-ip=127.0.0.1", f"--server-address=127.0.0.1:{ports['kwok']}",
            # kwok renews the nodes' leases (its heartbeat-with-lease stage updates node status only every 10
            # minutes): without them the node controller found every kwok node NotReady every ~55 seconds and
            # marked its pods not ready, for good
            "--node-lease-duration-seconds=40",
        ])
        insecure = self._insecure()
        for comp, port in (("kube-controller-manager", ports["controller_manager"]),
                           ("kube-scheduler", ports["scheduler"])):
            wait_for(comp, lambda port=port: self._get(f"https://127.0.0.1:{port}/healthz", insecure) == "ok", 60,
                     logs=self.logs / f"{comp}.log")
        self._seed()
        if self.process_nodes:
            self.start_node_agent()
        wait_for("the default ServiceAccount", lambda: self.kubectl(
            "get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0, 60)
        wait_for("the nodes to be Ready", self._nodes_ready, 60, logs=self.logs / "kwok.log")
        print(f"dev-cluster: up in {time.monotonic() - started:.1f}s; export KUBECONFIG={self.kubeconfig_path}",
              file=sys.stderr)
        return self

    def start_apiserver(self) -> None:
        ports = self.ports
        self.apiserver_starts.append(time.time())
        self._start("kube-apiserver", [
            f"--etcd-servers=http://127.0.0.1:{ports['etcd']}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={ports['apiserver']}",
            f"--tls-cert-file={self.pki / 'apiserver.crt'}", f"--tls-private-key-file={self.pki / 'apiserver.key'}",
            f"--client-ca-file={self.pki / 'ca.crt'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={self.pki / 'sa.pub'}",
            f"--service-account-signing-key-file={self.pki / 'sa.key'}",
            "--service-cluster-ip-range=10.0.0.0/24", "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction", "--allow-privileged=true", "--anonymous-auth=false",
            "--endpoint-reconciler-type=none", "--v=1",
            f"--kubelet-client-certificate={self.pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={self.pki / 'apiserver-kubelet-client.key'}",
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            f"--audit-policy-file={self._audit_policy()}", f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json", "--audit-log-maxsize=200",
            *self._aggregation_flags(),
        ])
        ctx = self._ssl()
        wait_for("kube-apiserver", lambda: self._get(f"{self.server}/readyz", ctx) == "ok", 90,
                 logs=self.logs / "kube-apiserver.log")

    def _aggregation_flags(self) -> list[str]:
        """The aggregation layer, for extension API servers (KEDA's metrics adapter serves external.metrics.k8s.io
        through it). The API server reaches them by their Service's address, so one running on loopback is
        registered behind an ExternalName Service `localhost`."""
        if not (self.pki / "front-proxy-client.crt").exists():  # a state folder made before it was added
            return []
        return [f"--requestheader-client-ca-file={self.pki / 'ca.crt'}", "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User", "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={self.pki / 'front-proxy-client.crt'}",
                f"--proxy-client-key-file={self.pki / 'front-proxy-client.key'}"]

    @property
    def audit_log(self) -> Path:
        return self.logs / "audit.log"

    def _audit_policy(self) -> Path:
        """Every request at Metadata level: who did what to which resource (the RBAC test reads it)."""
        path = self.state / "audit-policy.yaml"
        path.write_text(json.dumps({"apiVersion": "audit.k8s.io/v1", "kind": "Policy",
                                    "omitStages": ["RequestReceived"], "rules": [{"level": "Metadata"}]}))
        return path

    def stop_apiserver(self) -> None:
        self.stop_component("kube-apiserver")

    def start_node_agent(self) -> None:
        """The process-node agent, as root, with the cluster's admin credentials and CA."""
        ready = self.run / "node-agent.json"
        ready.unlink(missing_ok=True)
        args = ["--kubeconfig", str(self.kubeconfig_path), "--state", str(self.state / "process-nodes"),
                "--node", PROCESS_NODE, "--pki", str(self.pki), "--ready-file", str(ready),
                "--kubelet-version", self.bins.name if self.bins.name.startswith("v") else "v1.37.2"]
        for k, v in PROCESS_LABEL.items():
            args += ["--label", f"{k}={v}"]
        if not self.process_default:
            t = PROCESS_TAINT
            args += ["--taint", f"{t['key']}={t['value']}:{t['effect']}"]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "scripts"), "PYTHONUNBUFFERED": "1"}
        proc = self._start("node-agent", args, cmd=[sys.executable, "-m", "nodeagent"], env=env)
        deadline = time.monotonic() + 60
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join((self.logs / "node-agent.log").read_text(errors="replace").splitlines()[-20:])
                raise StartError(f"the process-node agent did not register its node:\n{tail}")
            time.sleep(0.2)

    def _nodes_ready(self) -> bool:
        out = json.loads(self.kubectl("get", "nodes", "-o", "json").stdout)
        ready = {n["metadata"]["name"] for n in out["items"] if any(
            c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))
            and not any(t["key"] == "node.kubernetes.io/not-ready" for t in n["spec"].get("taints") or [])}
        return set(self.node_names) <= ready

    def _seed(self) -> None:
        """Nodes, a default StorageClass and a pool of PersistentVolumes."""
        docs = []
        for n in self.kwok_nodes:
            capacity = {"cpu": n["cpu"], "memory": n["memory"], "pods": "110"}
            node = {
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": n["name"], "annotations": {"kwok.x-k8s.io/node": "fake",
                                                                "node.alpha.kubernetes.io/ttl": "0"},
                             "labels": {"kubernetes.io/hostname": n["name"], "kubernetes.io/os": "linux",
                                        "kubernetes.io/arch": "amd64", "type": "kwok"}},
                "spec": {},
                "status": {"capacity": capacity, "allocatable": dict(capacity)},
            }
            if n["gpu"]:
                node["status"]["capacity"]["nvidia.com/gpu"] = n["gpu"]
                node["status"]["allocatable"]["nvidia.com/gpu"] = n["gpu"]
                node["metadata"]["labels"]["nvidia.com/gpu.present"] = "true"
                node["spec"]["taints"] = [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
            docs.append(node)
        docs.append({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": "standard", "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
            "provisioner": "kubernetes.io/no-provisioner", "volumeBindingMode": "Immediate",
            "reclaimPolicy": "Retain", "allowVolumeExpansion": True,
        })
        for i in range(PV_POOL):
            docs.append({
                "apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": {"name": f"pool-{i:03d}", "labels": {"pool": "qwen-dev"}},
                "spec": {"capacity": {"storage": "200Gi"}, "accessModes": ["ReadWriteOnce", "ReadWriteMany"],
                         "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "standard",
                         "hostPath": {"path": str(self.state / "volumes" / f"{i:03d}"), "type": "DirectoryOrCreate"}},
            })
        self.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs), timeout=120)

    def down(self) -> None:
        for name in reversed(COMPONENTS):
            # the agent stops its pods' processes and removes its network first
            self.stop_component(name, timeout=30 if name == "node-agent" else 5)

    def destroy(self) -> None:
        self.down()
        shutil.rmtree(self.state, ignore_errors=True)


def main(argv: list[str]) -> int:
    state = Path(os.environ.get("QWEN_DEV_CLUSTER_STATE", ROOT / ".state" / "dev-cluster"))
    cmd = argv[0] if argv else "up"
    if cmd == "up":
        process = os.environ.get("QWEN_DEV_CLUSTER_PROCESS_NODES", "1") not in ("0", "false", "no")
        dc = DevCluster(state, process_nodes=process, process_default=True).up()
        # the QwenDeployment CRD, so `kubectl apply -f manifests/examples/...` works at once
        dc.kubectl("apply", "--server-side", "-f", str(ROOT / "crds" / "qwendeployments.yaml"))
        dc.kubectl("wait", "--for=condition=Established", "crd/qwendeployments.qwen-operator.io", "--timeout=60s")
        print(f"export KUBECONFIG={state / 'admin.kubeconfig'}")
    elif cmd == "down":
        DevCluster(state, bins=Path(".")).down()
    elif cmd == "destroy":
        DevCluster(state, bins=Path(".")).destroy()
    elif cmd == "env":
        print(f"export KUBECONFIG={state / 'admin.kubeconfig'}")
    elif cmd == "kubeconfig":
        print(state / "admin.kubeconfig")
    else:
        print("usage: dev-cluster up|down|destroy|env|kubeconfig", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

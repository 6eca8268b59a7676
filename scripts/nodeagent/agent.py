"""The node agent: registers process nodes, keeps their leases and status fresh, and runs every pod bound to
them as processes (one PodWorker per pod), reporting pod status to the API server the way a kubelet does."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from . import podspec
from .cgroups import Cgroups
from .images import image_paths, load_images, traverse_paths
from .network import REGISTRY, PodNetwork
from .runtime import Container, VolumeNotReady, now_iso, prepare_volumes

log = logging.getLogger("nodeagent")
CONTAINER_RUNTIME = "process://qwen-process-node"
LABEL_KIND = "qwen-test.io/node-kind"


def _micro_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Api:
    """The few API calls a kubelet makes, on the official client, with plain dicts in and out."""

    def __init__(self, kubeconfig: str) -> None:
        from kubernetes import client, config

        self.client = config.new_client_from_config(config_file=kubeconfig)
        self.core = client.CoreV1Api(self.client)
        self.coordination = client.CoordinationV1Api(self.client)
        from kubernetes.client.exceptions import ApiException

        self.ApiException = ApiException

    @staticmethod
    def _data(resp) -> dict:
        return json.loads(resp.data) if resp.data else {}

    def get(self, kind: str, namespace: str | None, name: str) -> dict | None:
        calls = {
            "PersistentVolumeClaim": self.core.read_namespaced_persistent_volume_claim,
            "Secret": self.core.read_namespaced_secret,
            "ConfigMap": self.core.read_namespaced_config_map,
            "Pod": self.core.read_namespaced_pod,
        }
        try:
            if kind == "PersistentVolume":
                return self._data(self.core.read_persistent_volume(name, _preload_content=False))
            out = self._data(calls[kind](name, namespace, _preload_content=False))
            out.setdefault("kind", kind)
            return out
        except self.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def services(self, namespace: str) -> list[dict]:
        return self._data(self.core.list_namespaced_service(namespace, _preload_content=False)).get("items", [])

    def patch_pod_status(self, pod: dict, status: dict) -> dict:
        meta = pod["metadata"]
        body = {"metadata": {"uid": meta["uid"]}, "status": status}
        return self._data(self.core.patch_namespaced_pod_status(
            meta["name"], meta["namespace"], body, _preload_content=False,
            _content_type="application/strategic-merge-patch+json"))

    def delete_pod(self, pod: dict) -> None:
        """What a kubelet does once a terminating pod's containers are gone: delete it for good."""
        from kubernetes import client

        meta = pod["metadata"]
        try:
            self.core.delete_namespaced_pod(meta["name"], meta["namespace"], _preload_content=False,
                                            body=client.V1DeleteOptions(grace_period_seconds=0,
                                                                        preconditions=client.V1Preconditions(
                                                                            uid=meta["uid"])))
        except self.ApiException as exc:
            if exc.status not in (404, 409):
                raise

    def token(self, pod: dict, audience: str | None, expiration: int) -> str:
        from kubernetes import client

        meta = pod["metadata"]
        spec = client.V1TokenRequestSpec(
            audiences=[audience] if audience else [], expiration_seconds=max(600, int(expiration)),
            bound_object_ref=client.V1BoundObjectReference(kind="Pod", api_version="v1", name=meta["name"],
                                                           uid=meta["uid"]))
        sa = pod["spec"].get("serviceAccountName") or "default"
        out = self._data(self.core.create_namespaced_service_account_token(
            sa, meta["namespace"], client.AuthenticationV1TokenRequest(spec=spec), _preload_content=False))
        return out["status"]["token"]

    def event(self, pod: dict, node: str, type_: str, reason: str, message: str) -> None:
        meta = pod["metadata"]
        now = _micro_now()
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta["uid"]},
            "type": type_, "reason": reason, "message": message[:1024],
            "source": {"component": "kubelet", "host": node},
            "reportingComponent": "kubelet", "reportingInstance": node,
            "firstTimestamp": now[:19] + "Z", "lastTimestamp": now[:19] + "Z", "count": 1,
        }
        self.core.create_namespaced_event(meta["namespace"], body, _preload_content=False)


@dataclass
class Node:
    name: str
    index: int
    cidr: str
    capacity: dict[str, str]
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[dict] = field(default_factory=list)

    @property
    def allocatable(self) -> dict[str, str]:
        return self.capacity


class PodWorker(threading.Thread):
    """One pod on one node, from sandbox to deletion."""

    def __init__(self, agent: "Agent", node: Node, pod: dict) -> None:
        meta = pod["metadata"]
        super().__init__(daemon=True, name=f"pod-{meta['namespace']}/{meta['name']}")
        self.agent, self.node, self.pod = agent, node, pod
        self.api = agent.api
        self.uid = meta["uid"]
        self.key = self.uid.replace("-", "")[:8]
        self.label = f"{meta['namespace']}/{meta['name']}"
        self.pod_dir = agent.state / "pods" / self.uid
        self.shm_dir = Path("/dev/shm") / "qwen-process-nodes" / agent.id / self.uid
        self.hosts_file = self.pod_dir / "etc-hosts"
        self.wake = threading.Event()
        self.gone = threading.Event()  # the pod object no longer exists
        self.netns: str | None = None
        self.pod_ip: str | None = None
        self.volumes = {}
        self.init_containers = [Container(self, c, init=True) for c in pod["spec"].get("initContainers") or []]
        self.containers = [Container(self, c) for c in pod["spec"]["containers"]]
        self.sandbox_ready = False
        self.initialized = not self.init_containers
        self.phase_override: tuple[str, str, str] | None = None  # (phase, reason, message)
        self.started_at = now_iso()
        self.start_mono = time.monotonic()
        self.published: dict | None = None
        self.conditions: dict[str, dict] = {}

    # -- helpers for containers --
    def lookup(self, kind: str, name: str) -> dict | None:
        return self.api.get(kind, self.pod["metadata"]["namespace"], name)

    def services(self) -> list[dict] | None:
        if self.pod["spec"].get("enableServiceLinks", True) is False:
            return None
        return self.api.services(self.pod["metadata"]["namespace"])

    def grace_period(self) -> int:
        meta = self.pod["metadata"]
        if meta.get("deletionGracePeriodSeconds") is not None:
            return int(meta["deletionGracePeriodSeconds"])
        return int(self.pod["spec"].get("terminationGracePeriodSeconds", 30))

    def log_path(self, container: str, number: int) -> Path:
        return self.pod_dir / "logs" / container / f"{number}.log"

    def log_tail(self, container: str, number: int, limit: int = 64 * 1024) -> str:
        p = self.log_path(container, number)
        try:
            with open(p, "rb") as f:
                f.seek(max(0, p.stat().st_size - limit))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def event(self, type_: str, reason: str, message: str) -> None:
        try:
            self.api.event(self.pod, self.node.name, type_, reason, message)
        except Exception as exc:  # noqa: BLE001: an event is worth less than the pod
            log.debug("event on %s failed: %s", self.label, exc)

    def update(self, pod: dict) -> None:
        self.pod = pod
        self.wake.set()

    @property
    def deleting(self) -> bool:
        return bool(self.pod["metadata"].get("deletionTimestamp")) or self.gone.is_set() or self.agent.stopping

    def _sleep(self, seconds: float) -> None:
        self.wake.wait(seconds)
        self.wake.clear()

    # -- the life of the pod --
    def run(self) -> None:
        try:
            self._run()
        except Exception:  # noqa: BLE001
            log.exception("pod %s: the worker failed", self.label)
        finally:
            self._teardown()
            if self.gone.is_set() or self.agent.stopping:
                self.agent.forget(self)

    def _run(self) -> None:
        self.publish()
        if not self._sandbox():
            return self._terminate()
        if not self._volumes():
            return self._terminate()
        if not self._init_containers():
            return self._terminate() if self.deleting else self._finish()
        while True:
            if self.deleting:
                return self._terminate()
            deadline = self.pod["spec"].get("activeDeadlineSeconds")
            if deadline and time.monotonic() - self.start_mono > deadline and self.phase_override is None:
                self.phase_override = ("Failed", "DeadlineExceeded",
                                       "Pod was active on the node longer than the specified deadline")
                for c in self.containers:
                    c.kill("the pod's active deadline was exceeded", float(self.grace_period()))
                    c.restart_pending = False
            self._step(self.containers)
            if all(c.final for c in self.containers):
                self.publish()
                return self._finish()
            self.publish()
            self._sleep(self._next_wake(self.containers))

    def _next_wake(self, containers: list[Container]) -> float:
        now = time.monotonic()
        waits = [c.next_start - now for c in containers if c.state == "waiting" and c.next_start > now]
        return max(0.05, min([1.0] + waits))

    def _step(self, containers: list[Container], policy: str | None = None) -> None:
        policy = policy or self.pod["spec"].get("restartPolicy", "Always")
        now = time.monotonic()
        for c in containers:
            if c.exited:
                code = c.exit_code or 0
                if self.phase_override is not None or not podspec.should_restart(policy, code):
                    c.final = True
                    continue
                ran = _seconds_between(c.instance.terminated["startedAt"], c.instance.terminated["finishedAt"])
                c.crashes = 0 if ran > 600 else getattr(c, "crashes", 0) + 1
                c.schedule_restart(podspec.backoff_seconds(c.crashes), f"{self.label}({self.uid})")
            if c.state == "waiting" and not c.final and now >= c.next_start:
                c.start()

    def _sandbox(self) -> bool:
        spec = self.pod["spec"]
        self.pod_dir.mkdir(parents=True, exist_ok=True)
        if spec.get("hostNetwork"):
            self.pod_ip = self.agent.network.host_ip
            self.netns = f"/proc/{os.getpid()}/ns/net"
        else:
            self.pod_ip = self.agent.network.allocate(self.node.index)
            self.netns = self.agent.network.add_pod(self.key, self.pod_ip)
        hostname = podspec.hostname(self.pod)
        self.hosts_file.write_text("# Kubernetes-managed hosts file (process node)\n127.0.0.1\tlocalhost\n"
                                   "::1\tlocalhost ip6-localhost ip6-loopback\n"
                                   f"{self.pod_ip}\t{hostname}\n")
        os.chmod(self.hosts_file, 0o644)
        self.sandbox_ready = True
        self.publish()
        return not self.deleting

    def _volumes(self) -> bool:
        last = None
        while not self.deleting:
            try:
                self.volumes = prepare_volumes(self)
                return True
            except VolumeNotReady as exc:
                if str(exc) != last:
                    self.event("Warning", "FailedMount", f"MountVolume.SetUp failed: {exc}")
                    last = str(exc)
            except podspec.ConfigError as exc:
                for c in self.init_containers + self.containers:
                    c.waiting = ("CreateContainerConfigError", str(exc))
                if str(exc) != last:
                    self.event("Warning", "Failed", f"Error: {exc}")
                    last = str(exc)
                self.publish()
            self._sleep(2)
        return False

    def _init_containers(self) -> bool:
        policy = self.pod["spec"].get("restartPolicy", "Always")
        init_policy = "Never" if policy == "Never" else "OnFailure"
        for c in self.init_containers:
            while not c.final:
                if self.deleting:
                    return False
                self._step([c], init_policy)
                self.publish()
                if c.final:
                    break
                self._sleep(self._next_wake([c]))
            if c.exit_code != 0:
                self.phase_override = ("Failed", "", f"init container {c.name} failed")
                for other in self.containers:
                    other.final = True
                    other.waiting = ("PodInitializing", "")
                self.publish()
                return False
        self.initialized = True
        return True

    def _terminate(self) -> None:
        """The pod is being deleted: stop every container within the grace period, report, then delete it."""
        grace = float(self.grace_period()) if not self.gone.is_set() and not self.agent.stopping else 0.0
        if self.agent.stopping:
            grace = min(grace, 3.0)
        for c in self.init_containers + self.containers:
            c.restart_pending = False
            if c.running:
                c.kill("", grace, run_pre_stop=grace > 0)
        deadline = time.monotonic() + grace + 10
        while any(c.running for c in self.init_containers + self.containers) and time.monotonic() < deadline:
            self._sleep(0.2)
        for c in self.init_containers + self.containers:
            c.final = True
        if not self.gone.is_set() and not self.agent.stopping:
            self.publish(final=True)
            self._teardown()
            try:
                self.api.delete_pod(self.pod)
            except Exception as exc:  # noqa: BLE001
                log.warning("pod %s: delete failed: %s", self.label, exc)
            self.gone.set()

    def _finish(self) -> None:
        """Every container ended for good: the pod is Succeeded or Failed; it stays until someone deletes it."""
        self.publish(final=True)
        self._teardown()
        while not self.gone.is_set() and not self.agent.stopping:
            if self.pod["metadata"].get("deletionTimestamp"):
                try:
                    self.api.delete_pod(self.pod)
                except Exception as exc:  # noqa: BLE001
                    log.warning("pod %s: delete failed: %s", self.label, exc)
                    self._sleep(2)
                    continue
                self.gone.set()
                break
            self._sleep(5)

    def _teardown(self) -> None:
        if self.netns and not self.pod["spec"].get("hostNetwork"):
            self.agent.network.remove_pod(self.key, self.pod_ip)
        self.netns = None
        shutil.rmtree(self.shm_dir, ignore_errors=True)
        if self.gone.is_set():
            shutil.rmtree(self.pod_dir, ignore_errors=True)

    # -- status --
    def _condition(self, ctype: str, status: bool, reason: str | None = None, message: str | None = None) -> dict:
        value = "True" if status else "False"
        old = self.conditions.get(ctype)
        since = old["lastTransitionTime"] if old and old["status"] == value else now_iso()
        # reason and message always present: null removes an earlier one (a strategic merge patch)
        cond = {"type": ctype, "status": value, "lastTransitionTime": since, "lastProbeTime": None,
                "reason": reason or None, "message": message or None}
        self.conditions[ctype] = cond
        return cond

    def status(self, final: bool = False) -> dict:
        statuses = [c.status() for c in self.containers]
        init_statuses = [c.status() for c in self.init_containers]
        policy = self.pod["spec"].get("restartPolicy", "Always")
        if self.phase_override is not None and all(c.final for c in self.containers):
            phase, reason, message = self.phase_override
        elif final:
            codes = [c.exit_code for c in self.containers]
            phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
            reason, message = "", ""
        elif not self.sandbox_ready or not self.initialized:
            phase, reason, message = "Pending", "", ""
        else:
            phase = podspec.pod_phase(policy, [c.state for c in self.containers],
                                      [c.exit_code for c in self.containers],
                                      [c.restart_pending for c in self.containers])
            reason, message = "", ""
        unready = [s["name"] for s in statuses if not s["ready"]]
        terminal = phase in ("Succeeded", "Failed")
        conds = [self._condition("PodReadyToStartContainers", self.sandbox_ready and not terminal)]
        if self.initialized:
            conds.append(self._condition("Initialized", True))
        else:
            pending = [c.name for c in self.init_containers if c.exit_code != 0]
            conds.append(self._condition("Initialized", False, "ContainersNotInitialized",
                                         f"containers with incomplete status: [{' '.join(pending)}]"))
        if terminal:
            conds.append(self._condition("ContainersReady", False, "PodCompleted"))
            conds.append(self._condition("Ready", False, "PodCompleted"))
        elif unready:
            msg = f"containers with unready status: [{' '.join(unready)}]"
            conds.append(self._condition("ContainersReady", False, "ContainersNotReady", msg))
            conds.append(self._condition("Ready", False, "ContainersNotReady", msg))
        else:
            conds.append(self._condition("ContainersReady", True))
            conds.append(self._condition("Ready", True))
        host_ip = self.agent.network.host_ip
        out = {"phase": phase, "conditions": conds, "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
               "startTime": self.started_at, "containerStatuses": statuses}
        if init_statuses:
            out["initContainerStatuses"] = init_statuses
        if self.pod_ip:
            out["podIP"] = self.pod_ip
            out["podIPs"] = [{"ip": self.pod_ip}]
        if reason:
            out["reason"] = reason
        if message:
            out["message"] = message
        return out

    def publish(self, final: bool = False) -> None:
        if self.gone.is_set():
            return
        st = self.status(final)
        if st == self.published:
            return
        try:
            self.api.patch_pod_status(self.pod, st)
            self.published = st
        except Exception as exc:  # noqa: BLE001: retried at the next change or step
            if getattr(exc, "status", None) in (404, 409):
                self.gone.set()
                return
            log.warning("pod %s: status update failed: %s", self.label, exc)


def _seconds_between(a: str, b: str) -> float:
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    return (dt.datetime.strptime(b, fmt) - dt.datetime.strptime(a, fmt)).total_seconds()


class Agent:
    def __init__(self, kubeconfig: str, state: Path, node_names: list[str], *, labels: dict[str, str] | None = None,
                 taints: list[dict] | None = None, version: str = "v1.37.2", pki: Path | None = None,
                 cpu: str | None = None, memory: str | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.state = Path(state)
        self.state.mkdir(parents=True, exist_ok=True)
        self.id = uuid.uuid4().hex[:4]
        self.api = Api(kubeconfig)
        self.network = PodNetwork(self.id)
        self.cgroups: Cgroups | None = None
        self.run_dir = REGISTRY / self.id
        self.images = load_images()
        self.traverse = traverse_paths()
        self.image_paths = image_paths()
        self.version = version
        self.pki = pki
        self.stopping = False
        self.workers: dict[str, PodWorker] = {}
        self.lock = threading.Lock()
        mem_kib = _meminfo_kib()
        capacity = {"cpu": cpu or str(os.cpu_count() or 1), "memory": memory or f"{mem_kib}Ki", "pods": "110",
                    "ephemeral-storage": f"{_disk_bytes(self.state)}"}
        self.nodes = [Node(name=n, index=i, cidr="", capacity=dict(capacity),
                           labels={"kubernetes.io/hostname": n, "kubernetes.io/os": "linux",
                                   "kubernetes.io/arch": _arch(), "type": "process", LABEL_KIND: "process",
                                   **(labels or {})},
                           taints=list(taints or []))
                      for i, n in enumerate(node_names)]
        self.log_server = None
        self.threads: list[threading.Thread] = []

    # -- lifecycle --
    def start(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("process nodes need root: they make network namespaces, mounts and cgroups")
        self.network.setup()
        self.cgroups = Cgroups(self.id)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.network.record(cgroups=[str(p) for p in self.cgroups.roots.values()],
                            folders=[str(self.run_dir), str(Path("/dev/shm") / "qwen-process-nodes" / self.id)])
        log.info("pod network %s on bridge %s (host %s); cgroups: %s", self.network.subnet, self.network.bridge,
                 self.network.host_ip, self.cgroups.mode)
        from .logserver import LogServer

        self.log_server = LogServer(self, self.network.host_ip, self.pki)
        self.log_server.start()
        for node in self.nodes:
            node.cidr = self.network.node_cidr(node.index)
            self._register(node)
        self._spawn(self._heartbeat, "heartbeat")
        for node in self.nodes:
            self._spawn(lambda node=node: self._watch(node), f"watch-{node.name}")

    def _spawn(self, target, name: str) -> None:
        t = threading.Thread(target=target, daemon=True, name=name)
        t.start()
        self.threads.append(t)

    def stop(self) -> None:
        """Stop every pod's containers (briefly, not their full grace), then remove the network."""
        self.stopping = True
        workers = list(self.workers.values())
        for w in workers:
            w.wake.set()
        containers = [c for w in workers for c in w.init_containers + w.containers]
        deadline = time.monotonic() + 3
        while any(c.running for c in containers) and time.monotonic() < deadline:
            time.sleep(0.1)
        for c in containers:
            c.force_kill()
        for w in workers:
            w.join(10)
        if self.log_server is not None:
            self.log_server.stop()
        if self.cgroups is not None:
            self.cgroups.remove_all()
        self.network.teardown()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        shutil.rmtree(Path("/dev/shm") / "qwen-process-nodes" / self.id, ignore_errors=True)

    def forget(self, worker: PodWorker) -> None:
        with self.lock:
            if self.workers.get(worker.uid) is worker:
                del self.workers[worker.uid]

    def find(self, namespace: str, name: str) -> PodWorker | None:
        with self.lock:
            for w in self.workers.values():
                meta = w.pod["metadata"]
                if meta["namespace"] == namespace and meta["name"] == name:
                    return w
        return None

    # -- nodes --
    def _node_status(self, node: Node) -> dict:
        now = now_iso()
        conds = []
        for ctype, status, reason, message in (
                ("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                ("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                ("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                ("Ready", "True", "KubeletReady", "process-node agent is posting ready status")):
            conds.append({"type": ctype, "status": status, "reason": reason, "message": message,
                          "lastHeartbeatTime": now, "lastTransitionTime": getattr(self, "_since", now)})
        self._since = getattr(self, "_since", now)
        return {
            "capacity": node.capacity, "allocatable": node.allocatable, "conditions": conds,
            "addresses": [{"type": "InternalIP", "address": self.network.host_ip},
                          {"type": "Hostname", "address": node.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.log_server.port}},
            "nodeInfo": {"machineID": self.id, "systemUUID": self.id, "bootID": self.id,
                         "kernelVersion": platform.release(), "osImage": "process node (qwen-operator dev tooling)",
                         "containerRuntimeVersion": CONTAINER_RUNTIME, "kubeletVersion": self.version,
                         "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": _arch()},
        }

    def _register(self, node: Node) -> None:
        body = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": node.name, "labels": node.labels,
                             "annotations": {"node.alpha.kubernetes.io/ttl": "0",
                                             "qwen-test.io/process-node-agent": self.id}},
                "spec": {"podCIDR": node.cidr, "podCIDRs": [node.cidr], "taints": node.taints}}
        try:
            self.api.core.create_node(body, _preload_content=False)
        except self.api.ApiException as exc:
            if exc.status != 409:
                raise
            self.api.core.delete_node(node.name, _preload_content=False)  # an earlier agent's: start afresh
            for _ in range(50):
                try:
                    self.api.core.create_node(body, _preload_content=False)
                    break
                except self.api.ApiException as again:
                    if again.status != 409:
                        raise
                    time.sleep(0.2)
        self.api.core.patch_node_status(node.name, {"status": self._node_status(node)}, _preload_content=False,
                                        _content_type="application/strategic-merge-patch+json")
        self._renew(node)

    def _renew(self, node: Node) -> None:
        spec = {"holderIdentity": node.name, "leaseDurationSeconds": 40, "renewTime": _micro_now()}
        try:
            self.api.coordination.patch_namespaced_lease(node.name, "kube-node-lease", {"spec": spec},
                                                         _preload_content=False,
                                                         _content_type="application/merge-patch+json")
        except self.api.ApiException as exc:
            if exc.status != 404:
                raise
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": node.name, "namespace": "kube-node-lease"}, "spec": spec}
            self.api.coordination.create_namespaced_lease("kube-node-lease", body, _preload_content=False)

    def _heartbeat(self) -> None:
        n = 0
        while not self.stopping:
            time.sleep(1)
            n += 1
            for node in self.nodes:
                try:
                    if n % 10 == 0:
                        self._renew(node)
                    if n % 30 == 0:
                        self.api.core.patch_node_status(
                            node.name, {"status": self._node_status(node)}, _preload_content=False,
                            _content_type="application/strategic-merge-patch+json")
                except Exception as exc:  # noqa: BLE001: the API server may be restarting
                    log.warning("heartbeat of %s failed: %s", node.name, exc)

    # -- pods --
    def _watch(self, node: Node) -> None:
        from kubernetes import watch

        selector = f"spec.nodeName={node.name}"
        while not self.stopping:
            try:
                resp = self.api.core.list_pod_for_all_namespaces(field_selector=selector, _preload_content=False)
                data = json.loads(resp.data)
                seen = set()
                for pod in data.get("items", []):
                    seen.add(pod["metadata"]["uid"])
                    self._sync(node, pod)
                with self.lock:
                    stale = [w for w in self.workers.values() if w.node is node and w.uid not in seen]
                for w in stale:
                    w.gone.set()
                    w.wake.set()
                rv = data["metadata"]["resourceVersion"]
                w = watch.Watch()
                for ev in w.stream(self.api.core.list_pod_for_all_namespaces, field_selector=selector,
                                   resource_version=rv, timeout_seconds=120, allow_watch_bookmarks=True):
                    if self.stopping:
                        w.stop()
                        break
                    kind, obj = ev["type"], ev.get("raw_object") or {}
                    if kind == "ERROR":
                        break
                    if kind == "BOOKMARK":
                        continue
                    pod = dict(obj, kind="Pod", apiVersion="v1")
                    if kind == "DELETED":
                        with self.lock:
                            worker = self.workers.get(pod["metadata"]["uid"])
                        if worker is not None:
                            worker.pod = pod
                            worker.gone.set()
                            worker.wake.set()
                    else:
                        self._sync(node, pod)
            except Exception as exc:  # noqa: BLE001: relist after any watch failure
                if not self.stopping:
                    log.info("pod watch of %s restarts: %s", node.name, exc)
                    time.sleep(1)

    def _sync(self, node: Node, pod: dict) -> None:
        pod.setdefault("kind", "Pod")
        pod.setdefault("apiVersion", "v1")
        uid = pod["metadata"]["uid"]
        with self.lock:
            worker = self.workers.get(uid)
            if worker is not None:
                worker.update(pod)
                return
            if self.stopping:
                return
            phase = (pod.get("status") or {}).get("phase")
            if phase in ("Succeeded", "Failed") or pod["metadata"].get("deletionTimestamp"):
                if pod["metadata"].get("deletionTimestamp"):
                    threading.Thread(target=self._delete_quietly, args=(pod,), daemon=True).start()
                return
            worker = PodWorker(self, node, pod)
            self.workers[uid] = worker
        log.info("pod %s: starting on %s", worker.label, node.name)
        worker.start()

    def _delete_quietly(self, pod: dict) -> None:
        try:
            self.api.delete_pod(pod)
        except Exception as exc:  # noqa: BLE001
            log.warning("delete of %s failed: %s", pod["metadata"]["name"], exc)


def _meminfo_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    return 1024 * 1024


def _disk_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def _arch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(m, m)

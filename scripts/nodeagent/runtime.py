"""Containers on a process node: one container of one pod across its restarts, its volumes, probes and
lifecycle hooks, as the kubelet and a container runtime would run them, with processes instead of images."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import podspec
from .images import Image, ImageError, resolve

if TYPE_CHECKING:
    from .agent import PodWorker

log = logging.getLogger("nodeagent.runtime")
SHIM = str(Path(__file__).with_name("shim.py"))
MIN_GRACE = 2.0  # the kubelet's minimum after a preStop hook ran out the grace period


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- volumes -------------------------------------------------------------------------------------------


class VolumeNotReady(Exception):
    """A volume that cannot be set up yet (claim not bound, secret missing): the kubelet retries."""


@dataclass
class HostVolume:
    path: str
    read_only: bool = False


def _set_group(path: Path, gid: int, read_only: bool) -> None:
    """fsGroup, as the kubelet applies it: group-owned, group-readable (and -writable unless read-only),
    folders setgid so new files inherit the group."""
    for root, dirs, files in os.walk(path):
        for name in [root] + [os.path.join(root, d) for d in dirs] + [os.path.join(root, f) for f in files]:
            try:
                st = os.lstat(name)
                if os.path.islink(name):
                    continue
                os.chown(name, -1, gid)
                mode = st.st_mode & 0o7777
                if os.path.isdir(name):
                    mode |= 0o2050 if read_only else 0o2070
                else:
                    mode |= 0o040 if read_only else 0o060
                    if st.st_mode & 0o100:
                        mode |= 0o010
                os.chmod(name, mode)
            except FileNotFoundError:
                pass


def _write_files(folder: Path, files: dict[str, tuple[bytes, int]], fs_group: int | None) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for rel, (data, mode) in files.items():
        if rel.startswith("/") or ".." in rel.split("/"):
            raise podspec.ConfigError(f"volume file path {rel!r} is invalid")
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.chmod(p, mode)
        if fs_group is not None:
            os.chown(p, -1, fs_group)
    os.chmod(folder, 0o755)
    if fs_group is not None:
        os.chown(folder, -1, fs_group)


def _project_keys(data: dict[str, bytes], items: list[dict] | None, default_mode: int, what: str,
                  optional: bool) -> dict[str, tuple[bytes, int]]:
    if items is None:
        return {k: (v, default_mode) for k, v in data.items()}
    out = {}
    for item in items:
        if item["key"] not in data:
            if optional:
                continue
            raise VolumeNotReady(f"couldn't find key {item['key']} in {what}")
        out[item["path"]] = (data[item["key"]], item.get("mode", default_mode))
    return out


def prepare_volumes(worker: "PodWorker") -> dict[str, HostVolume]:
    """A host folder (or file) for every volume of the pod, made or found now."""
    pod = worker.pod
    spec = pod["spec"]
    ns = pod["metadata"]["namespace"]
    fs_group = (spec.get("securityContext") or {}).get("fsGroup")
    change_policy = (spec.get("securityContext") or {}).get("fsGroupChangePolicy", "Always")
    out: dict[str, HostVolume] = {}
    for vol in spec.get("volumes") or []:
        name = vol["name"]
        if "emptyDir" in vol:
            if (vol["emptyDir"] or {}).get("medium") == "Memory":
                folder = worker.shm_dir / name
            else:
                folder = worker.pod_dir / "volumes" / "empty-dir" / name
            folder.mkdir(parents=True, exist_ok=True)
            os.chmod(folder, 0o777)
            if fs_group is not None:
                _set_group(folder, fs_group, False)
            out[name] = HostVolume(str(folder))
        elif "persistentVolumeClaim" in vol:
            src = vol["persistentVolumeClaim"]
            pvc = worker.api.get("PersistentVolumeClaim", ns, src["claimName"])
            if pvc is None:
                raise VolumeNotReady(f'persistentvolumeclaim "{src["claimName"]}" not found')
            if (pvc.get("status") or {}).get("phase") != "Bound":
                raise VolumeNotReady(f'persistentvolumeclaim "{src["claimName"]}" is not bound')
            pv = worker.api.get("PersistentVolume", None, pvc["spec"]["volumeName"])
            if pv is None:
                raise VolumeNotReady(f'persistentvolume "{pvc["spec"]["volumeName"]}" not found')
            source = pv["spec"].get("hostPath") or pv["spec"].get("local")
            if not source:
                raise podspec.ConfigError(f"persistentvolume {pv['metadata']['name']}: only hostPath and local "
                                          "volumes exist on a process node")
            folder = Path(source["path"])
            folder.mkdir(parents=True, exist_ok=True)
            # like a provisioned disk (not like a bare hostPath): the pod's fsGroup owns it
            if fs_group is not None and (change_policy != "OnRootMismatch" or folder.stat().st_gid != fs_group):
                _set_group(folder, fs_group, False)
            out[name] = HostVolume(str(folder), bool(src.get("readOnly")))
        elif "hostPath" in vol:
            src = vol["hostPath"]
            p = Path(src["path"])
            kind = src.get("type", "")
            if kind == "DirectoryOrCreate":
                p.mkdir(parents=True, exist_ok=True)
            elif kind == "FileOrCreate" and not p.exists():
                p.parent.mkdir(parents=True, exist_ok=True)
                p.touch()
            elif kind == "Directory" and not p.is_dir():
                raise VolumeNotReady(f"hostPath type check failed: {p} is not a directory")
            elif kind == "File" and not p.is_file():
                raise VolumeNotReady(f"hostPath type check failed: {p} is not a file")
            out[name] = HostVolume(str(p))
        elif "secret" in vol or "configMap" in vol or "downwardAPI" in vol or "projected" in vol:
            folder = worker.pod_dir / "volumes" / "files" / name
            _write_files(folder, _file_volume(worker, vol), fs_group)
            out[name] = HostVolume(str(folder), read_only=True)
        else:
            kinds = sorted(k for k in vol if k != "name")
            raise podspec.ConfigError(f"volume {name}: {', '.join(kinds)} volumes do not exist on a process node")
    return out


def _file_volume(worker: "PodWorker", vol: dict) -> dict[str, tuple[bytes, int]]:
    pod = worker.pod
    ns = pod["metadata"]["namespace"]
    if "projected" in vol:
        default_mode = vol["projected"].get("defaultMode", 0o644)
        sources = vol["projected"].get("sources") or []
    else:
        kind = next(k for k in ("secret", "configMap", "downwardAPI") if k in vol)
        default_mode = (vol[kind] or {}).get("defaultMode", 0o644)
        sources = [{kind: vol[kind]}]
    files: dict[str, tuple[bytes, int]] = {}
    for src in sources:
        if "secret" in src or "configMap" in src:
            kind = "Secret" if "secret" in src else "ConfigMap"
            ref = src["secret"] if "secret" in src else src["configMap"]
            obj_name = ref.get("secretName") or ref.get("name")
            obj = worker.api.get(kind, ns, obj_name)
            optional = bool(ref.get("optional"))
            if obj is None:
                if optional:
                    continue
                raise VolumeNotReady(f'{"secret" if kind == "Secret" else "configmap"} "{obj_name}" not found')
            files.update(_project_keys(podspec.decoded_data(obj), ref.get("items"), ref.get("defaultMode",
                                                                                           default_mode),
                                       f"{kind} {ns}/{obj_name}", optional))
        elif "downwardAPI" in src:
            for item in src["downwardAPI"].get("items") or []:
                if "fieldRef" in item:
                    value = podspec.field_value(pod, item["fieldRef"]["fieldPath"])
                else:
                    ref = item["resourceFieldRef"]
                    container = next(c for c in pod["spec"]["containers"] if c["name"] == ref["containerName"])
                    value = podspec.resource_value(container, ref, worker.node.allocatable)
                files[item["path"]] = (value.encode(), item.get("mode", default_mode))
        elif "serviceAccountToken" in src:
            t = src["serviceAccountToken"]
            token = worker.api.token(pod, t.get("audience"), t.get("expirationSeconds", 3600))
            files[t["path"]] = (token.encode(), default_mode)
        else:
            raise podspec.ConfigError(f"projected source {sorted(src)} is not supported on a process node")
    return files


# ---- probes and hooks ----------------------------------------------------------------------------------


def http_get(host: str, port: int, path: str, scheme: str, headers: list[dict] | None,
             timeout: float) -> tuple[bool, str]:
    conn_cls = http.client.HTTPSConnection if scheme.upper() == "HTTPS" else http.client.HTTPConnection
    kwargs: dict[str, Any] = {"timeout": timeout}
    if conn_cls is http.client.HTTPSConnection:
        kwargs["context"] = ssl._create_unverified_context()  # noqa: S323: probes do not verify, as the kubelet
    conn = conn_cls(host, port, **kwargs)
    try:
        hdrs = {"User-Agent": "kube-probe/process-node", "Accept": "*/*"}
        for h in headers or []:
            hdrs[h["name"]] = h["value"]
        conn.request("GET", path or "/", headers=hdrs)
        resp = conn.getresponse()
        body = resp.read(10 * 1024)
        if 200 <= resp.status < 400:
            return True, ""
        return False, f"HTTP probe failed with statuscode: {resp.status}" + (
            f" ({body.decode(errors='replace').strip()[:200]})" if body else "")
    except (OSError, http.client.HTTPException) as exc:
        return False, f'Get "{scheme.lower()}://{host}:{port}{path}": {exc}'
    finally:
        conn.close()


def tcp_connect(host: str, port: int, timeout: float) -> tuple[bool, str]:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, ""
    except OSError as exc:
        return False, f"dial tcp {host}:{port}: {exc}"


class Prober(threading.Thread):
    """One probe of one container instance, run with its delays, period, timeout and thresholds."""

    def __init__(self, container: "Container", kind: str, probe: dict, instance: "Instance") -> None:
        super().__init__(daemon=True, name=f"probe-{kind}-{container.name}")
        self.c, self.kind, self.probe, self.instance = container, kind, probe, instance

    def run(self) -> None:
        p, inst = self.probe, self.instance
        if self.kind != "startup":
            while not inst.started_ok.is_set():
                if inst.done.wait(0.2):
                    return
        if inst.done.wait(p.get("initialDelaySeconds", 0)):
            return
        period = max(1, p.get("periodSeconds", 10))
        success_needed = p.get("successThreshold", 1)
        failure_limit = p.get("failureThreshold", 3)
        successes = failures = 0
        reported = False
        while not inst.done.is_set():
            ok, msg = self.c.run_probe(p, inst)
            if inst.done.is_set():
                return
            if ok:
                successes, failures, reported = successes + 1, 0, False
            else:
                successes, failures = 0, failures + 1
                if not reported:
                    self.c.worker.event("Warning", "Unhealthy", f"{self.kind.capitalize()} probe failed: {msg}")
                    reported = True
            if self.kind == "readiness":
                if ok and successes >= success_needed and not inst.ready:
                    inst.ready = True
                    self.c.worker.wake.set()
                elif not ok and failures >= failure_limit and inst.ready:
                    inst.ready = False
                    self.c.worker.wake.set()
            elif self.kind == "startup":
                if ok:
                    inst.started_ok.set()
                    self.c.worker.wake.set()
                    return
                if failures >= failure_limit:
                    self.c.kill(f"Container {self.c.name} failed startup probe, will be restarted",
                                self.c.probe_grace(p))
                    return
            elif self.kind == "liveness" and failures >= failure_limit:
                self.c.kill(f"Container {self.c.name} failed liveness probe, will be restarted",
                            self.c.probe_grace(p))
                return
            if inst.done.wait(period):
                return


# ---- containers ----------------------------------------------------------------------------------------


class Instance:
    """One run of a container: its process, from start to exit."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.proc: subprocess.Popen | None = None
        self.cgroup = None
        self.started_at = now_iso()
        self.done = threading.Event()
        self.started_ok = threading.Event()
        self.ready = False
        self.terminated: dict | None = None
        self.killing = False
        self.kill_reason: str | None = None
        self.oom_before = 0
        self.files: Path | None = None
        self.root_dirs: Path | None = None
        self.enter_spec: dict = {}


class Container:
    def __init__(self, worker: "PodWorker", spec: dict, init: bool = False) -> None:
        self.worker = worker
        self.spec = spec
        self.name = spec["name"]
        self.init = init
        self.restart_count = 0
        self.instance: Instance | None = None
        self.last_terminated: dict | None = None
        self.waiting: tuple[str, str] = ("ContainerCreating", "")
        self.next_start = 0.0  # when to try to start (again)
        self.restart_pending = False
        self.final = False  # terminated for good (the pod's restart policy says so, or the pod is going)
        self.image: Image | None = None
        self.pull_failures = 0

    # -- status --
    def status(self) -> dict:
        inst = self.instance
        st: dict[str, Any] = {"name": self.name, "image": self.spec.get("image", ""),
                              "imageID": f"process://{self.image.name}" if self.image else "",
                              "restartCount": self.restart_count, "ready": False, "started": False}
        if inst is not None and inst.proc is not None:
            st["containerID"] = f"process://{inst.proc.pid}"
        state = self.state
        if state == "running":
            st["state"] = {"running": {"startedAt": inst.started_at}}
            st["started"] = inst.started_ok.is_set()
            st["ready"] = bool(inst.ready and inst.started_ok.is_set() and not inst.killing)
        elif state == "terminated":
            st["state"] = {"terminated": inst.terminated}
        else:
            reason, message = self.waiting
            st["state"] = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
        if self.last_terminated:
            st["lastState"] = {"terminated": self.last_terminated}
        return st

    @property
    def state(self) -> str:
        """running, terminated (and not to be restarted), or waiting (to be created, or to restart)."""
        inst = self.instance
        if inst is not None and inst.proc is not None and inst.terminated is None:
            return "running"
        if inst is not None and inst.terminated is not None and not self.restart_pending:
            return "terminated"
        return "waiting"

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def exited(self) -> bool:
        """The instance ended and nothing has been decided about it yet."""
        inst = self.instance
        return inst is not None and inst.terminated is not None and not self.restart_pending and not self.final

    @property
    def exit_code(self) -> int | None:
        inst = self.instance
        return inst.terminated["exitCode"] if inst is not None and inst.terminated else None

    def schedule_restart(self, delay: float, pod_label: str) -> None:
        """The instance ended and will be replaced: at once, or after a crash back-off."""
        self.last_terminated = self.instance.terminated
        self.restart_pending = True
        self.next_start = time.monotonic() + delay
        if delay > 0:
            msg = f"back-off {delay:g}s restarting failed container={self.name} pod={pod_label}"
            self.waiting = ("CrashLoopBackOff", msg)
            self.worker.event("Warning", "BackOff", f"Back-off restarting failed container {self.name} in pod "
                                                    f"{pod_label}")

    # -- start --
    def start(self) -> bool:
        """Start a new instance; False (with a waiting reason) when it cannot be created."""
        try:
            return self._start()
        except Exception as exc:  # noqa: BLE001: the runtime failed (a cgroup, a file): retried, as kubelets do
            log.exception("starting %s of %s failed", self.name, self.worker.label)
            self.waiting = ("RunContainerError", f"{type(exc).__name__}: {exc}")
            self.next_start = time.monotonic() + 5
            return False

    def _start(self) -> bool:
        w = self.worker
        try:
            self.image = resolve(w.agent.images, self.spec.get("image", ""))
        except ImageError as exc:
            self.pull_failures += 1
            reason = "ErrImagePull" if self.pull_failures % 2 == 1 else "ImagePullBackOff"
            msg = str(exc) if reason == "ErrImagePull" else f'Back-off pulling image "{self.spec.get("image")}": {exc}'
            if self.waiting[0] != reason:
                w.event("Warning", "Failed" if reason == "ErrImagePull" else "BackOff", msg)
            self.waiting = (reason, msg)
            self.next_start = time.monotonic() + min(300, 5 * 2 ** min(6, self.pull_failures))
            return False
        try:
            env = podspec.container_env(w.pod, self.spec, self.image.env, w.lookup, w.node.allocatable,
                                        w.services())
            argv = podspec.command_line(self.spec, self.image.entrypoint, self.image.cmd, env)
            uid, gid, groups = podspec.user_of(w.pod, self.spec, self.image.user)
            mounts = self._mounts(env)
        except podspec.ConfigError as exc:
            if self.waiting != ("CreateContainerConfigError", str(exc)):
                w.event("Warning", "Failed", f"Error: {exc}")
            self.waiting = ("CreateContainerConfigError", str(exc))
            self.next_start = time.monotonic() + 2
            return False
        number = self.restart_count if self.instance is None else self.restart_count + 1
        if self.instance is not None:
            self.restart_count += 1
        inst = Instance(number)
        files = w.pod_dir / "containers" / self.name / str(number)
        files.mkdir(parents=True, exist_ok=True)
        inst.files = files
        term = files / "termination-log"
        term.write_text("")
        os.chown(term, uid, gid)
        error_file = files / "start-error"
        error_file.unlink(missing_ok=True)
        roots = w.agent.run_dir / "roots" / f"{w.key}-{self.name}-{number}"
        (roots / "root").mkdir(parents=True, exist_ok=True)
        (roots / "scratch").mkdir(parents=True, exist_ok=True)
        inst.root_dirs = roots
        sc = self.spec.get("securityContext") or {}
        resources = self.spec.get("resources") or {}
        limits = resources.get("limits") or {}
        memory = int(podspec.quantity(limits["memory"])) if "memory" in limits else None
        cpu = float(podspec.quantity(limits["cpu"])) if "cpu" in limits else None
        inst.cgroup = w.agent.cgroups.create(f"{w.key}-{self.name}", memory, cpu)
        cwd = self.spec.get("workingDir") or self.image.workdir or "/"
        launch = {
            "netns": w.netns, "hostname": podspec.hostname(w.pod), "root": str(roots / "root"),
            "scratch": str(roots / "scratch"), "readOnlyRoot": bool(sc.get("readOnlyRootFilesystem")),
            "mounts": mounts + [
                {"source": str(w.hosts_file), "target": "/etc/hosts"},
                {"source": str(term), "target": self.spec.get("terminationMessagePath") or "/dev/termination-log"},
            ],
            "cwd": cwd, "uid": uid, "gid": gid, "groups": groups,
            "noNewPrivs": sc.get("allowPrivilegeEscalation") is False, "argv": argv, "env": env,
            "errorFile": str(error_file), "cgroups": inst.cgroup.procs_files, "cgroupMounts": inst.cgroup.mounts,
            "traverse": w.agent.traverse, "imagePaths": w.agent.image_paths,
        }
        inst.enter_spec = {k: launch[k] for k in ("cwd", "uid", "gid", "groups", "noNewPrivs", "env", "cgroups")}
        (files / "launch.json").write_text(json.dumps(launch))
        log_path = w.log_path(self.name, number)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        inst.oom_before = inst.cgroup.oom_kills()
        with open(log_path, "ab") as out:
            inst.proc = subprocess.Popen([sys.executable, SHIM, "run", str(files / "launch.json")],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, close_fds=True, env={"PATH": os.environ["PATH"]})
        inst.started_at = now_iso()
        self.instance = inst
        self.restart_pending = False
        self.waiting = ("ContainerCreating", "")
        threading.Thread(target=self._wait, args=(inst,), daemon=True, name=f"wait-{self.name}").start()
        w.event("Normal", "Started", f"Started container {self.name}")
        if self.spec.get("startupProbe"):
            Prober(self, "startup", self.spec["startupProbe"], inst).start()
        else:
            inst.started_ok.set()
        if self.spec.get("readinessProbe"):
            Prober(self, "readiness", self.spec["readinessProbe"], inst).start()
        else:
            inst.ready = True
        if self.spec.get("livenessProbe"):
            Prober(self, "liveness", self.spec["livenessProbe"], inst).start()
        post = ((self.spec.get("lifecycle") or {}).get("postStart"))
        if post:
            ok, msg = self.run_handler(post, inst, timeout=float(w.grace_period()))
            if not ok:
                w.event("Warning", "FailedPostStartHook", msg)
                self.kill(f"PostStartHook failed: {msg}", float(w.grace_period()))
        return True

    def _mounts(self, env: dict[str, str]) -> list[dict]:
        out = []
        vols = self.worker.volumes
        for m in self.spec.get("volumeMounts") or []:
            vol = vols.get(m["name"])
            if vol is None:
                raise podspec.ConfigError(f"volume {m['name']!r} is not a volume of the pod")
            source = vol.path
            sub = m.get("subPath") or (podspec.expand(m["subPathExpr"], env) if m.get("subPathExpr") else "")
            if sub:
                if sub.startswith("/") or ".." in sub.split("/"):
                    raise podspec.ConfigError(f"subPath {sub!r} is invalid")
                source = os.path.join(source, sub)
                if not os.path.exists(source):
                    os.makedirs(source, exist_ok=True)
            out.append({"source": source, "target": m["mountPath"], "readOnly": bool(m.get("readOnly")) or vol.read_only})
        return out

    # -- run and stop --
    def _wait(self, inst: Instance) -> None:
        rc = inst.proc.wait()
        finished = now_iso()
        try:
            os.killpg(inst.proc.pid, signal.SIGKILL)  # whatever the main process left behind
        except (ProcessLookupError, PermissionError):
            pass
        if inst.cgroup is not None:
            oom = inst.cgroup.oom_kills() > inst.oom_before
            inst.cgroup.kill_all()
        else:
            oom = False
        code = rc if rc >= 0 else 128 - rc
        err = (inst.files / "start-error").read_text() if (inst.files / "start-error").exists() else ""
        if err:
            reason, code, message = "StartError", 128, err
        else:
            reason = "OOMKilled" if oom else ("Completed" if code == 0 else "Error")
            try:
                term_text = (inst.files / "termination-log").read_text(errors="replace")
            except OSError:
                term_text = ""
            message = podspec.termination_message(term_text, self.worker.log_tail(self.name, inst.number),
                                                  self.spec.get("terminationMessagePolicy", "File"), code)
        inst.terminated = {"exitCode": code, "reason": reason, "startedAt": inst.started_at, "finishedAt": finished,
                           "containerID": f"process://{inst.proc.pid}", **({"message": message} if message else {})}
        tail = [line for line in (message or "").splitlines() if line.strip()][-3:]
        log.info("pod %s: container %s (run %d) ended: %s, exit code %d%s", self.worker.label, self.name,
                 inst.number, reason, code, "".join(f"\n    {line[:300]}" for line in tail))
        inst.done.set()
        if inst.cgroup is not None:
            inst.cgroup.remove()
        if inst.root_dirs is not None:
            shutil.rmtree(inst.root_dirs, ignore_errors=True)
        self.worker.wake.set()

    def probe_grace(self, probe: dict) -> float:
        return float(probe.get("terminationGracePeriodSeconds") or self.worker.grace_period())

    def kill(self, reason: str, grace: float, run_pre_stop: bool = True) -> None:
        """Stop the running instance: preStop, SIGTERM, and SIGKILL when the grace period is over."""
        inst = self.instance
        if inst is None or inst.proc is None or inst.done.is_set() or inst.killing:
            return
        inst.killing = True
        inst.kill_reason = reason
        log.info("pod %s: stopping container %s within %gs%s", self.worker.label, self.name, grace,
                 f": {reason}" if reason else "")
        self.worker.event("Normal", "Killing", f"Stopping container {self.name}" + (f": {reason}" if reason else ""))
        self.worker.wake.set()
        threading.Thread(target=self._stop, args=(inst, grace, run_pre_stop), daemon=True,
                         name=f"stop-{self.name}").start()

    def force_kill(self) -> None:
        """SIGKILL at once, every process of the running instance (the agent is going away)."""
        inst = self.instance
        if inst is None or inst.proc is None or inst.done.is_set():
            return
        self._kill(inst)

    @staticmethod
    def _kill(inst: Instance) -> None:
        """SIGKILL to the instance's process group, then to whatever else is left in its cgroup."""
        try:
            os.killpg(inst.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if inst.cgroup is not None:
            inst.cgroup.kill_all()

    def _stop(self, inst: Instance, grace: float, run_pre_stop: bool) -> None:
        deadline = time.monotonic() + grace
        pre = (self.spec.get("lifecycle") or {}).get("preStop")
        if pre and run_pre_stop and grace > 0:
            ok, msg = self.run_handler(pre, inst, timeout=grace)
            if not ok:
                self.worker.event("Warning", "FailedPreStopHook", msg)
        if time.monotonic() > deadline:
            deadline = time.monotonic() + MIN_GRACE
        try:
            os.kill(inst.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        if not inst.done.wait(max(0.0, deadline - time.monotonic())):
            self._kill(inst)

    # -- probes and handlers --
    def pod_ip(self) -> str:
        return self.worker.pod_ip or "127.0.0.1"

    def run_probe(self, probe: dict, inst: Instance) -> tuple[bool, str]:
        timeout = float(probe.get("timeoutSeconds", 1))
        return self._action(probe, inst, timeout)

    def run_handler(self, handler: dict, inst: Instance, timeout: float) -> tuple[bool, str]:
        if "sleep" in handler:
            inst.done.wait(min(timeout, float(handler["sleep"]["seconds"])))
            return True, ""
        return self._action(handler, inst, timeout)

    def _action(self, action: dict, inst: Instance, timeout: float) -> tuple[bool, str]:
        try:
            if "httpGet" in action:
                h = action["httpGet"]
                return http_get(h.get("host") or self.pod_ip(), podspec.probe_port(self.spec, h["port"]),
                                h.get("path", "/"), h.get("scheme", "HTTP"), h.get("httpHeaders"), timeout)
            if "tcpSocket" in action:
                t = action["tcpSocket"]
                return tcp_connect(t.get("host") or self.pod_ip(), podspec.probe_port(self.spec, t["port"]), timeout)
            if "exec" in action:
                return self.exec_in(inst, action["exec"].get("command") or [], timeout)
            if "grpc" in action:
                return False, "grpc probes are not supported on a process node"
        except podspec.ConfigError as exc:
            return False, str(exc)
        return False, f"unknown handler {sorted(action)}"

    def exec_in(self, inst: Instance, argv: list[str], timeout: float) -> tuple[bool, str]:
        if inst.proc is None or inst.done.is_set():
            return False, "the container is not running"
        spec = dict(inst.enter_spec, argv=argv)
        path = inst.files / f"exec-{threading.get_ident()}.json"
        path.write_text(json.dumps(spec))
        try:
            r = subprocess.run([sys.executable, SHIM, "enter", str(inst.proc.pid), str(path)], capture_output=True,
                               timeout=timeout, env={"PATH": os.environ["PATH"]})
        except subprocess.TimeoutExpired:
            return False, f"command timed out after {timeout:g}s"
        finally:
            path.unlink(missing_ok=True)
        out = (r.stdout + r.stderr).decode(errors="replace").strip()
        if r.returncode == 0:
            return True, out
        return False, f"command {argv!r} exited with {r.returncode}: {out[-300:]}"

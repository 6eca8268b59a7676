"""The process node: pods bound to it really run, as processes, with the behaviour a kubelet gives them.

Each test makes bare pods (or a Job) on the project's image with a small Python program as the command, and
checks from outside what the program saw and what the API server was told."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

from .conftest import on_process_node

IMAGE = "registry.example/qwen-inference:test"


def pod(name: str, containers: list[dict], **spec) -> dict:
    for c in containers:
        c.setdefault("image", IMAGE)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": on_process_node({"containers": containers, **spec})}


def python(code: str) -> list[str]:
    return ["python", "-c", code]


def container_status(p: dict, name: str) -> dict:
    return next(c for c in (p.get("status") or {}).get("containerStatuses") or [] if c["name"] == name)


def wait_pod(cluster, ns: str, name: str, check, what: str, timeout: float = 60):
    def probe():
        p = cluster.get("pod", name, ns)
        return p if p and check(p) else None
    try:
        return cluster.wait(f"{ns}/{name}: {what}", probe, timeout, 0.3)
    except AssertionError:
        p = cluster.get("pod", name, ns)
        raise AssertionError(f"{ns}/{name}: {what}; status={json.dumps((p or {}).get('status'), indent=1)}") from None


def logs(cluster, ns: str, name: str, *args: str) -> str:
    return cluster.kubectl("logs", "-n", ns, name, *args).stdout


REPORT = r"""
import json, os, socket, urllib.request
from qwen_inference.sysinfo import cgroup_cpu_limit, cgroup_memory_limit

def attempt(path):
    try:
        with open(path, "w") as f:
            f.write("x")
        return "ok"
    except OSError as e:
        return e.strerror

mounts = {line.split()[1]: line.split()[2] for line in open("/proc/self/mounts")}
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()),
    "hostname": socket.gethostname(), "address": socket.gethostbyname(socket.gethostname()), "cwd": os.getcwd(),
    "env": {k: os.environ.get(k) for k in ("TOKEN", "MODE", "POD_IP", "POD_NAME", "THREADS", "CFG_count", "HOME",
                                           "QWEN_PORT", "LINK")},
    "secret": open("/etc/creds/token").read(), "config": open("/etc/cfg/mode").read(),
    "labels": open("/etc/podinfo/labels").read(),
    "write": {p: attempt(p) for p in ("/scratch/f", "/memory/f", "/cache/written-by-the-pod", "/cache-ro/f",
                                      "/etc/creds/f", "/app/f", "/tmp/f")},
    "memory_fs": mounts.get("/memory"),
    "host": urllib.request.urlopen(os.environ["HOST_URL"], timeout=10).read().decode(),
    "limits": [cgroup_cpu_limit(), cgroup_memory_limit()],
}))
open("/dev/termination-log", "w").write("all checked")
"""


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello from the host"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_a_job_pod_runs_with_its_env_volumes_user_and_network(cluster, tmp_path):
    ns = cluster.namespace("pn-job")
    host = ThreadingHTTPServer((cluster.host_ip, 0), _Hello)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    cluster.apply([
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"token": "s3cret"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"mode": "fast", "count": "3"}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
         "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}},
    ], ns)
    pod_spec = on_process_node({
        "restartPolicy": "Never",
        "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 2000, "runAsNonRoot": True},
        "containers": [{
            "name": "report", "image": IMAGE, "command": python(REPORT),
            "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
            "env": [
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "THREADS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}}},
                {"name": "HOME", "value": "/tmp"},
                {"name": "LINK", "value": "$(MODE)-$(CFG_count)"},
                {"name": "HOST_URL", "value": f"http://{cluster.host_ip}:{host.server_address[1]}/"},
            ],
            "resources": {"limits": {"cpu": "500m", "memory": "512Mi"}},
            "securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False},
            "volumeMounts": [
                {"name": "scratch", "mountPath": "/scratch"}, {"name": "memory", "mountPath": "/memory"},
                {"name": "data", "mountPath": "/cache"}, {"name": "data", "mountPath": "/cache-ro", "readOnly": True},
                {"name": "creds", "mountPath": "/etc/creds"}, {"name": "cfg", "mountPath": "/etc/cfg"},
                {"name": "podinfo", "mountPath": "/etc/podinfo"},
            ],
        }],
        "volumes": [
            {"name": "scratch", "emptyDir": {}}, {"name": "memory", "emptyDir": {"medium": "Memory"}},
            {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
            {"name": "creds", "secret": {"secretName": "creds"}}, {"name": "cfg", "configMap": {"name": "cfg"}},
            {"name": "podinfo", "downwardAPI": {"items": [{"path": "labels",
                                                           "fieldRef": {"fieldPath": "metadata.labels"}}]}},
        ],
    })
    cluster.apply({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "report"},
                   "spec": {"backoffLimit": 0, "template": {"metadata": {"labels": {"probe": "yes"}},
                                                            "spec": pod_spec}}}, ns)
    try:
        job = cluster.wait("the Job to complete", lambda: (lambda j: j if any(
            c["type"] == "Complete" and c["status"] == "True" for c in (j.get("status") or {}).get("conditions") or [])
            else None)(cluster.get("job", "report", ns)), 90)
    except AssertionError:
        pods = cluster.get("pods", namespace=ns)
        raise AssertionError(json.dumps([p.get("status") for p in pods], indent=1)) from None
    finally:
        host.shutdown()
    assert job["status"]["succeeded"] == 1
    p = cluster.get("pods", namespace=ns, selector="job-name=report")[0]
    assert p["status"]["phase"] == "Succeeded" and p["spec"]["nodeName"] == "process-node-1"
    term = container_status(p, "report")["state"]["terminated"]
    assert term["exitCode"] == 0 and term["reason"] == "Completed" and term["message"] == "all checked"
    report = json.loads(logs(cluster, ns, p["metadata"]["name"]).strip().splitlines()[-1])
    assert report["uid"] == 1000 and report["gid"] == 1000 and 2000 in report["groups"]
    assert report["hostname"] == p["metadata"]["name"] and report["cwd"] == "/app"  # the image's WORKDIR
    assert report["address"] == report["env"]["POD_IP"] == p["status"]["podIP"]
    assert ipaddress.ip_address(report["address"]) in ipaddress.ip_network(cluster.dc.pod_network["subnet"])
    assert report["env"] == {"TOKEN": "s3cret", "MODE": "fast", "POD_IP": report["address"],
                             "POD_NAME": p["metadata"]["name"], "THREADS": "1", "CFG_count": "3", "HOME": "/tmp",
                             "QWEN_PORT": "8000", "LINK": "fast-3"}  # QWEN_PORT: from the image's ENV
    assert report["secret"] == "s3cret" and report["config"] == "fast" and 'probe="yes"' in report["labels"]
    assert report["write"] == {"/scratch/f": "ok", "/memory/f": "ok", "/cache/written-by-the-pod": "ok",
                               "/cache-ro/f": "Read-only file system", "/etc/creds/f": "Read-only file system",
                               "/app/f": "Read-only file system", "/tmp/f": "Read-only file system"}
    assert report["memory_fs"] == "tmpfs"
    assert report["host"] == "hello from the host"
    if cluster.dc.pod_network["cgroups"] != "none":
        assert report["limits"] == [1, 512 * 2**20]  # the container sees its own cgroup limits
    # the claim is the bound volume's folder on the host, owned by the pod's fsGroup
    pvc = cluster.get("pvc", "data", ns)
    pv = cluster.get("pv", pvc["spec"]["volumeName"])
    written = os.path.join(pv["spec"]["hostPath"]["path"], "written-by-the-pod")
    assert open(written).read() == "x" and os.stat(written).st_gid == 2000


def test_pods_that_cannot_start_say_why(cluster):
    ns = cluster.namespace("pn-fail")
    cluster.apply([
        pod("unknown-image", [{"name": "c", "image": "busybox:1.36", "command": ["true"]}]),
        pod("missing-secret", [{"name": "c", "command": ["true"], "env": [
            {"name": "X", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}]}]),
        pod("no-such-command", [{"name": "c", "command": ["no-such-program"]}], restartPolicy="Never"),
        pod("fails", [{"name": "c", "command": python("import os, sys; print('about to fail in', os.getcwd()); "
                                                      "sys.exit(7)"),
                       "workingDir": "/var/work", "terminationMessagePolicy": "FallbackToLogsOnError"}],
            restartPolicy="Never"),
    ], ns)
    p = wait_pod(cluster, ns, "unknown-image", lambda p: container_status(p, "c")["state"].get("waiting", {}).get(
        "reason") in ("ErrImagePull", "ImagePullBackOff"), "an image pull error")
    waiting = container_status(p, "c")["state"]["waiting"]
    assert 'image "busybox:1.36" is not available on a process node' in waiting["message"]
    assert p["status"]["phase"] == "Pending"
    p = wait_pod(cluster, ns, "missing-secret", lambda p: container_status(p, "c")["state"].get("waiting", {}).get(
        "reason") == "CreateContainerConfigError", "CreateContainerConfigError")
    assert container_status(p, "c")["state"]["waiting"]["message"] == 'secret "absent" not found'
    p = wait_pod(cluster, ns, "no-such-command", lambda p: p["status"].get("phase") == "Failed", "Failed")
    term = container_status(p, "c")["state"]["terminated"]
    assert term["reason"] == "StartError" and term["exitCode"] == 128
    assert 'exec: "no-such-program": executable file not found in $PATH' in term["message"]
    p = wait_pod(cluster, ns, "fails", lambda p: p["status"].get("phase") == "Failed", "Failed")
    term = container_status(p, "c")["state"]["terminated"]
    assert term["exitCode"] == 7 and term["reason"] == "Error"
    assert term["message"].strip() == "about to fail in /var/work"  # the log's tail, from its workingDir


WEB = r"""
import os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
started = time.monotonic()
open("/tmp/alive", "w").close()
print("web up", flush=True)

class H(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/die":
            os.unlink("/tmp/alive")
        code = 503 if self.path == "/ready" and time.monotonic() - started < 1.5 else 200
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *a):
        pass

ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""


def test_probes_restarts_crash_loop_and_pod_to_pod_traffic(cluster):
    ns = cluster.namespace("pn-probe")
    cluster.apply(pod("web", [
        {"name": "web", "command": python(WEB), "ports": [{"name": "web", "containerPort": 8080}],
         "startupProbe": {"tcpSocket": {"port": "web"}, "periodSeconds": 1, "failureThreshold": 30},
         "readinessProbe": {"httpGet": {"path": "/ready", "port": "web"}, "periodSeconds": 1},
         "livenessProbe": {"exec": {"command": python("import os; os.stat('/tmp/alive')")}, "periodSeconds": 1,
                           "failureThreshold": 2}},
        {"name": "crash", "command": python("print('crash run', flush=True); "
                                            "open('/dev/termination-log', 'w').write('bad things'); exit(3)")},
    ], terminationGracePeriodSeconds=5), ns)
    p = wait_pod(cluster, ns, "web", lambda p: container_status(p, "web")["ready"] and container_status(
        p, "crash")["state"].get("waiting", {}).get("reason") == "CrashLoopBackOff", "web ready, crash looping")
    web, crash = container_status(p, "web"), container_status(p, "crash")
    assert web["started"] and "running" in web["state"] and web["restartCount"] == 0
    assert crash["restartCount"] >= 1 and "back-off" in crash["state"]["waiting"]["message"]
    assert crash["lastState"]["terminated"]["exitCode"] == 3
    assert crash["lastState"]["terminated"]["message"] == "bad things"
    assert p["status"]["phase"] == "Running"
    ready = {c["type"]: c["status"] for c in p["status"]["conditions"]}
    assert ready["Ready"] == "False" and ready["PodReadyToStartContainers"] == "True"
    assert "crash run" in logs(cluster, ns, "web", "-c", "crash", "--previous")
    ip = p["status"]["podIP"]

    # another pod reaches it at its address
    cluster.apply(pod("client", [{"name": "c", "command": python(
        f"import urllib.request; print(urllib.request.urlopen('http://{ip}:8080/ready', timeout=5).read())")}],
        restartPolicy="OnFailure"), ns)
    wait_pod(cluster, ns, "client", lambda p: p["status"].get("phase") == "Succeeded", "Succeeded")
    assert "b'ok'" in logs(cluster, ns, "client")

    # the liveness probe fails: the container is killed and restarted, and is ready again
    assert httpx.get(f"http://{ip}:8080/die", timeout=5).status_code == 200
    p = wait_pod(cluster, ns, "web", lambda p: container_status(p, "web")["restartCount"] == 1 and container_status(
        p, "web")["ready"], "web restarted by its liveness probe and ready again")
    last = container_status(p, "web")["lastState"]["terminated"]
    assert last["reason"] == "Error" and last["exitCode"] in (137, 143)  # SIGKILL, or SIGTERM's default action
    assert logs(cluster, ns, "web", "-c", "web").count("web up") == 1  # a new log for the new run
    events = cluster.kubectl("get", "events", "-n", ns, "--field-selector", "involvedObject.name=web", "-o",
                             "json").stdout
    reasons = {(e["reason"], e["message"].split(":")[0]) for e in json.loads(events)["items"]}
    assert ("Unhealthy", "Liveness probe failed") in reasons and any(r == "BackOff" for r, _ in reasons)


GRACEFUL = r"""
import signal, sys, time
def on_term(*_):
    open("/log/events", "a").write("sigterm\n")
    time.sleep(1)
    open("/log/events", "a").write("exit\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open("/log/events", "a").write("started\n")
while True:
    time.sleep(0.1)
"""
STUBBORN = r"""
import signal, time
signal.signal(signal.SIGTERM, lambda *_: open("/log/stubborn", "a").write("ignored sigterm\n"))
while True:
    time.sleep(0.1)
"""


def test_deletion_runs_pre_stop_then_sigterm_then_sigkill_after_the_grace_period(cluster, tmp_path):
    ns = cluster.namespace("pn-stop")
    folder = tmp_path / "log"
    folder.mkdir()
    folder.chmod(0o777)
    mounts = [{"name": "log", "mountPath": "/log"}]
    cluster.apply(pod("graceful", [
        {"name": "main", "command": python(GRACEFUL), "volumeMounts": mounts,
         "lifecycle": {"preStop": {"exec": {"command": python("open('/log/events', 'a').write('prestop\\n')")}}}},
        {"name": "stubborn", "command": python(STUBBORN), "volumeMounts": mounts},
    ], terminationGracePeriodSeconds=3, volumes=[{"name": "log", "hostPath": {"path": str(folder)}}]), ns)
    p = wait_pod(cluster, ns, "graceful", lambda p: p["status"].get("phase") == "Running" and all(
        "running" in c["state"] for c in p["status"]["containerStatuses"]), "running")
    pids = [int(c["containerID"].split("://")[1]) for c in p["status"]["containerStatuses"]]
    cluster.kubectl("delete", "pod", "graceful", "-n", ns, "--wait=false")
    cluster.wait("the pod to be gone", lambda: cluster.get("pod", "graceful", ns) is None, 60)
    assert (folder / "events").read_text().split() == ["started", "prestop", "sigterm", "exit"]
    assert (folder / "stubborn").read_text().split("\n")[0] == "ignored sigterm"
    for pid in pids:  # both processes are gone: the stubborn one was killed when the grace period ran out
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        assert not alive, pid


def test_a_killed_container_is_restarted(cluster):
    """SIGKILL from outside (an OOM killer, a person) is a crash like any other: restarted, restartCount up."""
    ns = cluster.namespace("pn-kill")
    cluster.apply(pod("sleeper", [{"name": "s", "command": python("import time; time.sleep(3600)")}]), ns)
    p = wait_pod(cluster, ns, "sleeper", lambda p: "running" in container_status(p, "s")["state"], "running")
    pid = int(container_status(p, "s")["containerID"].split("://")[1])
    os.kill(pid, signal.SIGKILL)
    p = wait_pod(cluster, ns, "sleeper", lambda p: container_status(p, "s")["restartCount"] == 1 and "running" in
                 container_status(p, "s")["state"], "restarted")
    last = container_status(p, "s")["lastState"]["terminated"]
    assert last["exitCode"] == 137 and last["reason"] == "Error"
    assert int(container_status(p, "s")["containerID"].split("://")[1]) != pid

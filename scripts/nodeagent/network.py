"""The pod network of a process-node agent: one Linux bridge with a private /16, a network namespace and a
veth pair per pod, one /24 of pod addresses per node. The host holds .0.1 on the bridge, so pods reach the
host's test servers there and the host reaches every pod; nothing is routed beyond the bridge.

Several agents may run on one machine at once (a test session, a developer's cluster): each takes a /16 no
other agent and no host interface uses, under a lock, and records itself in a registry folder; an agent
that died without cleaning up is cleaned up by the next one that starts.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import shutil
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

REGISTRY = Path(os.environ.get("QWEN_PROCESS_NODES_RUN", "/run/qwen-process-nodes"))
CANDIDATES = [ipaddress.ip_network(f"10.{n}.0.0/16") for n in range(200, 250)]


class NetworkError(RuntimeError):
    pass


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def _used_networks() -> list[ipaddress.IPv4Network]:
    used = []
    for line in ip("-4", "-o", "addr", "show").stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            used.append(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    for line in ip("-4", "route", "show").stdout.splitlines():
        dest = line.split()[0]
        if dest != "default":
            try:
                used.append(ipaddress.ip_network(dest, strict=False))
            except ValueError:
                pass
    return used


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


@contextmanager
def _registry_lock():
    REGISTRY.mkdir(parents=True, exist_ok=True)
    with open(REGISTRY / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove(entry: dict) -> None:
    """Everything an agent made: its pods' namespaces (their veths go with them), its bridge, and the folders
    it recorded (its cgroups, whose processes are killed, and its memory-backed volumes)."""
    from .cgroups import remove_tree

    for folder in entry.get("cgroups", []):
        remove_tree(Path(folder))
    for folder in entry.get("folders", []):
        shutil.rmtree(folder, ignore_errors=True)
    prefix = entry["netnsPrefix"]
    for line in ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(prefix):
            ip("netns", "delete", name, check=False)
    ip("link", "delete", entry["bridge"], check=False)


class PodNetwork:
    def __init__(self, agent_id: str) -> None:
        self.id = agent_id  # a few hex digits naming this agent's devices
        self.bridge = f"qpn{agent_id}"
        self.netns_prefix = f"qpn{agent_id}-"
        self.subnet: ipaddress.IPv4Network | None = None
        self._next: dict[int, int] = {}
        self._taken: set[str] = set()
        self._lock = threading.Lock()  # pod workers allocate and release addresses from their own threads

    @property
    def host_ip(self) -> str:
        assert self.subnet is not None
        return str(self.subnet.network_address + 1)

    def node_cidr(self, index: int) -> str:
        assert self.subnet is not None
        return str(ipaddress.ip_network(f"{self.subnet.network_address + 256 * (index + 1)}/24"))

    def setup(self) -> None:
        with _registry_lock():
            taken = []
            for path in REGISTRY.glob("*.json"):
                try:
                    entry = json.loads(path.read_text())
                except ValueError:
                    path.unlink(missing_ok=True)
                    continue
                if _alive(entry["pid"]) and entry["pid"] != os.getpid():
                    taken.append(ipaddress.ip_network(entry["subnet"]))
                else:
                    _remove(entry)
                    path.unlink(missing_ok=True)
            used = _used_networks() + taken
            free = [c for c in CANDIDATES if not any(c.overlaps(u) for u in used)]
            if not free:
                raise NetworkError("no free 10.200-249.0.0/16 network for the pod bridge")
            self.subnet = free[0]
            entry = {"pid": os.getpid(), "subnet": str(self.subnet), "bridge": self.bridge,
                     "netnsPrefix": self.netns_prefix}
            _remove(entry)  # leftovers of an earlier agent with the same id
            ip("link", "add", self.bridge, "type", "bridge")
            ip("addr", "add", f"{self.host_ip}/16", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
            (REGISTRY / f"{self.bridge}.json").write_text(json.dumps(entry))

    def record(self, **extra) -> None:
        """Add what else this agent made to its registry entry, for whoever cleans up after it."""
        with _registry_lock():
            path = REGISTRY / f"{self.bridge}.json"
            entry = json.loads(path.read_text())
            entry.update(extra)
            path.write_text(json.dumps(entry))

    def teardown(self) -> None:
        with _registry_lock():
            _remove({"bridge": self.bridge, "netnsPrefix": self.netns_prefix})
            (REGISTRY / f"{self.bridge}.json").unlink(missing_ok=True)

    def allocate(self, node_index: int) -> str:
        """The next free address of a node's /24, round-robin so a pod's address is not reused at once."""
        cidr = ipaddress.ip_network(self.node_cidr(node_index))
        hosts = list(cidr.hosts())
        with self._lock:
            start = self._next.get(node_index, 0)
            for i in range(len(hosts)):
                addr = str(hosts[(start + i) % len(hosts)])
                if addr not in self._taken:
                    self._taken.add(addr)
                    self._next[node_index] = (start + i + 1) % len(hosts)
                    return addr
        raise NetworkError(f"no free pod address in {cidr}")

    def netns_path(self, key: str) -> str:
        return f"/run/netns/{self.netns_prefix}{key}"

    def add_pod(self, key: str, addr: str) -> str:
        """A namespace with loopback and eth0 at `addr` on the bridge; returns its path."""
        name = f"{self.netns_prefix}{key}"
        host_end, pod_end = f"qh{self.id}{key}"[:15], f"qc{self.id}{key}"[:15]
        ip("netns", "delete", name, check=False)
        ip("link", "delete", host_end, check=False)
        ip("netns", "add", name)
        try:
            ip("link", "add", host_end, "type", "veth", "peer", "name", pod_end, "netns", name)
            ip("link", "set", host_end, "master", self.bridge, "up")
            ip("-n", name, "link", "set", "lo", "up")
            ip("-n", name, "link", "set", pod_end, "name", "eth0")
            ip("-n", name, "addr", "add", f"{addr}/{self.subnet.prefixlen}", "dev", "eth0")
            ip("-n", name, "link", "set", "eth0", "up")
        except NetworkError:
            ip("netns", "delete", name, check=False)
            raise
        return self.netns_path(key)

    def remove_pod(self, key: str, addr: str | None) -> None:
        ip("netns", "delete", f"{self.netns_prefix}{key}", check=False)
        if addr:
            with self._lock:
                self._taken.discard(addr)

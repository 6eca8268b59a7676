"""Per-container cgroups on a process node: the memory limit (so OOMKilled is real), the CPU quota, and a
handle on every process of the container (so stopping it leaves nothing behind). cgroup v1 (the memory
and cpu hierarchies) or v2; without a writable cgroup file system containers run unconfined, and a
process group stands in for the handle."""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

V1 = Path("/sys/fs/cgroup")
PERIOD_US = 100_000


def _writable(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK)


class Cgroups:
    """The cgroup folders of one agent: <hierarchy>/qwen-process-nodes/<agent id>/<container>."""

    def __init__(self, agent_id: str) -> None:
        self.mode = "none"
        self.roots: dict[str, Path] = {}
        sub = Path("qwen-process-nodes") / agent_id
        if _writable(V1 / "memory") and (V1 / "memory" / "memory.limit_in_bytes").exists() and _writable(V1 / "cpu"):
            self.mode = "v1"
            self.roots = {"memory": V1 / "memory" / sub, "cpu": V1 / "cpu" / sub}
        elif (V1 / "cgroup.controllers").exists() and _writable(V1):
            controllers = (V1 / "cgroup.controllers").read_text().split()
            if "memory" in controllers and "cpu" in controllers:
                try:
                    self._enable_v2(V1)
                    (V1 / "qwen-process-nodes").mkdir(exist_ok=True)
                    self._enable_v2(V1 / "qwen-process-nodes")
                    (V1 / sub).mkdir(exist_ok=True)
                    self._enable_v2(V1 / sub)
                    self.mode = "v2"
                    self.roots = {"unified": V1 / sub}
                except OSError:
                    self.mode = "none"
        for root in self.roots.values():
            root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _enable_v2(path: Path) -> None:
        with open(path / "cgroup.subtree_control", "w") as f:
            f.write("+memory +cpu")

    def create(self, name: str, memory_bytes: int | None, cpu_cores: float | None) -> "ContainerCgroup":
        paths = {k: root / name for k, root in self.roots.items()}
        for p in paths.values():
            if p.exists():
                _remove_dir(p)
            p.mkdir()
        cg = ContainerCgroup(self.mode, paths)
        cg.limit(memory_bytes, cpu_cores)
        return cg

    def remove_all(self) -> None:
        for root in self.roots.values():
            remove_tree(root)


def remove_tree(path: Path) -> None:
    """A cgroup folder and every one below it, their processes killed first."""
    if not path.is_dir():
        return
    for child in path.iterdir():
        if child.is_dir():
            remove_tree(child)
    _remove_dir(path)


def _remove_dir(path: Path) -> None:
    for _ in range(50):
        pids = _pids(path / "cgroup.procs")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)


def _pids(procs: Path) -> list[int]:
    try:
        return [int(p) for p in procs.read_text().split()]
    except (OSError, ValueError):
        return []


class ContainerCgroup:
    def __init__(self, mode: str, paths: dict[str, Path]) -> None:
        self.mode = mode
        self.paths = paths

    @property
    def procs_files(self) -> list[str]:
        return [str(p / "cgroup.procs") for p in self.paths.values()]

    @property
    def mounts(self) -> list[dict]:
        """The container's own cgroups where it looks for its limits, /sys/fs/cgroup, as runtimes show them."""
        if self.mode == "v1":
            return [{"source": str(p), "target": f"/sys/fs/cgroup/{k}", "readOnly": True} for k, p in self.paths.items()]
        if self.mode == "v2":
            return [{"source": str(self.paths["unified"]), "target": "/sys/fs/cgroup", "readOnly": True}]
        return []

    def limit(self, memory_bytes: int | None, cpu_cores: float | None) -> None:
        if self.mode == "v1":
            if memory_bytes:
                (self.paths["memory"] / "memory.limit_in_bytes").write_text(str(memory_bytes))
            if cpu_cores:
                (self.paths["cpu"] / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (self.paths["cpu"] / "cpu.cfs_quota_us").write_text(str(max(1000, math.ceil(cpu_cores * PERIOD_US))))
        elif self.mode == "v2":
            p = self.paths["unified"]
            if memory_bytes:
                (p / "memory.max").write_text(str(memory_bytes))
                (p / "memory.swap.max").write_text("0") if (p / "memory.swap.max").exists() else None
            if cpu_cores:
                (p / "cpu.max").write_text(f"{max(1000, math.ceil(cpu_cores * PERIOD_US))} {PERIOD_US}")

    def pids(self) -> list[int]:
        out: set[int] = set()
        for p in self.paths.values():
            out.update(_pids(p / "cgroup.procs"))
        return sorted(out)

    def oom_kills(self) -> int:
        try:
            if self.mode == "v1":
                text = (self.paths["memory"] / "memory.oom_control").read_text()
            elif self.mode == "v2":
                text = (self.paths["unified"] / "memory.events").read_text()
            else:
                return 0
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def kill_all(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def remove(self) -> None:
        for p in self.paths.values():
            _remove_dir(p)

"""Facts about the machine the server runs on: CPU limit, CPU features, memory limit."""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: the cgroup quota (v2 or v1) and the affinity mask, whichever is smaller."""
    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        available = os.cpu_count() or 1
    quota = _cgroup_quota(root)
    if quota is not None:
        return max(1, min(available, math.ceil(quota)))
    return max(1, available)


def _cgroup_quota(root: Path) -> float | None:
    v2 = root / "cpu.max"
    try:
        if v2.is_file():
            text = v2.read_text().split()
            if text and text[0] != "max":
                return int(text[0]) / int(text[1])
            return None
        q, p = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
        if q.is_file() and p.is_file():
            quota, period = int(q.read_text()), int(p.read_text())
            if quota > 0 and period > 0:
                return quota / period
    except (OSError, ValueError, IndexError):
        return None
    return None


def cgroup_memory_limit(root: Path = CGROUP_ROOT) -> int | None:
    """Bytes of memory this cgroup may use, or None when unlimited."""
    for path in (root / "memory.max", root / "memory" / "memory.limit_in_bytes"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            continue
        if value >= 1 << 60:  # v1 reports "unlimited" as a huge number
            return None
        return value
    return None


def available_memory() -> int:
    """Bytes still free for this process: the smaller of the cgroup's headroom and the host's."""
    import psutil

    host = psutil.virtual_memory().available
    limit = cgroup_memory_limit()
    if limit is None:
        return host
    used = 0
    try:
        used = int((CGROUP_ROOT / "memory.current").read_text())
    except (OSError, ValueError):
        pass
    return max(0, min(host, limit - used))


# caps the instructions the engine uses below what the CPU has, as ONEDNN_MAX_CPU_ISA caps oneDNN's (which the
# engine's torch operators use): to measure or reproduce on one machine what a CPU of an older kind does
MAX_CPU_ISA_ENV = "QWEN_MAX_CPU_ISA"
_AMX = {"amx_bf16", "amx_int8", "amx_tile", "amx_fp16"}
# each cap, the flags it hides: avx512_bf16 (Zen 4, Sapphire Rapids without AMX), avx512_vnni (Cascade Lake, Ice
# Lake), avx512 (Skylake-SP), avx2 (no AVX512: Zen 2 and 3, Haswell, Broadwell)
MAX_CPU_ISAS: dict[str, frozenset[str]] = {
    "avx512_bf16": frozenset(_AMX),
    "avx512_vnni": frozenset(_AMX | {"avx512_bf16", "avx512_fp16"}),
    "avx512": frozenset(_AMX | {"avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni"}),
}
# ONEDNN_MAX_CPU_ISA's name for each cap (oneDNN reads it once, at its first primitive), and MKL_ENABLE_INSTRUCTIONS'
# (MKL runs torch's float32 matmuls)
ONEDNN_ISAS = {"avx512_bf16": "AVX512_CORE_BF16", "avx512_vnni": "AVX512_CORE_VNNI", "avx512": "AVX512_CORE",
               "avx2": "AVX2"}
MKL_ISAS = {"avx512_bf16": "AVX512_E3", "avx512_vnni": "AVX512_E1", "avx512": "AVX512", "avx2": "AVX2"}


def torch_isa_env(cap: str) -> dict[str, str]:
    """The environment that holds torch's own operators to `cap`: oneDNN's, MKL's and, below AVX512, ATen's
    vectorised ones (each read at its first use)."""
    env = {"ONEDNN_MAX_CPU_ISA": ONEDNN_ISAS[cap], "MKL_ENABLE_INSTRUCTIONS": MKL_ISAS[cap]}
    if cap == "avx2":
        env["ATEN_CPU_CAPABILITY"] = "avx2"
    return env


def max_cpu_isa() -> str | None:
    """The cap QWEN_MAX_CPU_ISA sets, or None; ValueError for a value that names no cap."""
    value = os.environ.get(MAX_CPU_ISA_ENV, "").strip().lower()
    if not value:
        return None
    if value not in ONEDNN_ISAS:
        raise ValueError(f"{MAX_CPU_ISA_ENV}={value!r} names no instruction set; one of {', '.join(ONEDNN_ISAS)}")
    return value


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (read once: the engine asks every step), less those above QWEN_MAX_CPU_ISA."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = frozenset(line.split(":", 1)[1].split())
            cap = max_cpu_isa()
            if cap == "avx2":
                return frozenset(f for f in flags if not f.startswith(("avx512", "amx")))
            return flags - MAX_CPU_ISAS[cap] if cap else flags
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: CPUs where bfloat16 matmuls beat float32."""
    flags = cpu_flags()
    return bool({"avx512_bf16", "amx_bf16"} & flags)

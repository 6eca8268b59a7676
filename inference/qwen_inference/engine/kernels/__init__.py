"""The engine's own CPU kernels (kernels/cpu.cpp): torch operators under `torch.ops.qwen`.

The library is built once per machine and torch version with torch's C++ extension builder (a C++ compiler and
ninja), into `${QWEN_KERNELS_DIR:-~/.cache/qwen-operator/kernels}/<key>/`, keyed by the source, torch's version
and the flags; the key's name is the library's, so a library found there is loaded as it is, with no compiler
(the container image builds it at image build time: `qwen-model build-kernels`). One library serves every x86
CPU: each kernel picks AVX512-BF16 or AVX512F at run time; on CPUs with AVX2 and FMA but no AVX512 the matmuls
alone run (bf16, int8 and int4; `isa()` says "avx2"). Where it cannot be built or the CPU has neither, the engine runs on torch's
kernels and says why once in the log.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
from pathlib import Path

log = logging.getLogger("qwen_inference.kernels")

SOURCE = Path(__file__).with_name("cpu.cpp")
# -fopenmp: ATen's parallel_for splits a kernel over torch's threads only in code compiled with OpenMP (without it
# every kernel runs on one thread); the OpenMP runtime is torch's own, which the library finds through libtorch
FLAGS = ["-O3", "-fopenmp"]  # torch picks the C++ standard its headers need
_lock = threading.Lock()
_state: dict = {}


def kernels_dir() -> Path:
    base = os.environ.get("QWEN_KERNELS_DIR")
    if base:
        return Path(base)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "qwen-operator" / "kernels"


def library_name() -> str:
    import torch

    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(torch.__version__.encode())
    h.update(" ".join(FLAGS).encode())
    return "qwen_cpu_" + h.hexdigest()[:16]


def library_path() -> Path:
    name = library_name()
    return kernels_dir() / name / f"{name}.so"


def supported_cpu() -> str | None:
    """Why this CPU cannot run the kernels, or None."""
    from ...sysinfo import cpu_flags

    flags = cpu_flags()
    return None if {"avx512f", "avx512bw", "avx512vl"} <= flags or {"avx2", "fma"} <= flags \
        else "this CPU has neither AVX512 nor AVX2"


def build() -> Path:
    """Compile the library (needs a C++ compiler and ninja); return its path."""
    from torch.utils import cpp_extension

    name = library_name()
    out = kernels_dir() / name
    out.mkdir(parents=True, exist_ok=True)
    bin_dir = str(Path(sys.executable).parent)  # the venv's ninja (a dependency) when the system has none
    if shutil.which("ninja") is None and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    cpp_extension.load(name, [str(SOURCE)], extra_cflags=FLAGS, build_directory=str(out), is_python_module=False,
                       verbose=False)
    return out / f"{name}.so"


def cap_isa() -> str | None:
    """Apply QWEN_MAX_CPU_ISA to torch's own operators (`sysinfo.torch_isa_env`: ONEDNN_MAX_CPU_ISA,
    MKL_ENABLE_INSTRUCTIONS and, for a cap below AVX512, ATEN_CPU_CAPABILITY), each left as it is where already set.
    Returns the cap."""
    from ...sysinfo import max_cpu_isa, torch_isa_env

    cap = max_cpu_isa()
    if cap is not None:
        for name, value in torch_isa_env(cap).items():
            os.environ.setdefault(name, value)
    return cap


def load(build_if_missing: bool = True) -> bool:
    """Make `torch.ops.qwen.*` available: load the library, building it first if it is missing. False (with
    the reason in `unavailable()`) when it cannot be had here. QWEN_MAX_CPU_ISA caps the instructions the kernels
    (and torch's operators) use."""
    with _lock:
        if "ok" not in _state:
            cap_isa()
            _state["ok"], _state["reason"] = _load(build_if_missing)
            if not _state["ok"]:
                log.info("CPU kernels unavailable, using torch's: %s", _state["reason"])
        return _state["ok"]


def unavailable() -> str | None:
    return _state.get("reason")


def _load(build_if_missing: bool) -> tuple[bool, str | None]:
    import torch

    reason = supported_cpu()
    if reason:
        return False, reason
    path = library_path()
    if not path.is_file():
        if not build_if_missing:
            return False, f"not built ({path} is missing)"
        try:
            path = build()
        except Exception as exc:  # noqa: BLE001: no compiler, no write access, a toolchain that fails
            lines = str(exc).strip().splitlines()
            return False, f"building them failed: {lines[-1] if lines else repr(exc)}"
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as exc:
        return False, f"loading {path} failed: {exc}"
    from ...sysinfo import max_cpu_isa

    torch.ops.qwen.set_max_isa(max_cpu_isa() or "")
    if not torch.ops.qwen.isa():
        return False, "this CPU has neither AVX512 nor AVX2"
    return True, None

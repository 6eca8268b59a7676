"""The engine's own CPU kernels (kernels/cpu.cpp), compiled once per machine on first use.

Compiled with torch's C++ extension builder into `${QWEN_KERNELS_DIR:-~/.cache/qwen-operator/kernels}`, keyed
by the source, torch's version and the compiler flags, so a container image can ship them prebuilt
(`qwen-serve --build-kernels`). Where no compiler or no AVX512 is found the engine runs on torch's own
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
FLAGS = ["-O3"]  # torch picks the C++ standard its headers need
_lock = threading.Lock()
_state: dict = {}


def kernels_dir() -> Path:
    base = os.environ.get("QWEN_KERNELS_DIR")
    if base:
        return Path(base)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "qwen-operator" / "kernels"


def _key() -> str:
    import torch

    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(torch.__version__.encode())
    h.update(" ".join(FLAGS).encode())
    return "qwen_cpu_" + h.hexdigest()[:16]


def load(build: bool = True):
    """The compiled module, or None (with the reason in `unavailable()`); built on the first call."""
    with _lock:
        if "module" in _state:
            return _state["module"]
        _state["module"], _state["reason"] = _load(build)
        if _state["module"] is None:
            log.info("CPU kernels unavailable, using torch's: %s", _state["reason"])
        return _state["module"]


def unavailable() -> str | None:
    return _state.get("reason")


def _load(build: bool):
    from ...sysinfo import cpu_flags

    flags = cpu_flags()
    if not {"avx512f", "avx512bw", "avx512vl"} <= flags:
        return None, "this CPU has no AVX512"
    name = _key()
    out = kernels_dir() / name
    if not build and not any(out.glob(f"{name}*.so")):
        return None, f"not built in {out}"
    try:
        from torch.utils import cpp_extension

        # the venv's ninja (a dependency) when the system has none
        bin_dir = str(Path(sys.executable).parent)
        if shutil.which("ninja") is None and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
        out.mkdir(parents=True, exist_ok=True)
        module = cpp_extension.load(name, [str(SOURCE)], extra_cflags=FLAGS, build_directory=str(out),
                                    verbose=False)
    except Exception as exc:  # noqa: BLE001: no compiler, no write access, a toolchain that fails
        return None, f"building them failed: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}"
    if not module.isa():
        return None, "this CPU has no AVX512"
    return module, None

"""Defaults sized from the model: memory, cache volume and how long a pod may take to load.

The model is known by its name (the operator never reads a checkpoint): `Qwen/Qwen3.5-2B` is the Qwen3.5
generation at 2B. Each generation lists its published sizes: the parameters qwen-serve loads (Qwen3.5's
checkpoints also carry a vision tower and a multi-token-prediction head, which the cache stores but the
server never reads) and, for the hybrid Qwen3.5 models, the recurrent state each running sequence keeps.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

GI = 1024**3
MI = 1024**2


@dataclass(frozen=True)
class ModelSize:
    params_b: float  # parameters loaded, in billions
    checkpoint_params_b: float  # parameters in the checkpoint (the cache stores them all)
    state_mib_per_sequence: float = 0.0  # recurrent state of linear-attention layers, float32


def _dense(b: float) -> ModelSize:
    return ModelSize(b, b)


# sizes of the published checkpoints (for Qwen3.5, counted from their configs)
GENERATIONS: dict[str, dict[str, ModelSize]] = {
    "qwen3.5": {
        "0.8b": ModelSize(0.75, 0.87, 19.3), "2b": ModelSize(1.88, 2.27, 19.3),
        "4b": ModelSize(4.21, 4.66, 50.2), "9b": ModelSize(8.95, 9.65, 50.2),
    },
    "qwen3": {
        "0.6b": _dense(0.6), "1.7b": _dense(1.7), "4b": _dense(4.02), "8b": _dense(8.19), "14b": _dense(14.8),
        "32b": _dense(32.8),
    },
    "qwen2.5": {
        "0.5b": _dense(0.49), "1.5b": _dense(1.54), "3b": _dense(3.09), "7b": _dense(7.62), "14b": _dense(14.7),
        "32b": _dense(32.8), "72b": _dense(72.7),
    },
}
GENERATION_PATTERNS = (("qwen3.5", r"qwen3\.[56]"), ("qwen3", r"qwen3(?![.\d])"), ("qwen2.5", r"qwen2\.5"))
DEFAULT_PARAMS_B = 1.5
DEMO = ModelSize(0.01, 0.01)


def generation(model_name: str) -> str | None:
    name = model_name.split("/")[-1].lower()
    return next((g for g, pattern in GENERATION_PATTERNS if re.search(pattern, name)), None)


def model_size(model_name: str, source: str) -> ModelSize:
    if source == "demo":
        return DEMO
    name = model_name.split("/")[-1]
    m = re.search(r"(?<![\d.])(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])", name)
    gen = generation(model_name)
    if not m:
        return ModelSize(DEFAULT_PARAMS_B, DEFAULT_PARAMS_B, GENERATIONS["qwen3.5"]["2b"].state_mib_per_sequence
                         if gen == "qwen3.5" else 0.0)
    key = f"{m.group(1)}b".lower()
    for g in ([gen] if gen else []) + [g for g in GENERATIONS if g != gen]:
        if key in GENERATIONS[g]:
            return GENERATIONS[g][key]
    b = float(m.group(1))
    # an unlisted size of a hybrid generation: scale the state with the parameters from the nearest listed size
    state = 0.0
    if gen == "qwen3.5":
        nearest = min(GENERATIONS[gen].values(), key=lambda s: abs(s.params_b - b))
        state = nearest.state_mib_per_sequence
    return ModelSize(b, b, state)


def params_billions(model_name: str, source: str) -> float:
    return model_size(model_name, source).params_b


def bytes_per_param(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def weight_bytes(model_name: str, source: str, dtype: str) -> float:
    return params_billions(model_name, source) * 1e9 * bytes_per_param(dtype)


def state_bytes(model_name: str, source: str, max_concurrency: int) -> float:
    """Recurrent state for every sequence that may run at once (the server allocates it up front)."""
    return model_size(model_name, source).state_mib_per_sequence * MI * max_concurrency


def gi(n_bytes: float) -> str:
    return f"{max(1, math.ceil(n_bytes / GI))}Gi"


def default_resources(model_name: str, source: str, device: str, dtype: str, gpus: int,
                      max_concurrency: int = 16) -> dict:
    w = weight_bytes(model_name, source, dtype)
    state = state_bytes(model_name, source, max_concurrency)
    if device == "gpu":
        memory = gi(4 * GI + 0.25 * w)
        return {"requests": {"cpu": "2", "memory": memory},
                "limits": {"cpu": "4", "memory": memory, "nvidia.com/gpu": str(gpus)}}
    memory = gi(1.15 * w + state + 1.5 * GI)
    return {"requests": {"cpu": "2", "memory": memory}, "limits": {"cpu": "2", "memory": memory}}


def default_cache_size(model_name: str, source: str) -> str:
    if source == "demo":
        return "1Gi"
    # checkpoints ship in 16-bit: two bytes a parameter, plus tokenizer and room to grow
    return gi(1.3 * model_size(model_name, source).checkpoint_params_b * 1e9 * 2 + GI)


def startup_seconds(model_name: str, source: str, device: str, dtype: str) -> int:
    """A generous bound on load time: slow CPU loads must not be killed by the startup probe."""
    w_gb = weight_bytes(model_name, source, dtype) / 1e9
    estimate = 120 + (30 * w_gb if device == "cpu" else 12 * w_gb)
    return int(max(300, 3 * estimate))

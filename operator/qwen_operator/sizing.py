"""Defaults sized from the model: memory, cache volume and how long a pod may take to load."""

from __future__ import annotations

import math
import re

GI = 1024**3
KNOWN_PARAMS_B = {  # Qwen2.5 instruct family, in billions of parameters
    "0.5b": 0.49, "1.5b": 1.54, "3b": 3.09, "7b": 7.62, "14b": 14.7, "32b": 32.8, "72b": 72.7,
}
DEFAULT_PARAMS_B = 1.5


def params_billions(model_name: str, source: str) -> float:
    if source == "demo":
        return 0.01
    m = re.search(r"(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])", model_name.split("/")[-1])
    if not m:
        return DEFAULT_PARAMS_B
    key = f"{m.group(1)}b".lower()
    return KNOWN_PARAMS_B.get(key, float(m.group(1)))


def bytes_per_param(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def weight_bytes(model_name: str, source: str, dtype: str) -> float:
    return params_billions(model_name, source) * 1e9 * bytes_per_param(dtype)


def gi(n_bytes: float) -> str:
    return f"{max(1, math.ceil(n_bytes / GI))}Gi"


def default_resources(model_name: str, source: str, device: str, dtype: str, gpus: int) -> dict:
    w = weight_bytes(model_name, source, dtype)
    if device == "gpu":
        memory = gi(4 * GI + 0.25 * w)
        return {"requests": {"cpu": "2", "memory": memory},
                "limits": {"cpu": "4", "memory": memory, "nvidia.com/gpu": str(gpus)}}
    memory = gi(1.15 * w + 1.5 * GI)
    return {"requests": {"cpu": "2", "memory": memory}, "limits": {"cpu": "2", "memory": memory}}


def default_cache_size(model_name: str, source: str) -> str:
    if source == "demo":
        return "1Gi"
    # checkpoints ship in 16-bit: two bytes a parameter, plus tokenizer and room to grow
    return gi(1.3 * params_billions(model_name, source) * 1e9 * 2 + GI)


def startup_seconds(model_name: str, source: str, device: str, dtype: str) -> int:
    """A generous bound on load time: slow CPU loads must not be killed by the startup probe."""
    w_gb = weight_bytes(model_name, source, dtype) / 1e9
    estimate = 120 + (30 * w_gb if device == "cpu" else 12 * w_gb)
    return int(max(300, 3 * estimate))

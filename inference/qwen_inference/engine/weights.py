"""Reading checkpoints and the matmul kernels every model family shares: plain, widened and int8."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


class UnsupportedModel(ValueError):
    """The folder holds a model this engine cannot run (an unknown architecture, a missing tensor)."""


def release_memory() -> None:
    """Hand freed heap memory back to the OS after loading, so the resident size is the weights' size."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class Checkpoint:
    """Tensors of a safetensors checkpoint (one file or shards), read one at a time into memory of our own,
    so no memory map outlives loading and tensors never asked for (a vision tower) are never read."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self.where = json.loads(index.read_text())["weight_map"]
        else:
            from safetensors import safe_open

            single = self.folder / "model.safetensors"
            if not single.is_file():
                raise UnsupportedModel(f"{self.folder} has no model.safetensors or model.safetensors.index.json")
            with safe_open(str(single), framework="pt") as f:
                self.where = {k: "model.safetensors" for k in f.keys()}
        self.files: dict[str, Any] = {}

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.files.clear()

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.where:
            raise UnsupportedModel(f"the checkpoint has no tensor {name}")
        shard = self.where[name]
        if shard not in self.files:
            self.files[shard] = safe_open(str(self.folder / shard), framework="pt")
        t = self.files[shard].get_tensor(name)
        return t.to(device=device, dtype=dtype, copy=True)

    def maybe(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        return self.get(name, dtype, device) if self.has(name) else None

    def cat(self, names: list[str], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Several weights stacked along their output rows: one matmul instead of several."""
        return torch.cat([self.get(n, dtype, device) for n in names]).contiguous()


@dataclass
class QuantWeight:
    """An int8 weight with one float32 scale per output channel (symmetric)."""

    q: torch.Tensor  # [out, in] int8
    scale: torch.Tensor  # [out] float32

    @classmethod
    def of(cls, w: torch.Tensor) -> "QuantWeight":
        wf = w.float()
        scale = (wf.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q.contiguous(), scale.contiguous())

    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 4

    @property
    def device(self) -> torch.device:
        return self.q.device


def int8_linear(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T with x quantized per row (token) on the fly: int8 products, int32 sums, float32 out."""
    xf = x.float()
    sx = xf.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(127.0)
    xq = (xf / sx).round_().to(torch.int8)  # |x| / (max|x| / 127) never rounds past 127
    out = torch._int_mm(xq, w.q.t()).float()
    out.mul_(sx).mul_(w.scale)
    if bias is not None:
        out.add_(bias)
    return out


Weight = torch.Tensor | QuantWeight


def linear(x: torch.Tensor, w: Weight, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ b) in x's dtype: int8 weights quantize x per token, float weights are widened to x's dtype
    when x is wider (bfloat16 weights in a float32 prompt chunk on CPU)."""
    if isinstance(w, QuantWeight):
        return int8_linear(x, w, b)
    if w.dtype != x.dtype:
        w = w.to(x.dtype)
        b = b.to(x.dtype) if b is not None else None
    return F.linear(x, w, b)


def quantize_int8(w: torch.Tensor) -> QuantWeight:
    return QuantWeight.of(w)


def tensor_bytes(tensors) -> int:
    """Bytes of distinct tensors (tied weights counted once); int8 weights with their scales."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None:
            continue
        if isinstance(t, QuantWeight):
            total += t.nbytes()
            continue
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total

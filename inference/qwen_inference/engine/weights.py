"""Reading checkpoints and the matmul kernels every model family shares: plain, widened and int8."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


class UnsupportedModel(ValueError):
    """The folder holds a model of an architecture (or a feature of one) this engine does not run."""


class CheckpointError(ValueError):
    """The checkpoint does not hold what its configuration says (a missing tensor, a wrong shape)."""


def release_memory() -> None:
    """Hand freed heap memory back to the OS after loading, so the resident size is the weights' size."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


# safetensors' dtype names, for the tensors read straight from the file
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


class Checkpoint:
    """Tensors of a safetensors checkpoint (one file or shards), read one at a time into memory of our own,
    so no memory map outlives loading and tensors never asked for (a vision tower) are never read.

    A tensor stored in the dtype it is wanted in, for the CPU, is read from the file straight into its tensor (one
    copy from the page cache; stacked weights into their rows of the stacked tensor); others go through safetensors'
    memory map and a conversion. Reading through the map and then copying took twice as long (faulting the map's
    pages in, then the copy's)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        self.files: dict[str, Any] = {}
        self.headers: dict[str, tuple[dict, int]] = {}
        if index.is_file():
            self.where = json.loads(index.read_text())["weight_map"]
        else:
            if not (self.folder / "model.safetensors").is_file():
                raise CheckpointError(f"{self.folder} has no model.safetensors or model.safetensors.index.json")
            header, _ = self._header("model.safetensors")
            self.where = {k: "model.safetensors" for k in header if k != "__metadata__"}

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.files.clear()

    def has(self, name: str) -> bool:
        return name in self.where

    def _header(self, shard: str) -> tuple[dict, int]:
        """A shard's safetensors header (each tensor's dtype, shape and byte range) and where its data begins."""
        if shard not in self.headers:
            with open(self.folder / shard, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                try:
                    header = json.loads(fh.read(size))
                except ValueError:
                    header = None
            if not isinstance(header, dict):
                raise CheckpointError(f"{shard} is not a safetensors file (its header does not parse)")
            self.headers[shard] = (header, 8 + size)
        return self.headers[shard]

    def _entry(self, name: str) -> tuple[str, dict, int]:
        """(shard, the tensor's header entry, where the shard's data begins)."""
        if name not in self.where:
            raise CheckpointError(f"the checkpoint has no tensor {name}")
        shard = self.where[name]
        header, start = self._header(shard)
        if name not in header:
            raise CheckpointError(f"{shard} has no tensor {name}")
        return shard, header[name], start

    def _direct(self, name: str, dtype: torch.dtype, device: torch.device) -> tuple | None:
        """(shard, byte offset, shape) when `name` can be read straight into a CPU tensor of `dtype`."""
        if torch.device(device).type != "cpu":
            return None
        shard, entry, start = self._entry(name)
        if SAFETENSORS_DTYPES.get(entry["dtype"]) != dtype:
            return None
        return shard, start + entry["data_offsets"][0], tuple(entry["shape"])

    def _read(self, shard: str, offset: int, out: torch.Tensor) -> None:
        view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        with open(self.folder / shard, "rb", buffering=0) as fh:
            fh.seek(offset)
            done = 0
            while done < len(view):  # one read() gives at most about 2 GiB
                n = fh.readinto(view[done:])
                if not n:
                    raise CheckpointError(f"{shard} ends inside a tensor")
                done += n

    def get(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        direct = self._direct(name, dtype, device)
        if direct is not None:
            shard, offset, shape = direct
            out = torch.empty(shape, dtype=dtype)
            self._read(shard, offset, out)
            return out
        from safetensors import safe_open

        shard = self.where[name]
        if shard not in self.files:
            self.files[shard] = safe_open(str(self.folder / shard), framework="pt")
        t = self.files[shard].get_tensor(name)
        return t.to(device=device, dtype=dtype, copy=True)

    def maybe(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        return self.get(name, dtype, device) if self.has(name) else None

    def cat(self, names: list[str], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Several weights stacked along their output rows: one matmul instead of several."""
        direct = [self._direct(n, dtype, device) for n in names]
        rest = {d[2][1:] for d in direct if d is not None}
        if any(d is None for d in direct) or len(rest) != 1 or any(len(d[2]) == 0 for d in direct):
            return torch.cat([self.get(n, dtype, device) for n in names]).contiguous()
        out = torch.empty((sum(d[2][0] for d in direct), *rest.pop()), dtype=dtype)
        row = 0
        for shard, offset, shape in direct:
            self._read(shard, offset, out[row:row + shape[0]])
            row += shape[0]
        return out


class Quantized:
    """A weight stored in fewer bits, with its own matmul. Subclasses are dataclasses whose tensors hold the weight
    (codes, scales, sums), so its bytes and its device follow from them."""

    def _tensors(self) -> list[torch.Tensor]:
        return [v for v in vars(self).values() if isinstance(v, torch.Tensor)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    @property
    def device(self) -> torch.device:
        return self._tensors()[0].device

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# weights are quantized this many rows at a time: each slice's float32 copy and the steps over it stay in cache
# (a whole weight at once went through memory at every step: 2.7 against 0.5 s for a 151 936 × 896 output layer)
QUANTIZE_ROWS = 256


@dataclass
class Int8Weight(Quantized):
    """An int8 weight with one float32 scale per output channel (symmetric). Activations are quantized per
    row (token) on the fly and multiplied with integer products, at every batch size: torch's weight-only
    int8 kernel (`_weight_int8pack_mm`) measured slower at every row count, one row included
    (bench/README.md), and per-row activation scales keep a sequence's output independent of its batch."""

    q: torch.Tensor  # [out, in] int8
    scale: torch.Tensor  # [out] float32
    rowsum: torch.Tensor  # [out] int32, each row's sum (the engine's int8 kernel takes its unsigned offset out)

    @classmethod
    def of(cls, w: torch.Tensor) -> "Int8Weight":
        n = w.shape[0]
        q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        scale = torch.empty(n, dtype=torch.float32, device=w.device)
        rowsum = torch.empty(n, dtype=torch.int32, device=w.device)
        for lo in range(0, n, QUANTIZE_ROWS):
            hi = lo + QUANTIZE_ROWS
            wf = w[lo:hi].float()
            s = wf.abs().amax(dim=1).div_(127.0).clamp_(min=1e-12)
            q[lo:hi] = wf.div_(s[:, None]).round_().clamp_(-127, 127)
            scale[lo:hi] = s
            torch.sum(q[lo:hi], dim=1, dtype=torch.int32, out=rowsum[lo:hi])
        return cls(q, scale, rowsum)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weight, in float32 (an embedding table tied to this output layer)."""
        return self.q[ids].float() * self.scale[ids][:, None]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self)


def int8_linear(x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T with x quantized per row (token) on the fly: int8 products, int32 sums, float32 out. The sums are
    exact where oneDNN has VNNI (or AMX); without it its pair sums can saturate, and the platform sends every int8
    step to the engine's kernel instead (`Platform.int8_kernel_rows`)."""
    xf = x.float()
    sx = xf.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(127.0)
    xq = (xf / sx).round_().to(torch.int8)  # |x| / (max|x| / 127) never rounds past 127
    out = torch._int_mm(xq, w.q.t()).float()
    out.mul_(sx).mul_(w.scale)
    if bias is not None:
        out.add_(bias)
    return out


INT4_GROUP = 32


def int4_groups(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit groups of `group` inputs, as both int4 layouts store them: (q `[out, in / group, group]`
    in 0..15, float32; each group's scale and minimum `[out, in / group]`), w ≈ q * scale + min."""
    n, k = w.shape
    g = w.float().view(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    return torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15), scale, lo


@dataclass
class Int4Weight(Quantized):
    """A 4-bit weight in groups of 32 inputs, each group with its own scale and offset (asymmetric, as
    llama.cpp's Q4_1), packed for torch's CPU int4 kernel; multiplies bfloat16 activations."""

    packed: torch.Tensor  # [out, in / 2] uint8, the kernel's layout
    scales_zeros: torch.Tensor  # [in / group, out, 2] bfloat16
    group: int
    shape: tuple[int, int]

    @classmethod
    def of(cls, w: torch.Tensor, group: int = INT4_GROUP) -> "Int4Weight":
        n, k = w.shape
        if k % group:
            raise UnsupportedModel(f"int4 needs input sizes that are multiples of {group} (this one is {k})")
        q, scale, lo = int4_groups(w, group)
        q = q.to(torch.int32).view(n, k)
        # the kernel computes (q - 8) * scale + zero: the group's minimum sits at zero - 8 * scale
        zero = lo + 8 * scale
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        return cls(packed, sz, group, (n, k))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        out = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), self.packed, self.group,
                                                self.scales_zeros)
        return out if x.dtype == torch.bfloat16 else out.to(x.dtype)


# prompt chunks of at least this many rows dequantize an int4 block weight to bf16 and run one GEMM (oneDNN):
# 4.6 against 4.7 ms at 64 rows on a 9728 × 896 weight, 15.4 against 17.4 ms at 256 (bench/README.md)
INT4_GEMM_ROWS = 64


@dataclass
class Int4BlockWeight(Quantized):
    """A 4-bit weight in groups of 32 inputs (a scale and a minimum each, in bfloat16: w = q * scale + min, as
    `Int4Weight`), laid out for the engine's AVX512 kernel (`linear_int4`, on VNNI's dot products where the CPU
    has them): blocks of 16 rows, each 64-byte word holding 8 inputs of the block's 16 rows, so that one load gives
    two dot-product operands. The kernel quantizes each activation row to int8 on the way, as llama.cpp does for
    its 4-bit formats, and serves every row count up to `INT4_GEMM_ROWS`: a decode row streams the weights once, a
    few rows reuse each block from L1; longer prompt chunks dequantize to bf16 (`int4_to_bf16`) for one GEMM where
    the CPU has AVX512-BF16, and stay on the kernel where it has not."""

    packed: torch.Tensor  # [out / 16, in / 8, 64] uint8
    scale_min: torch.Tensor  # [out / 16, in / 32, 32] bfloat16: 16 scales, then 16 minimums
    shape: tuple[int, int]

    @staticmethod
    def fits(w: torch.Tensor) -> bool:
        return w.dim() == 2 and w.shape[0] % 16 == 0 and w.shape[1] % INT4_GROUP == 0

    @classmethod
    def of(cls, w: torch.Tensor) -> "Int4BlockWeight":
        n, k = w.shape
        if not cls.fits(w):
            raise UnsupportedModel(f"int4 needs output sizes that are multiples of 16 and input sizes that are "
                                   f"multiples of {INT4_GROUP} (this weight is {n} × {k})")
        words = torch.empty(n // 16, k // 8, 64, dtype=torch.uint8, device=w.device)
        sm = torch.empty(n // 16, k // INT4_GROUP, 32, dtype=torch.bfloat16, device=w.device)
        for lo in range(0, n, QUANTIZE_ROWS):  # QUANTIZE_ROWS is a multiple of 16: whole blocks at a time
            part = w[lo:lo + QUANTIZE_ROWS]
            b, blocks = lo // 16, part.shape[0] // 16
            q, scale, low = int4_groups(part)
            q = q.to(torch.uint8).view(blocks, 16, k // 8, 8)
            words[b:b + blocks] = (q[..., :4] | (q[..., 4:] << 4)).permute(0, 2, 1, 3).reshape(blocks, k // 8, 64)
            per_block = lambda t: t.view(blocks, 16, -1).permute(0, 2, 1)  # noqa: E731  [blocks, groups, 16 rows]
            sm[b:b + blocks] = torch.cat([per_block(scale), per_block(low)], dim=-1)
        return cls(words, sm, (n, k))

    def dequantized(self) -> torch.Tensor:
        """The weight these bits stand for, float32 `[out, in]` (for tests and for checking)."""
        n, k = self.shape
        w = self.packed.view(n // 16, k // 8, 16, 4)
        q = torch.cat([w & 15, w >> 4], dim=-1).permute(0, 2, 1, 3).reshape(n, k // INT4_GROUP, INT4_GROUP).float()
        sm = self.scale_min.float().view(n // 16, k // INT4_GROUP, 2, 16).permute(0, 3, 1, 2).reshape(n, -1, 2)
        return (q * sm[..., :1] + sm[..., 1:]).view(n, k)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= INT4_GEMM_ROWS and x.dtype == torch.bfloat16 and torch.ops.qwen.isa() == "avx512_bf16":
            return F.linear(x, torch.ops.qwen.int4_to_bf16(self.packed, self.scale_min))
        return torch.ops.qwen.linear_int4(x.contiguous(), self.packed, self.scale_min, None)


Weight = torch.Tensor | Quantized


def linear(x: torch.Tensor, w: Weight, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ b): quantized weights run their own matmul; float weights are widened to x's dtype when x
    is wider (bfloat16 weights in a float32 prompt chunk on CPU)."""
    if isinstance(w, Quantized):
        out = w.matmul(x)
        return out if b is None else out + b.to(out.dtype)
    if w.dtype != x.dtype:
        w = widened(w, x.dtype)
        b = b.to(x.dtype) if b is not None else None
    return F.linear(x, w, b)


_scratch = threading.local()


def widened(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`w` in `dtype`; on CPU copied into this thread's scratch buffer (as large as the largest weight widened so
    far), which the caller uses before it widens the next. A new tensor of that size costs its page faults on
    every step: widening a 9728 × 896 bf16 weight took 12.5 ms into fresh memory, 1.2 ms into memory already
    touched (2 threads, bench/README.md)."""
    if w.device.type != "cpu":
        return w.to(dtype)
    n = w.numel()
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.dtype != dtype or buf.numel() < n:
        with torch.inference_mode(False):  # a normal tensor, written in and out of inference mode alike
            buf = _scratch.buf = torch.empty(n, dtype=dtype)
    out = buf[:n].view(w.shape)
    out.copy_(w)
    return out


def tensor_bytes(tensors) -> int:
    """Bytes of distinct tensors (tied weights counted once); quantized weights with their scales."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None:
            continue
        if isinstance(t, Quantized):
            total += t.nbytes()
            continue
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total

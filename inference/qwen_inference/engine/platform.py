"""Every decision that depends on the hardware, in one place: devices, dtype, memory for caches, which
quantized kernels and which attention path run, and how wide a prompt chunk's matmuls are.

Model modules, the runner, the cache and the sampler ask the platform instead of probing torch themselves.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

CPU_CACHE_SHARE = 0.25  # of the memory left after the weights
GPU_CACHE_SHARE = 0.80
CPU_WIDEN_MIN_TOKENS = 48
# steps of this many rows run the engine's own kernels (bf16, and int8 on CPUs with AVX512-VNNI): on 2 threads of
# an AMD EPYC (Zen 4) the matmuls of Qwen2.5-0.5B's 24 layers took 24 against 33 ms at one row, 31 against 47 at
# four, 60 against 64 at twelve (bf16; int8 10 against 20, 19 against 34, 42 against 46); from 16 rows on oneDNN
# is level or ahead (bench/README.md)
KERNEL_ROWS = range(1, 13)
# on CPUs without AVX512-BF16 (AVX512F, or AVX2) the kernel takes every step: oneDNN's bf16 matmul converts in
# software there and is behind it at every row count measured, 1 to 256, and torch's float32 matmuls on weights
# widened for the step are behind its register tiles too (1.45 against 0.96 s for a 256-token chunk's matmuls of
# Qwen2.5-0.5B's 24 layers, 2 threads of a Zen 4 held to AVX512F; bench/README.md)
ALL_ROWS = range(1, sys.maxsize)
# the output layer's rows (one per sequence that samples) on the bf16 kernel, float32 out: 9.1 against 12.0 ms at one
# row and 20.8 against 24.3 at sixteen for Qwen2.5-0.5B's 151 936 × 896 output layer, 39 against 35 at 32
LOGIT_KERNEL_ROWS = range(1, 17)
QUANTIZATIONS = ("none", "int8", "int4")
# torch's CPU allocator backs buffers of 2 MiB and more with transparent huge pages when this is "1" at its first
# large allocation
TORCH_THP_ENV = "THP_MEM_ALLOC_ENABLE"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


class PlatformError(ValueError):
    """The asked-for device, dtype or quantization cannot run here."""


def _dtype(name: str, kind: str) -> torch.dtype:
    if name == "auto":
        if kind == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        from ..sysinfo import cpu_has_fast_bf16

        if cpu_has_fast_bf16():
            return torch.bfloat16
        # AVX512 without BF16 (Skylake-SP, Cascade Lake, Ice Lake) and AVX2 (Zen 2 and 3, Haswell): the engine's
        # bf16 matmul widens bf16 weights in registers, and a decode step, bound by the bytes it reads, takes a
        # fraction of float32's (bench/README.md)
        from . import kernels

        return torch.bfloat16 if kernels.load() else torch.float32
    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]
    except KeyError:
        raise PlatformError(f"unknown dtype {name!r}") from None


def _devices(name: str) -> list[torch.device]:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise PlatformError("--device cuda was asked for, but no CUDA GPU is visible")
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    if name == "cpu":
        return [torch.device("cpu")]
    raise PlatformError(f"unknown device {name!r}")


@dataclass(frozen=True)
class Platform:
    """Where and how a model runs. `devices` split the layers in order (one process, several GPUs)."""

    devices: tuple[torch.device, ...]
    dtype: torch.dtype
    quantize: str = "none"
    _layer_devices: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.devices:
            raise PlatformError("no device")
        if self.quantize not in QUANTIZATIONS:
            raise PlatformError(f"unknown quantization {self.quantize!r} (known: {', '.join(QUANTIZATIONS)})")
        if self.quantize != "none" and self.kind != "cpu":
            raise PlatformError(f"--quantize {self.quantize} runs on CPU only")

    @classmethod
    def resolve(cls, device: str = "auto", dtype: str = "auto", quantize: str = "none") -> "Platform":
        devices = _devices(device)
        return cls(tuple(devices), _dtype(dtype, devices[0].type), quantize)

    @classmethod
    def cpu(cls, dtype: torch.dtype = torch.float32, quantize: str = "none") -> "Platform":
        return cls((torch.device("cpu"),), dtype, quantize)

    # ---- devices ------------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.devices[0].type

    def layer_devices(self, num_layers: int) -> list[torch.device]:
        """Consecutive layers per device, as evenly as the count allows."""
        n = len(self.devices)
        per = -(-num_layers // n)
        return [self.devices[min(i // per, n - 1)] for i in range(num_layers)]

    @property
    def first_device(self) -> torch.device:
        return self.devices[0]

    def output_device(self, num_layers: int) -> torch.device:
        """Where the last layer, the output layer, the logits and the sampler live."""
        return self.layer_devices(num_layers)[-1]

    def describe(self) -> str:
        return self.kind if len(self.devices) == 1 else f"{self.kind}x{len(self.devices)}"

    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.") + ("" if self.quantize == "none" else f"+{self.quantize}")

    # ---- memory -------------------------------------------------------------------------------------
    def cache_budget(self) -> int:
        """Bytes the caches (KV blocks and recurrent states) may take, measured after the weights loaded."""
        if self.kind == "cuda":
            free = min(torch.cuda.mem_get_info(d)[0] for d in self.devices) * len(self.devices)
            return int(free * GPU_CACHE_SHARE)
        from ..sysinfo import available_memory

        return int(available_memory() * CPU_CACHE_SHARE)

    def use_huge_pages(self) -> bool:
        """On CPU, ask for 2 MiB pages (transparent huge pages) for the weights and caches, before the weights
        load: a decode step streams every weight from memory, and with 4 KiB pages it walks the page tables
        every 4 KiB of the stream. Measured on Qwen2.5-0.5B's architecture in bf16: a one-row decode step 60 ms
        with 4 KiB pages, 48 ms with 2 MiB ones (bench/README.md). The kernel's default THP mode (`madvise`)
        grants them on request; in mode `never` nothing changes. A THP_MEM_ALLOC_ENABLE already set is left
        as it is. True when huge pages were asked for."""
        if self.kind != "cpu" or not hasattr(os, "sched_getaffinity"):  # Linux only
            return False
        try:
            mode = THP_MODE.read_text()
        except OSError:
            return False
        if "[never]" in mode:
            return False
        os.environ.setdefault(TORCH_THP_ENV, "1")
        return os.environ[TORCH_THP_ENV] == "1"

    # ---- kernels ------------------------------------------------------------------------------------
    @property
    def widen_min_tokens(self) -> int | None:
        """On CPUs without bfloat16 instructions where the engine's matmul kernel does not run (bf16 asked for
        explicitly), torch's bfloat16 matmuls win while memory-bound (decode) but lose to float32 once
        compute-bound: steps of at least this many tokens run their matmuls in float32. Where the kernel runs it
        takes every step, prompt chunks in register tiles (`ALL_ROWS`), and on CPUs with AVX512-BF16 or AMX bf16
        matmuls win at every size (several times over float32 on a prompt chunk, measured): never widen. None:
        never widen."""
        from ..sysinfo import cpu_has_fast_bf16

        if self.kind == "cpu" and self.dtype == torch.bfloat16 and self.quantize == "none" \
                and not cpu_has_fast_bf16() and not self.matmul_kernels():
            return CPU_WIDEN_MIN_TOKENS
        return None

    @property
    def matmul_kernel_rows(self) -> range:
        """Steps of how many rows the bf16 matmul kernel runs: `KERNEL_ROWS` beside oneDNN's AVX512-BF16 or AMX
        matmuls, every step without them (the fused small operators keep `KERNEL_ROWS`)."""
        from ..sysinfo import cpu_has_fast_bf16

        return KERNEL_ROWS if cpu_has_fast_bf16() else ALL_ROWS

    @property
    def logit_kernel_rows(self) -> range:
        """Rows of the output layer the bf16 kernel runs, float32 out."""
        from ..sysinfo import cpu_has_fast_bf16

        return LOGIT_KERNEL_ROWS if cpu_has_fast_bf16() else ALL_ROWS

    @property
    def int8_kernel_rows(self) -> range:
        """Steps of how many rows the int8 matmul kernel runs: `KERNEL_ROWS` where the CPU has VNNI (or AMX), and
        every step where it has not, since torch's integer matmul (oneDNN's) then multiplies with vpmaddubsw, whose
        16-bit pair sums saturate: its results were off by up to 35 on outputs in the tens (random rows, held to AVX2),
        where the kernel's sums are exact (the weights' signs moved onto the activations)."""
        from ..sysinfo import cpu_flags

        return KERNEL_ROWS if {"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags() else ALL_ROWS

    def compute_dtype(self, tokens: int) -> torch.dtype:
        """The activations' dtype for a step of `tokens` rows."""
        if self.quantize == "int8":
            return torch.float32  # per-token int8 activations are quantized from float32
        if self.quantize == "int4":
            return torch.bfloat16  # what the int4 kernel multiplies
        w = self.widen_min_tokens
        return torch.float32 if w is not None and tokens >= w else self.dtype

    def quantize_weight(self, w: torch.Tensor, output: bool = False):
        """A projection's weight as this platform stores it. int4 keeps the output layer in int8, as llama.cpp's
        Q4_K_M keeps it at 6 bits: it decides every token. int4 weights take the engine's block layout where its
        kernel runs (AVX512 or AVX2), torch's int4 layout elsewhere."""
        from .weights import Int4BlockWeight, Int4Weight, Int8Weight

        if self.quantize == "int8" or (self.quantize == "int4" and output):
            return Int8Weight.of(w)
        if self.quantize == "int4":
            return Int4BlockWeight.of(w) if self.int4_kernels() and Int4BlockWeight.fits(w) else Int4Weight.of(w)
        return w

    def int4_kernels(self) -> bool:
        """Whether the engine's int4 kernel (and its block layout) runs here: on CPU, where the kernels load (its dot
        products on AVX512-VNNI, or on AVX512BW's or AVX2's byte and word multiplies, the same sums)."""
        return self.matmul_kernels()

    def linear_fn(self):
        """The matmul the model's layers call: x @ w.T (+ b). On CPUs with AVX512, steps of `KERNEL_ROWS` rows (decode
        of up to 12 sequences) run on the engine's own kernels, which stream each weight row once for all rows,
        add the bias and round in the same pass: bfloat16 weights (`matmul_kernel_rows`: every step on CPUs
        without AVX512-BF16) and int8 ones (activations quantized per row inside the kernel, as torch's path does;
        AVX512-VNNI's dot products, or AVX2's), on AVX2 CPUs too. Everything else runs on torch's."""
        from .weights import Int8Weight, linear

        if (self.quantize == "none" and self.dtype != torch.bfloat16) or not self.matmul_kernels():
            return linear
        ops = torch.ops.qwen
        if self.quantize in ("int8", "int4"):
            rows = self.int8_kernel_rows

            def linear_int8_small_rows(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
                # int4 models keep their output layer in int8 and run bf16 activations: widened for the kernel
                if x.shape[0] in rows and isinstance(w, Int8Weight):
                    return ops.linear_int8(x.float().contiguous(), w.q, w.scale, w.rowsum, b)
                return linear(x, w, b)

            return linear_int8_small_rows

        rows = self.matmul_kernel_rows

        def linear_small_rows(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
            if x.shape[0] in rows and x.dtype == torch.bfloat16 and getattr(w, "dtype", None) == \
                    torch.bfloat16:
                return ops.linear_bf16(x.contiguous(), w, b)
            return linear(x, w, b)

        return linear_small_rows

    def logits_fn(self):
        """float32 logits `x @ w.T` from the output layer's float weights: on CPUs with the engine's kernels, rows of
        `LOGIT_KERNEL_ROWS` go to the bf16 kernel, which writes float32 straight from its sums (one operator, no
        rounding of the logits to bf16); elsewhere the matmul in the weights' dtype, widened."""
        from .weights import linear

        def widened(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return linear(x, w).float()

        if self.dtype != torch.bfloat16 or not self.matmul_kernels():
            return widened
        op = torch.ops.qwen.linear_bf16
        rows = self.logit_kernel_rows

        def logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            if x.shape[0] in rows and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16:
                return op(x.contiguous(), w, None, True)
            return widened(x, w)

        return logits

    def fused_small_ops(self) -> bool:
        """Whether steps of `KERNEL_ROWS` rows run the engine's fused small operators (residual add with RMSNorm, SiLU
        times up-projection): on CPU where the kernels load, in bf16 and in the quantized modes (int4's activations
        are bf16, int8's float32). A decode step's layer runs some thirty small operators whose dispatch, not
        arithmetic, is what they cost. Plain float32 models (the reference the tests hold the engine to) keep torch's
        operators."""
        if self.dtype != torch.bfloat16 and self.quantize == "none":
            return False
        return self.cpu_kernels()

    def cpu_kernels(self) -> bool:
        """Whether all of the engine's own kernels run here: on CPU, where they load with AVX512."""
        return self.matmul_kernels() and torch.ops.qwen.isa().startswith("avx512")

    def kernels_in_use(self) -> str:
        """The CPU kernels this platform runs, in a few words (the server's start-up log)."""
        if self.kind != "cpu":
            return self.kind
        from . import kernels

        if not kernels.load():
            return f"torch's kernels ({kernels.unavailable()})"
        alone = "" if self.cpu_kernels() else " (the matmuls alone)"
        return f"the engine's kernels on {torch.ops.qwen.isa()}{alone}"

    def matmul_kernels(self) -> bool:
        """Whether the engine's bf16 and int8 matmul kernels run here: on CPU, where the kernels load (AVX512, or
        AVX2 and FMA, where they are the only ones that run)."""
        if self.kind != "cpu":
            return False
        from . import kernels

        return kernels.load()

    @property
    def attention_backend(self) -> str:
        """How attention reads the paged KV cache: "cpu-kernel" on CPUs where the engine's kernels load (decode rows
        attend straight from the cache's blocks, in one operator per layer; prompt chunks as below), otherwise
        "sdpa-gather" (each step's keys and values gathered into dense tensors for SDPA)."""
        return "cpu-kernel" if self.cpu_kernels() else "sdpa-gather"

    @property
    def state_dtype(self) -> torch.dtype:
        """Recurrent states (linear attention) accumulate over the whole sequence: always float32."""
        return torch.float32

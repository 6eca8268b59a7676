"""The engine's own CPU kernels against torch, and the engine with them against the engine without."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qwen_inference.engine import kernels
from qwen_inference.sysinfo import cpu_flags

AVX512 = {"avx512f", "avx512bw", "avx512vl"} <= cpu_flags()
pytestmark = pytest.mark.skipif(not AVX512, reason="the kernels need AVX512 (the engine uses torch's without)")


@pytest.fixture(scope="module")
def k():
    assert kernels.load(), kernels.unavailable()
    return torch.ops.qwen


@pytest.mark.parametrize("isa", ["native", "avx512f"])
@pytest.mark.parametrize("m, k_dim, n", [(1, 896, 1152), (3, 64, 151936), (16, 4864, 896), (5, 50, 33),
                                         (17, 1000, 7), (2, 31, 4)])
def test_linear_bf16_matches_a_float32_matmul(k, isa, m, k_dim, n):
    g = torch.Generator().manual_seed(m * 1000 + n)
    x = torch.randn(m, k_dim, generator=g).bfloat16()
    w = torch.randn(n, k_dim, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    want = torch.nn.functional.linear(x.float(), w.float(), b.float())
    use = "" if isa == "native" else "avx512f"
    got = k.linear_bf16(x, w, b, True, use)
    assert torch.allclose(got, want, atol=1e-3 * k_dim ** 0.5, rtol=1e-4)
    got16 = k.linear_bf16(x, w, None, False, use)
    assert got16.dtype == torch.bfloat16
    assert torch.allclose(got16.float(), want - b.float(), atol=1e-3 * k_dim ** 0.5, rtol=1e-2)


def test_linear_bf16_refuses_what_it_cannot_do(k):
    x, w = torch.randn(2, 64).bfloat16(), torch.randn(8, 64).bfloat16()
    with pytest.raises(RuntimeError, match="bf16 only"):
        k.linear_bf16(x.float(), w)
    with pytest.raises(RuntimeError, match="shapes"):
        k.linear_bf16(x, torch.randn(8, 32).bfloat16())
    with pytest.raises(RuntimeError, match="contiguous"):
        k.linear_bf16(x, torch.randn(64, 8).bfloat16().t())
    with pytest.raises(RuntimeError, match="unknown isa"):
        k.linear_bf16(x, w, None, False, "sse")


def test_bf16_models_use_the_kernel_for_decode_rows_and_agree_with_torch(tiny_model):
    """A bf16 model's step on the kernel gives the logits of torch's own bf16 matmuls (to bf16 rounding), and
    steps of other row counts go to torch."""
    from qwen_inference.engine.models import load_model
    from qwen_inference.engine.platform import KERNEL_ROWS, Platform
    from qwen_inference.engine.weights import linear

    from .test_engine import prompt_logits

    fast = load_model(tiny_model, Platform.cpu(torch.bfloat16))
    assert fast.linear is not linear and fast.linear.__name__ == "linear_small_rows"
    slow = load_model(tiny_model, Platform.cpu(torch.bfloat16))
    slow.linear = linear
    assert 2 in KERNEL_ROWS
    for n in (1, *KERNEL_ROWS, 5, 40):
        ids = list(range(900, 900 + n))
        a, b = prompt_logits(fast, ids), prompt_logits(slow, ids)
        assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.999
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9


def test_a_built_library_loads_without_a_compiler(k, tmp_path):
    """What a container image does: build once (`qwen-model build-kernels`), then load with no compiler and no
    ninja on the PATH."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "QWEN_KERNELS_DIR": str(tmp_path)}
    built = subprocess.run([str(Path(sys.executable).parent / "qwen-model"), "build-kernels"], env=env,
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0 and built.stdout.startswith("ok: "), built.stderr
    lib = Path(built.stdout.split()[1])
    assert lib.is_file() and lib.parent.parent == tmp_path
    probe = ("import torch; from qwen_inference.engine import kernels; ok = kernels.load(build_if_missing=False); "
             "x = torch.ones(2, 64).bfloat16(); w = torch.ones(3, 64).bfloat16(); "
             "print(ok, kernels.unavailable(), torch.ops.qwen.linear_bf16(x, w, None, True).sum().item())")
    r = subprocess.run([sys.executable, "-c", probe], env={**env, "PATH": "/nonexistent", "CXX": "/nonexistent"},
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["True", "None", "384.0"], r.stderr[-2000:]
    missing = subprocess.run([sys.executable, "-c", probe.replace("print(ok, kernels.unavailable(), torch.ops.qwen"
                                                                  ".linear_bf16(x, w, None, True).sum().item())",
                                                                  "print(ok, kernels.unavailable())")],
                             env={**env, "QWEN_KERNELS_DIR": str(tmp_path / "empty")}, capture_output=True, text=True,
                             timeout=120)
    assert missing.stdout.startswith("False not built"), missing.stderr[-2000:]

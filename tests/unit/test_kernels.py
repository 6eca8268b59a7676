"""The engine's own CPU kernels against torch, and the engine with them against the engine without."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from qwen_inference.engine import kernels
from qwen_inference.sysinfo import cpu_flags

AVX512 = {"avx512f", "avx512bw", "avx512vl"} <= cpu_flags()
AVX2 = {"avx2", "fma"} <= cpu_flags()
pytestmark = pytest.mark.skipif(not (AVX512 or AVX2),
                                reason="the kernels need AVX512 or AVX2 (the engine uses torch's without)")
# the kernels that run with AVX512 alone (on AVX2 only the matmuls run); `QWEN_MAX_CPU_ISA=avx2 pytest` runs this
# module as an AVX2 CPU would
avx512 = pytest.mark.skipif(not AVX512, reason="an AVX512 kernel (this CPU runs the engine's matmuls alone)")


def exact_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch._int_mm's integer products summed exactly (oneDNN's own saturates without VNNI)."""
    return (a.long() @ b.long()).int()


VNNI = bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())


@pytest.fixture(scope="module")
def k():
    assert kernels.load(), kernels.unavailable()
    return torch.ops.qwen


def test_kernels_split_their_work_over_torchs_threads(k):
    """The kernels' parallel_for runs on as many of torch's threads as torch is set to (a library built without
    OpenMP would run every kernel on one), and follows torch.set_num_threads."""
    before = torch.get_num_threads()
    try:
        for n in (2, 3):
            torch.set_num_threads(n)
            assert k.parallel_threads(64) == n
        torch.set_num_threads(1)
        assert k.parallel_threads(64) == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("isa", ["native", "avx512f", "avx2"])
@pytest.mark.parametrize("m, k_dim, n", [(1, 896, 1152), (3, 64, 151936), (16, 4864, 896), (5, 50, 33),
                                         (17, 1000, 7), (2, 31, 4)])
def test_linear_bf16_matches_a_float32_matmul(k, isa, m, k_dim, n):
    if isa == "avx512f" and not AVX512:
        pytest.skip("an AVX512 path")
    g = torch.Generator().manual_seed(m * 1000 + n)
    x = torch.randn(m, k_dim, generator=g).bfloat16()
    w = torch.randn(n, k_dim, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    want = torch.nn.functional.linear(x.float(), w.float(), b.float())
    use = "" if isa == "native" else isa
    got = k.linear_bf16(x, w, b, True, use)
    assert torch.allclose(got, want, atol=1e-3 * k_dim ** 0.5, rtol=1e-4)
    got16 = k.linear_bf16(x, w, None, False, use)
    assert got16.dtype == torch.bfloat16
    assert torch.allclose(got16.float(), want - b.float(), atol=1e-3 * k_dim ** 0.5, rtol=1e-2)


@pytest.mark.parametrize("m, k_dim, n", [(1, 896, 1152), (2, 4864, 896), (3, 64, 1517), (4, 50, 33), (1, 31, 7),
                                         (5, 1000, 17), (2, 200, 3)])
@pytest.mark.parametrize("isa", ["native", "avx2"])
def test_linear_int8_gives_exactly_the_torch_int8_paths_result(k, held_to, monkeypatch, isa, m, k_dim, n):
    """Same per-row activation quantization, exact integer sums, the same float products in the same order: the
    same bits as torch's integer matmul path, with and without a bias, tails of K included; on AVX512-VNNI and on
    AVX2 (where the weights' signs move onto the activations to keep vpmaddubsw's pair sums from saturating)."""
    from qwen_inference.engine.weights import Int8Weight, int8_linear

    if isa == "avx2":
        held_to("avx2")
        monkeypatch.setattr(torch, "_int_mm", exact_int_mm)
    elif not k.has_vnni():
        pytest.skip("this CPU has no AVX512-VNNI (its int8 kernel is the AVX2 one)")
    g = torch.Generator().manual_seed(m * 7 + k_dim + n)
    w = Int8Weight.of(torch.randn(n, k_dim, generator=g))
    x = torch.randn(m, k_dim, generator=g) * torch.rand(m, 1, generator=g) * 10
    b = torch.randn(n, generator=g)
    assert torch.equal(w.rowsum, w.q.sum(dim=1, dtype=torch.int32))
    assert torch.equal(k.linear_int8(x, w.q, w.scale, w.rowsum, b), int8_linear(x, w, b))
    assert torch.equal(k.linear_int8(x, w.q, w.scale, w.rowsum, None), int8_linear(x, w))
    if isa == "avx2":  # the largest pair sums: weights and activations of full size, of every sign
        q = torch.tensor([[127, 127, -127, -127] * 16, [-128, -128, 127, -127] * 16], dtype=torch.int8)
        edge = Int8Weight(q, torch.ones(2), q.sum(dim=1, dtype=torch.int32))
        xe = torch.tensor([[1.0, 1.0, -1.0, -1.0] * 16, [-1.0, -1.0, 1.0, 1.0] * 16])
        assert torch.equal(k.linear_int8(xe, edge.q, edge.scale, edge.rowsum), int8_linear(xe, edge))


def test_linear_bf16_rounds_and_adds_the_bias_as_torch_does(k):
    g = torch.Generator().manual_seed(3)
    x, w, b = (torch.randn(*s, generator=g).bfloat16() for s in ((2, 896), (1152, 896), (1152,)))
    want = torch.nn.functional.linear(x.float(), w.float(), b.float())
    got = k.linear_bf16(x, w, b)
    assert got.dtype == torch.bfloat16
    # one rounding to bf16 of the float sum plus the bias: within half a bf16 step of the exact result
    assert ((got.float() - want).abs() <= want.abs() * 2 ** -8 + 1e-3).all()


def test_linear_int8_refuses_what_it_cannot_do(k):
    from qwen_inference.engine.weights import Int8Weight

    w = Int8Weight.of(torch.randn(8, 64))
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="float32 x"):
        k.linear_int8(x.bfloat16(), w.q, w.scale, w.rowsum)
    with pytest.raises(RuntimeError, match="shapes"):
        k.linear_int8(torch.randn(2, 32), w.q, w.scale, w.rowsum)
    with pytest.raises(RuntimeError, match="one scale"):
        k.linear_int8(x, w.q, w.scale[:4], w.rowsum)
    with pytest.raises(RuntimeError, match="bias shape"):
        k.linear_int8(x, w.q, w.scale, w.rowsum, torch.zeros(3))


def test_int8_models_use_the_kernel_for_decode_rows_with_the_same_logits(k, tiny_model, monkeypatch):
    """An int8 model's steps of up to `KERNEL_ROWS` rows on the kernel give exactly the logits of torch's int8 path
    (without VNNI, every step runs the kernel, and the reference sums its integer products exactly)."""
    from qwen_inference.engine.models import load_model
    from qwen_inference.engine.platform import KERNEL_ROWS, Platform
    from qwen_inference.engine.weights import linear

    from .test_engine import prompt_logits

    if not VNNI:
        monkeypatch.setattr(torch, "_int_mm", exact_int_mm)
    fast = load_model(tiny_model, Platform.cpu(torch.float32, "int8"))  # AVX512-VNNI's kernel, or AVX2's
    assert fast.linear.__name__ == "linear_int8_small_rows"
    slow = load_model(tiny_model, Platform.cpu(torch.float32, "int8"))
    slow.linear = linear
    assert KERNEL_ROWS[0] == 1
    for n in (1, 2, 5, KERNEL_ROWS[-1], KERNEL_ROWS[-1] + 1):
        ids = list(range(900, 900 + n))
        assert torch.equal(prompt_logits(fast, ids), prompt_logits(slow, ids))


@avx512
@pytest.mark.parametrize("t, d", [(1, 896), (2, 4864), (1, 7)])
def test_fused_small_ops_round_as_torchs_operators_do(k, t, d):
    """Residual add with RMSNorm, and SiLU times the up-projection, in one operator each: torch's results for the
    same bf16 inputs (the sum of squares' order is the only freedom, and it leaves these values unchanged)."""
    g = torch.Generator().manual_seed(t * d)
    x, r = (torch.randn(t, d, generator=g) * 3).bfloat16(), torch.randn(t, d, generator=g).bfloat16()
    w = torch.randn(d, generator=g).bfloat16()
    h, s = k.add_rms_norm_bf16(x, r, w, 1e-6)
    want_s = x + r
    want_h = torch.nn.functional.rms_norm(want_s.float(), (d,), eps=1e-6).to(torch.bfloat16) * w
    assert torch.equal(s, want_s)
    assert torch.allclose(h.float(), want_h.float(), rtol=2 ** -7, atol=0) and (h != want_h).float().mean() < 0.01
    gu = (torch.randn(t, 2 * d, generator=g) * 4).bfloat16()
    assert torch.equal(k.silu_mul(gu), torch.nn.functional.silu(gu[:, :d]) * gu[:, d:])
    with pytest.raises(RuntimeError, match="shapes"):
        k.add_rms_norm_bf16(x, r[:, :-1].contiguous(), w, 1e-6)
    with pytest.raises(RuntimeError, match="bf16 only"):
        k.add_rms_norm_bf16(x.float(), r, w, 1e-6)
    with pytest.raises(RuntimeError, match="contiguous float32 or bf16 only"):
        k.silu_mul(gu.half())


@avx512
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t, d", [(1, 2048), (3, 896), (2, 7)])
def test_float32_weight_norm_and_silu_mul_round_as_torchs_operators_do(k, dtype, t, d):
    """The norm whose float32 weight multiplies before the one rounding (Qwen3.5's zero-centred norm; F.rms_norm's
    float32 rows with a weight), with and without a residual, and SiLU times up in float32 as in bf16."""
    g = torch.Generator().manual_seed(t * d)
    x, r = (torch.randn(t, d, generator=g) * 3).to(dtype), torch.randn(t, d, generator=g).to(dtype)
    w = 1 + 0.5 * torch.randn(d, generator=g)
    for residual in (r, None):
        h, s = k.add_rms_norm_f32w(x, residual, w, 1e-6)
        want_s = x + r if residual is not None else x
        want_h = (torch.nn.functional.rms_norm(want_s.float(), (d,), eps=1e-6) * w).to(dtype)
        assert torch.equal(s, want_s) and h.dtype == dtype
        if dtype == torch.float32:
            assert torch.allclose(h, want_h, rtol=1e-6, atol=1e-6)
        else:
            assert torch.allclose(h.float(), want_h.float(), rtol=2 ** -7, atol=0) and (h != want_h).float().mean() < 0.01
    gu = (torch.randn(t, 2 * d, generator=g) * 4).to(dtype)
    want = torch.nn.functional.silu(gu[:, :d]) * gu[:, d:]
    got = k.silu_mul(gu)
    assert got.dtype == dtype
    assert torch.equal(got, want) if dtype == torch.bfloat16 else torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="shapes"):
        k.add_rms_norm_f32w(x, r[:, :-1].contiguous(), w, 1e-6)
    with pytest.raises(RuntimeError, match="float32 weight"):
        k.add_rms_norm_f32w(x, r, w.bfloat16(), 1e-6)
    with pytest.raises(RuntimeError, match="the residual alike"):
        k.add_rms_norm_f32w(x, r.half(), w, 1e-6)
    with pytest.raises(RuntimeError, match="contiguous"):
        k.add_rms_norm_f32w(x.t().contiguous().t(), None, w, 1e-6) if t > 1 else k.add_rms_norm_f32w(
            x, None, torch.randn(2 * d)[::2], 1e-6)


@pytest.mark.parametrize("m, k_dim, n", [(1, 896, 1152), (2, 4864, 896), (5, 64, 32), (17, 896, 160)])
def test_linear_int4_computes_the_quantized_activations_against_the_dequantized_weights(k, held_to, m, k_dim, n):
    """The engine's int4 layout holds what torch's layout holds (the same groups, scales and minimums), and its
    kernel gives x, quantized per row to int8, times the dequantized weights, to float32 rounding: one row, a few,
    and more rows than a pass takes (a prompt chunk); float32 and bf16 activations; with a bias. Without VNNI
    (Skylake-SP), and with AVX2 alone (Zen 3), the byte and word multiplies give the same results, bit for bit."""
    from qwen_inference.engine.weights import Int4BlockWeight, Int4Weight

    g = torch.Generator().manual_seed(m + k_dim + n)
    w = torch.randn(n, k_dim, generator=g)
    q = Int4BlockWeight.of(w)
    d = q.dequantized()
    grouped = w.view(n, -1, 32)
    step = (grouped.amax(-1) - grouped.amin(-1)) / 15  # one quantization step per group
    assert ((d - w).view(n, -1, 32).abs() <= step[..., None] * 0.51 + 0.02).all()
    assert q.nbytes() == n * k_dim // 2 + n * k_dim // 32 * 4
    x = torch.randn(m, k_dim, generator=g)
    sx = x.abs().amax(1, keepdim=True) / 127
    want = (torch.round(x / sx) * sx).double() @ d.double().t()
    got = k.linear_int4(x, q.packed, q.scale_min, None)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), want, atol=1e-4 * want.abs().max(), rtol=1e-5)
    b = torch.randn(n, generator=g)
    got16 = k.linear_int4(x.bfloat16(), q.packed, q.scale_min, b)
    want16 = (torch.round(x.bfloat16().float() / sx) * sx).double() @ d.double().t()  # bf16 x, quantized
    assert got16.dtype == torch.bfloat16
    assert torch.allclose(got16.double(), want16 + b.double(), atol=0.02 * want.abs().max(), rtol=2 ** -7)
    if k.isa() == "avx512_bf16":  # long prompt chunks: the weight back in bf16, exactly the dequantized values
        assert torch.equal(k.int4_to_bf16(q.packed, q.scale_min), d.bfloat16())
    # and torch's own int4 kernel, on its layout of the same weight, nearly agrees (it multiplies bf16 activations)
    theirs = Int4Weight.of(w).matmul(x.bfloat16()).float()
    assert torch.nn.functional.cosine_similarity(theirs.flatten(), got.flatten(), dim=0) > 0.999
    for cap in ("avx512", "avx2"):  # no VNNI, then AVX2 alone: vpmaddubsw and vpmaddwd, the same integer sums
        if (cap == "avx512") == (k.isa() == "avx2"):
            continue  # a cap above what this CPU has, or what it runs anyway
        held_to(cap)
        assert not k.has_vnni()
        assert torch.equal(k.linear_int4(x, q.packed, q.scale_min, None), got)
        assert torch.equal(k.linear_int4(x.bfloat16(), q.packed, q.scale_min, b), got16)


def test_linear_int4_refuses_what_it_cannot_do(k):
    from qwen_inference.engine.weights import Int4BlockWeight, UnsupportedModel

    q = Int4BlockWeight.of(torch.randn(32, 64))
    with pytest.raises(RuntimeError, match="shapes"):
        k.linear_int4(torch.randn(2, 32), q.packed, q.scale_min, None)
    with pytest.raises(RuntimeError, match="bf16 or float32 x"):
        k.linear_int4(torch.randn(2, 64).half(), q.packed, q.scale_min, None)
    with pytest.raises(RuntimeError, match="one scale and one minimum"):
        k.linear_int4(torch.randn(2, 64), q.packed, q.scale_min[:1].contiguous(), None)
    with pytest.raises(RuntimeError, match="bias shape"):
        k.linear_int4(torch.randn(2, 64), q.packed, q.scale_min, torch.zeros(3))
    with pytest.raises(UnsupportedModel, match="multiples of 16"):
        Int4BlockWeight.of(torch.randn(24, 64))


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


@avx512
def test_bf16_models_use_the_kernel_for_decode_rows_and_agree_with_torch(k, tiny_model):
    """A bf16 model's step on the kernel gives the logits of torch's own bf16 matmuls (to bf16 rounding), and
    steps of other row counts go to torch."""
    from qwen_inference.engine.models import load_model
    from qwen_inference.engine.platform import KERNEL_ROWS, Platform
    from qwen_inference.engine.weights import linear

    from .test_engine import prompt_logits

    fast = load_model(tiny_model, Platform.cpu(torch.bfloat16))
    assert fast.linear is not linear and fast.linear.__name__ == "linear_small_rows" and fast.fused
    slow = load_model(tiny_model, Platform.cpu(torch.bfloat16))
    slow.linear, slow.fused = linear, False
    assert KERNEL_ROWS[0] == 1
    for n in (1, 2, 5, KERNEL_ROWS[-1], KERNEL_ROWS[-1] + 1, 40):
        ids = list(range(900, 900 + n))
        a, b = prompt_logits(fast, ids), prompt_logits(slow, ids)
        assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.999
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9


def test_a_built_library_loads_without_a_compiler(k, tmp_path):
    """What a container image does: build once (`qwen-model build-kernels`), then load with no compiler and no
    ninja on the PATH. The folder this session's library was built in is copied there first, so the command finds
    the work done (ninja's up-to-date check, as a second `build-kernels` does), not compiling it all again: a cold
    run has compiled it, with the same `kernels.build()`, before this test."""
    import os
    import shutil
    import subprocess
    import sys

    done = kernels.library_path().parent
    shutil.copytree(done, tmp_path / done.name, ignore=shutil.ignore_patterns("lock"))
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


@avx512
@pytest.mark.parametrize("dtype, cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("b, h, kv, d, n", [(1, 14, 2, 64, 40), (5, 8, 2, 256, 40), (3, 4, 4, 24, 40),
                                            (3, 14, 2, 64, 1300), (2, 8, 2, 256, 1100), (2, 6, 2, 48, 600)])
@pytest.mark.parametrize("isa", ["native", "avx512f"])
def test_decode_attention_reads_the_paged_cache_as_sdpa_over_the_gathered_rows_does(k, dtype, cache_dtype, b, h, kv,
                                                                                     d, n, isa):
    """The kernel against SDPA over keys and values gathered from the same scattered slots, rows of different
    lengths masked: short rows (one part, a partial block of 16 positions), long ones (several parts of 512 positions,
    merged), head sizes a multiple of 32 (bf16 dot products where the CPU has them), of 16 and of neither (padded);
    float32 rows over a bf16 cache, as int8 models attend; the AVX512F path picked on a BF16 CPU too."""
    g = torch.Generator().manual_seed(b * h * d + n)
    slots = max(300, 2 * n)
    kc = torch.randn(slots, kv, d, generator=g).to(cache_dtype)
    vc = torch.randn(slots, kv, d, generator=g).to(cache_dtype)
    q = (2 * torch.randn(b, h, d, generator=g)).to(dtype)  # scores spread enough that the softmax is not flat
    lens = torch.randint(1, n + 1, (b,), generator=g)
    lens[0] = n
    gather = torch.zeros(b, n, dtype=torch.long)
    for i in range(b):
        gather[i, : lens[i]] = torch.randperm(slots, generator=g)[: lens[i]]
    # a bf16 cache's values are exact in float32; on AVX512-BF16 a bf16 cache is read with bf16 dot products (float32
    # queries rounded to bf16, the values weighed with probabilities rounded to bf16, as torch's flash attention does)
    bf16_math = cache_dtype == torch.bfloat16 and d % 32 == 0 and isa == "native" and k.isa() == "avx512_bf16"
    tol = 1e-2 if dtype == torch.bfloat16 or bf16_math else 1e-5
    mask = (torch.arange(n)[None, :] < lens[:, None])[:, None, None, :]
    want = torch.nn.functional.scaled_dot_product_attention(
        (q.bfloat16() if bf16_math else q).reshape(b, kv, h // kv, d).float(), kc[gather].transpose(1, 2).float(),
        vc[gather].transpose(1, 2).float(), attn_mask=mask).reshape(b, h * d)
    got = k.decode_attention(q, kc, vc, gather, lens, "" if isa == "native" else "avx512f")
    assert got.dtype == dtype and got.shape == (b, h * d)
    assert torch.allclose(got.float(), want, atol=tol, rtol=tol)


@avx512
def test_decode_attention_refuses_what_it_cannot_read(k):
    q, kc, gather = torch.randn(1, 4, 8), torch.randn(10, 2, 8), torch.zeros(1, 3, dtype=torch.long)
    lens = torch.tensor([3])
    assert k.decode_attention(q, kc, kc, gather, lens).shape == (1, 32)
    with pytest.raises(RuntimeError, match="shapes"):
        k.decode_attention(q, kc, kc[:, :, :4].contiguous(), gather, lens)
    with pytest.raises(RuntimeError, match="bf16 or float32"):
        k.decode_attention(q.bfloat16(), kc, kc, gather, lens)
    with pytest.raises(RuntimeError, match="1 to L positions"):
        k.decode_attention(q, kc, kc, gather, torch.tensor([4]))
    with pytest.raises(RuntimeError, match="slot out of range"):
        k.decode_attention(q, kc, kc, torch.tensor([[0, 10, 1]]), lens)
    with pytest.raises(RuntimeError, match="unknown isa"):
        k.decode_attention(q, kc, kc, gather, lens, "sse2")


@avx512
def test_models_use_the_attention_kernel_for_decode_rows_and_agree_with_sdpa(k, tiny_model):
    """A float32 model on the "cpu-kernel" backend: decode rows (of different lengths) attend on the kernel and give
    the logits SDPA over gathered rows gives."""
    from qwen_inference.engine.models import load_model
    from qwen_inference.engine.platform import Platform
    from qwen_inference.engine.runner import ModelRunner, SeqChunk

    model = load_model(tiny_model, Platform.cpu(torch.float32))
    assert model.platform.attention_backend == "cpu-kernel"
    runners = {}
    for backend in ("cpu-kernel", "sdpa-gather"):
        r = runners[backend] = ModelRunner(model, kv_tokens=256)
        r.attention_backend = backend
        r.execute([SeqChunk(list(range(900, 920)), 0, [1, 2]), SeqChunk(list(range(700, 705)), 0, [3])])
    calls = []
    real = torch.ops.qwen.decode_attention

    def counted(*a):
        calls.append(a[0].shape[0])
        return real(*a)

    steps = {}
    for backend, r in runners.items():
        torch.ops.qwen.decode_attention = counted if backend == "cpu-kernel" else real
        try:
            steps[backend] = r.execute([SeqChunk([5], 20, [1, 2], logits=True), SeqChunk([6], 5, [3], logits=True)])
        finally:
            torch.ops.qwen.decode_attention = real
    assert calls and set(calls) == {2}
    assert torch.allclose(steps["cpu-kernel"], steps["sdpa-gather"], atol=1e-4, rtol=1e-4)


def test_bf16_logits_come_from_the_kernel_in_float32(k, tiny_model):
    """The output layer's rows on the bf16 kernel come out in float32 (not rounded to bf16 first), close to torch's
    float32 matmul of the same bf16 values; more rows than the platform's `logit_kernel_rows` (`LOGIT_KERNEL_ROWS`
    with AVX512-BF16, every row count without it) go to torch."""
    from qwen_inference.engine.platform import Platform

    platform = Platform.cpu(torch.bfloat16)
    LOGIT_KERNEL_ROWS = platform.logit_kernel_rows  # noqa: N806
    logits = platform.logits_fn()
    assert logits.__name__ == "logits"
    g = torch.Generator().manual_seed(3)
    w = torch.randn(1000, 64, generator=g).bfloat16()
    for n in (1, min(LOGIT_KERNEL_ROWS[-1], 40), min(LOGIT_KERNEL_ROWS[-1] + 1, 41)):
        x = torch.randn(n, 64, generator=g).bfloat16()
        got = logits(x, w)
        want = x.float() @ w.float().T
        assert got.dtype == torch.float32
        if n in LOGIT_KERNEL_ROWS:
            assert torch.allclose(got, want, atol=1e-4, rtol=1e-4) and not torch.equal(got, got.bfloat16().float())
        else:
            assert torch.allclose(got, want, atol=0.1, rtol=1e-2) and torch.equal(got, got.bfloat16().float())
    assert Platform.cpu(torch.float32).logits_fn().__name__ == "widened"


def _delta_inputs(b, hk, hv, dk, dv, kernel, dtype, norm_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    c, slots = 2 * hk * dk + hv * dv, 6
    return dict(
        proj=torch.randn(b, c + hv * dv + 2 * hv, generator=g).to(dtype),
        conv_state=torch.randn(slots, c, kernel - 1, generator=g),
        conv_w=torch.randn(c, kernel, generator=g) * 0.5,
        ssm=torch.randn(slots, hv, dk, dv, generator=g) * 0.1,
        slots=torch.tensor([4, 1, 5, 0][:b]),
        neg_a=-torch.rand(hv, generator=g).exp(),
        dt_bias=torch.randn(hv, generator=g),
        norm_w=(1 + 0.3 * torch.randn(dv, generator=g)).to(norm_dtype),
        key_heads=hk, eps=1e-6)


@avx512
@pytest.mark.parametrize("dtype, norm_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("b, hk, hv, dk, dv, kernel", [(1, 16, 16, 128, 128, 4), (3, 2, 4, 16, 32, 4),
                                                       (4, 1, 3, 8, 24, 3)])
def test_delta_net_decode_updates_the_states_as_torchs_operators_do(k, dtype, norm_dtype, b, hk, hv, dk, dv, kernel):
    """The fused DeltaNet decode step against the model's torch operators, three steps in a row on copies of the same
    state pool: outputs, the convolution windows and the delta-rule states of the rows' slots, and every other slot
    left as it was. Qwen3.5-2B's head sizes (vector path), several value heads per key head, a head size that is not
    a multiple of 16 (scalar path); bf16 rows as bf16 models run, float32 rows over a bf16 norm as int8 models do."""
    from qwen_inference.engine.models.qwen3_5 import delta_net_decode

    args = _delta_inputs(b, hk, hv, dk, dv, kernel, dtype, norm_dtype, seed=b * hv * dv)
    mine = {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in args.items()}
    untouched = [s for s in range(6) if s not in args["slots"].tolist()]
    ssm0, conv0 = args["ssm"].clone(), args["conv_state"].clone()
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16 rows: one rounding apart at most, here and there
    for step in range(3):
        if step:
            args["proj"] = mine["proj"] = torch.randn_like(args["proj"].float()).to(dtype)
        want = delta_net_decode(**args)
        got = k.delta_net_decode(**mine)
        assert got.dtype == dtype and got.shape == (b, hv * dv)
        assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol), step
        assert torch.allclose(mine["ssm"], args["ssm"], atol=1e-5, rtol=1e-4)
        assert torch.equal(mine["conv_state"], args["conv_state"])
    rows = args["slots"]
    assert not torch.allclose(mine["ssm"][rows], ssm0[rows], atol=1e-3)  # the rows' states moved
    assert torch.equal(mine["conv_state"][rows][..., -1], mine["proj"][:, : conv0.shape[1]].float())
    assert torch.equal(mine["ssm"][untouched], ssm0[untouched])
    assert torch.equal(mine["conv_state"][untouched], conv0[untouched])


@avx512
def test_delta_net_decode_refuses_what_it_cannot_do(k):
    args = _delta_inputs(2, 2, 4, 16, 32, 4, torch.float32, torch.float32, seed=1)
    assert k.delta_net_decode(**args).shape == (2, 128)
    with pytest.raises(RuntimeError, match="shapes"):
        k.delta_net_decode(**{**args, "proj": args["proj"][:, 1:].contiguous()})
    with pytest.raises(RuntimeError, match="multiple of key heads"):
        k.delta_net_decode(**{**args, "key_heads": 3})
    with pytest.raises(RuntimeError, match="float32 or bf16 rows"):
        k.delta_net_decode(**{**args, "proj": args["proj"].half()})
    with pytest.raises(RuntimeError, match="float32 states"):
        k.delta_net_decode(**{**args, "ssm": args["ssm"].bfloat16()})
    with pytest.raises(RuntimeError, match="contiguous"):
        k.delta_net_decode(**{**args, "ssm": args["ssm"].transpose(2, 3).contiguous().transpose(2, 3)})
    with pytest.raises(RuntimeError, match="slot out of range"):
        k.delta_net_decode(**{**args, "slots": torch.tensor([1, 6])})
    with pytest.raises(RuntimeError, match="its own slot"):
        k.delta_net_decode(**{**args, "slots": torch.tensor([3, 3])})


@avx512
@pytest.mark.parametrize("dtype, quantize", [(torch.float32, "none"), (torch.bfloat16, "none"), (torch.float32, "int8")])
def test_qwen3_5_decode_rows_run_the_fused_operators_and_agree_with_torch(k, tiny_qwen35_text_model, dtype, quantize):
    """A Qwen3.5 model's decode rows (two sequences, beside a prompt chunk in the same step) go through the fused
    DeltaNet operator, once per DeltaNet layer, and (bf16 and int8) the fused norms and SiLU; they give the logits
    (and leave the states) torch's operators give. Plain float32 models keep torch's small operators."""
    from qwen_inference.engine.models import load_model
    from qwen_inference.engine.models.qwen3_5 import delta_net_decode
    from qwen_inference.engine.platform import Platform
    from qwen_inference.engine.runner import ModelRunner, SeqChunk

    fused = load_model(tiny_qwen35_text_model, Platform.cpu(dtype, quantize))
    plain = load_model(tiny_qwen35_text_model, Platform.cpu(dtype, quantize))
    assert fused.fused == (dtype == torch.bfloat16 or quantize != "none")
    plain.delta_decode, plain.fused = delta_net_decode, False
    calls = {"delta": [], "norm": 0, "silu": 0}
    real = fused.delta_decode
    fused.delta_decode = lambda proj, *a: calls["delta"].append(proj.shape[0]) or real(proj, *a)
    ops = torch.ops.qwen
    real_norm, real_silu = ops.add_rms_norm_f32w, ops.silu_mul

    def norm(*a):
        calls["norm"] += 1
        return real_norm(*a)

    def silu(*a):
        calls["silu"] += 1
        return real_silu(*a)

    results = []
    ops.add_rms_norm_f32w, ops.silu_mul = norm, silu
    try:
        for model in (fused, plain):
            r = ModelRunner(model, kv_tokens=256, state_slots=3)
            r.execute([SeqChunk(list(range(900, 920)), 0, [1, 2], 0), SeqChunk(list(range(700, 705)), 0, [3], 1)])
            steps = [r.execute([SeqChunk([5 + i], 20 + i, [1, 2], 0, logits=True),
                                SeqChunk([6 + i], 5 + i, [3], 1, logits=True)]) for i in range(3)]
            steps.append(r.execute([SeqChunk([8], 23, [1, 2], 0, logits=True),
                                    SeqChunk(list(range(300, 310)), 0, [4], 2, logits=True)]))
            results.append((steps, r.caches.states))
    finally:
        ops.add_rms_norm_f32w, ops.silu_mul = real_norm, real_silu
    layers = fused.num_layers
    delta_layers = fused.layer_types.count("linear_attention")
    assert calls["delta"] == [2] * 3 * delta_layers + [1] * delta_layers
    # every step but the first (25 prompt rows) is within KERNEL_ROWS: three decode steps, and 1 + 10 rows
    assert (calls["norm"], calls["silu"]) == ((4 * 2 * layers, 4 * layers) if fused.fused else (0, 0))
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for got, want in zip(results[0][0], results[1][0]):
        assert torch.allclose(got, want, atol=tol, rtol=tol)
    for layer, states in results[0][1].tensors.items():
        assert torch.allclose(states["ssm"], results[1][1][layer]["ssm"], atol=tol, rtol=tol)


@pytest.fixture
def held_to(k, monkeypatch):
    """Hold the engine to an older CPU's instruction sets, as QWEN_MAX_CPU_ISA does at start: the flags the
    platform reads and the kernels' own choice; both set back afterwards (to the cap the tests run under, if any)."""
    from qwen_inference import sysinfo

    before = os.environ.get(sysinfo.MAX_CPU_ISA_ENV)

    def hold(cap: str) -> None:
        order = list(sysinfo.ONEDNN_ISAS)  # the caps, highest first
        if before and order.index(cap) < order.index(before):
            pytest.skip(f"holds to {cap}, above the tests' own QWEN_MAX_CPU_ISA={before}")
        monkeypatch.setenv(sysinfo.MAX_CPU_ISA_ENV, cap)
        sysinfo.cpu_flags.cache_clear()
        k.set_max_isa(cap)

    yield hold
    if before is None:
        monkeypatch.delenv(sysinfo.MAX_CPU_ISA_ENV, raising=False)
    else:
        monkeypatch.setenv(sysinfo.MAX_CPU_ISA_ENV, before)
    sysinfo.cpu_flags.cache_clear()
    k.set_max_isa(before or "")


@avx512
def test_the_kernels_hold_to_the_instruction_sets_they_are_allowed(k, held_to):
    from qwen_inference.engine.weights import Int4BlockWeight

    native_vnni, native_isa = k.has_vnni(), k.isa()
    own = os.environ.get("QWEN_MAX_CPU_ISA", "")  # the cap the tests run under, if any
    x, w = torch.randn(3, 64).bfloat16(), torch.randn(8, 64).bfloat16()
    held_to("avx512_vnni")
    assert k.isa() == "avx512f" and k.has_vnni() == native_vnni
    with pytest.raises(RuntimeError, match="unknown isa avx512_bf16"):
        k.linear_bf16(x, w, None, False, "avx512_bf16")
    assert torch.allclose(k.linear_bf16(x, w, None, True), x.float() @ w.float().T, atol=1e-3, rtol=1e-4)
    held_to("avx512")
    assert k.isa() == "avx512f" and not k.has_vnni()
    q4 = Int4BlockWeight.of(torch.randn(16, 64))
    held_to("avx2")  # the matmuls alone: every other kernel refuses, the platform does not call them
    assert k.isa() == "avx2" and not k.has_vnni()
    assert torch.allclose(k.linear_bf16(x, w, None, True), x.float() @ w.float().T, atol=1e-3, rtol=1e-4)
    assert torch.allclose(k.linear_int4(x, q4.packed, q4.scale_min, None).float(), x.float() @ q4.dequantized().T,
                          atol=0.05 * 64 ** 0.5, rtol=0.05)
    for name, call in (("silu_mul", lambda: k.silu_mul(torch.randn(2, 8))),
                       ("add_rms_norm_bf16", lambda: k.add_rms_norm_bf16(x, x, torch.ones(64).bfloat16(), 1e-6)),
                       ("add_rms_norm_f32w", lambda: k.add_rms_norm_f32w(x.float(), None, torch.ones(64), 1e-6)),
                       ("linear_bf16", lambda: k.linear_bf16(x, w, None, False, "avx512f")),
                       ("decode_attention", lambda: k.decode_attention(torch.randn(1, 4, 8), torch.randn(10, 2, 8),
                                                                       torch.randn(10, 2, 8),
                                                                       torch.zeros(1, 3, dtype=torch.long),
                                                                       torch.tensor([3]))),
                       ("delta_net_decode", lambda: k.delta_net_decode(
                           **_delta_inputs(2, 2, 4, 16, 32, 4, torch.float32, torch.float32, seed=1)))):
        with pytest.raises(RuntimeError, match=f"{name}: (this CPU has no AVX512|unknown isa avx)"):
            call()
    with pytest.raises(RuntimeError, match="unknown instruction set avx513"):
        k.set_max_isa("avx513")
    k.set_max_isa(own)
    assert k.isa() == native_isa and k.has_vnni() == native_vnni


def test_cap_isa_holds_torchs_operators_to_the_same_instruction_sets(monkeypatch):
    from qwen_inference import sysinfo

    for name in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(sysinfo.MAX_CPU_ISA_ENV, "avx512_vnni")
    assert kernels.cap_isa() == "avx512_vnni"
    assert os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE_VNNI" and "ATEN_CPU_CAPABILITY" not in os.environ
    assert os.environ["MKL_ENABLE_INSTRUCTIONS"] == "AVX512_E1"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")  # one set by hand stays
    monkeypatch.setenv(sysinfo.MAX_CPU_ISA_ENV, "avx2")
    assert kernels.cap_isa() == "avx2"
    assert os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE" and os.environ["ATEN_CPU_CAPABILITY"] == "avx2"
    assert os.environ["MKL_ENABLE_INSTRUCTIONS"] == "AVX512_E1"  # the first cap's, kept
    monkeypatch.delenv(sysinfo.MAX_CPU_ISA_ENV)
    assert kernels.cap_isa() is None


@pytest.mark.parametrize("cap", ["avx512_vnni", "avx2"])
def test_without_avx512_bf16_auto_is_bf16_and_the_kernel_takes_every_step_not_widened(k, held_to, tiny_model,
                                                                                      monkeypatch, cap):
    """On an AVX512 CPU without AVX512-BF16 (Cascade Lake, Ice Lake), and on one with AVX2 alone (Zen 3), `--dtype
    auto` is bf16 where the kernels load (float32 where they do not), and every step, decode rows and prompt chunks
    alike, runs the bf16 matmul kernel, never widened to float32, and gives torch's logits. With AVX2 the matmuls
    (bf16, int8, int4) are the kernels that run: attention and the fused small operators stay on torch's."""
    from qwen_inference.engine.models import load_model
    from qwen_inference.engine.platform import ALL_ROWS, CPU_WIDEN_MIN_TOKENS, KERNEL_ROWS, LOGIT_KERNEL_ROWS, Platform
    from qwen_inference.engine.weights import linear

    from .test_engine import prompt_logits

    if cap.startswith("avx512") and not AVX512:
        pytest.skip("an AVX512 CPU's path")
    if "avx512_bf16" in cpu_flags():
        native = Platform.resolve("cpu", "auto")
        assert native.dtype == torch.bfloat16 and native.matmul_kernel_rows == KERNEL_ROWS
        assert native.logit_kernel_rows == LOGIT_KERNEL_ROWS and native.widen_min_tokens is None
    held_to(cap)
    platform = Platform.resolve("cpu", "auto")
    assert platform.dtype == torch.bfloat16 and platform.widen_min_tokens is None
    assert platform.matmul_kernel_rows == platform.logit_kernel_rows == ALL_ROWS
    assert platform.compute_dtype(4096) == torch.bfloat16
    assert platform.matmul_kernels() and platform.cpu_kernels() == (cap != "avx2")
    assert platform.kernels_in_use() == ("the engine's kernels on avx2 (the matmuls alone)" if cap == "avx2"
                                         else "the engine's kernels on avx512f")
    assert platform.fused_small_ops() == (cap != "avx2")
    assert platform.attention_backend == ("sdpa-gather" if cap == "avx2" else "cpu-kernel")
    assert Platform.cpu(torch.bfloat16, "int4").int4_kernels()
    int8 = Platform.cpu(torch.bfloat16, "int8")
    assert int8.linear_fn().__name__ == "linear_int8_small_rows"  # VNNI's or AVX2's
    # without VNNI oneDNN's integer matmul saturates: every int8 step runs the kernel
    assert (100000 in int8.int8_kernel_rows) == (cap == "avx2" or not VNNI)
    fast = load_model(tiny_model, platform)
    assert fast.linear.__name__ == "linear_small_rows" and fast.fused == (cap != "avx2")
    slow = load_model(tiny_model, platform)
    slow.linear, slow.fused = linear, False
    real, calls = torch.ops.qwen.linear_bf16, []

    def counted(x, *args):
        calls.append(x.shape[0])
        return real(x, *args)

    monkeypatch.setattr(torch.ops.qwen, "linear_bf16", counted)
    for n in (1, 2, KERNEL_ROWS[-1] + 1, 50, 200):  # block_rows, then the tiles (GEMM_MIN_ROWS, cpu.cpp)
        ids = list(range(900, 900 + n))
        calls.clear()
        a = prompt_logits(fast, ids)
        assert set(calls) == {n}
        b = prompt_logits(slow, ids)
        assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.999
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    monkeypatch.setattr(kernels, "load", lambda build_if_missing=True: False)
    monkeypatch.setattr(kernels, "unavailable", lambda: "this CPU has neither AVX512 nor AVX2")
    assert Platform.resolve("cpu", "auto").dtype == torch.float32
    assert Platform.cpu(torch.bfloat16).widen_min_tokens == CPU_WIDEN_MIN_TOKENS  # torch's bf16 matmuls up to there
    assert Platform.cpu().kernels_in_use() == "torch's kernels (this CPU has neither AVX512 nor AVX2)"


def test_weights_quantized_a_slice_at_a_time_equal_the_whole_weight_formulas():
    """Int8Weight and Int4BlockWeight quantize QUANTIZE_ROWS rows at a time (in cache); the result is bit for bit
    the formulas applied to the whole weight at once, across slice edges and a last, shorter slice."""
    from qwen_inference.engine.weights import QUANTIZE_ROWS, Int4BlockWeight, Int8Weight, int4_groups

    torch.manual_seed(3)
    n, k = 2 * QUANTIZE_ROWS + 48, 96
    w = (torch.randn(n, k) * 0.05).to(torch.bfloat16)
    w[5] = 0  # a row of zeros: the smallest scale, not a division by zero
    got = Int8Weight.of(w)
    wf = w.float()
    scale = (wf.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8)
    assert torch.equal(got.q, q) and torch.equal(got.scale, scale)
    assert torch.equal(got.rowsum, q.sum(dim=1, dtype=torch.int32)) and not got.q[5].any()

    got4 = Int4BlockWeight.of(w)
    q4, scale4, low = int4_groups(w)
    q4 = q4.to(torch.uint8).view(n // 16, 16, k // 8, 8)
    words = (q4[..., :4] | (q4[..., 4:] << 4)).permute(0, 2, 1, 3).reshape(n // 16, k // 8, 64)
    per_block = lambda t: t.view(n // 16, 16, -1).permute(0, 2, 1)  # noqa: E731
    assert torch.equal(got4.packed, words)
    assert torch.equal(got4.scale_min, torch.cat([per_block(scale4), per_block(low)], dim=-1).to(torch.bfloat16))

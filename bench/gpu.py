"""`make bench-gpu`: the engine's CUDA path on a real GPU, in one run. Needs a CUDA GPU; writes
bench/results/<date>-gpu.json and .md (or into --out-dir), with the GPU named.

    python -m bench.gpu                               # parity, then throughput on the three architectures
    python -m bench.gpu --parts parity                # parity only
    python -m bench.gpu --parts throughput --models qwen2.5-0.5b --levels 1,16

Parity: random-weight qwen2, qwen3 and qwen3_5 models (tiny presets, Qwen's real vocabularies) on the GPU in
float32 give transformers' own `generate()` greedy replies, token for token, alone and eight at once; bfloat16 and
float16 give logits within a stated distance of float32's, set beside transformers' own bfloat16 and float16 on the
same weights.

Throughput: qwen-serve on the GPU (bf16), 1, 16, 64 and 256 concurrent streams through its HTTP API (the harness
of `make bench`: 70-token prompts, 48 tokens out), against transformers' own continuous batching
(`generate_batch`) on the same GPU, same prompt ids, same output lengths, at most as many requests at once as
the level. transformers' continuous batching has no cache for linear-attention layers, so on Qwen3.5 the baseline
is its `generate()` over left-padded batches of the level's size. Each part stops early when `--deadline` seconds
have passed; what was measured is written as it is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from .run import CACHE, OUTPUT_TOKENS, PROMPT_TOKENS, ROOT, Server, free_port, log, words_for

PARITY_MODELS = {"qwen2": "tiny", "qwen3": "tiny-qwen3", "qwen3_5": "tiny-qwen3.5-text"}
THROUGHPUT_MODELS = ("qwen2.5-0.5b", "qwen3.5-2b", "qwen3.5-9b")
LEVELS = (1, 16, 64, 256)
DEVICE = "cuda"  # --device cpu runs the harness itself on the tiny models, without a GPU
PARITY_TOKENS = 16


def sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def gpu_info() -> dict:
    import torch

    if DEVICE != "cuda":
        return {"name": DEVICE, "torch": torch.__version__}

    p = torch.cuda.get_device_properties(0)
    info = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "multiprocessors": p.multi_processor_count,
            "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import transformers

        info["transformers"] = transformers.__version__
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def gpu_memory_used() -> float | None:
    """GiB in use on GPU 0, as the driver counts it (every process)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=30).stdout
        return round(float(out.strip()) / 1024, 2)
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def make(preset: str, dtype: str) -> Path:
    from qwen_inference.random_model import FORMAT_VERSION, make_random_model

    out = CACHE / "bench-models" / f"{preset}-{dtype}-{DEVICE}-v{FORMAT_VERSION}"
    if not out.is_dir():
        t = time.monotonic()
        make_random_model(preset, out, dtype, device=DEVICE)
        log(f"made {out.name} in {time.monotonic() - t:.0f}s")
    return out


def prompt_logits(model, ids: list[int], state_slots: int = 0):
    """The model's logits after every token of `ids`, computed as one prompt chunk."""
    import torch

    from qwen_inference.engine.runner import ModelRunner, SeqChunk

    runner = ModelRunner(model, kv_tokens=-(-len(ids) // 16) * 16, state_slots=state_slots)
    table = list(range(1, runner.num_blocks))
    with torch.inference_mode():
        return runner.execute([SeqChunk(list(ids), 0, table, 0 if state_slots else None, all_logits=True)])


# ---- parity -------------------------------------------------------------------------------------------------


def _prompts(first_id: int, count: int = 8) -> list[list[int]]:
    return [[first_id] + list(range(1000 + 37 * i, 1000 + 37 * i + 5 + 13 * i)) for i in range(count)]


async def _engine_replies(model, prompts: list[list[int]], together: bool) -> list[list[int]]:
    from qwen_inference.engine import Engine, SamplingParams
    from qwen_inference.engine.engine import TokenEvent

    engine = Engine(model, max_concurrency=8, max_queue=8, max_model_len=512, kv_cache_tokens=4096, prefill_chunk=32)
    engine.start()

    async def one(i: int, p: list[int]) -> list[int]:
        h = engine.submit(f"r{i}", p, SamplingParams(max_tokens=PARITY_TOKENS, temperature=0), 120)
        return [ev.token_id async for ev in h.events() if isinstance(ev, TokenEvent)]

    try:
        if together:
            return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))
        return [await one(i, p) for i, p in enumerate(prompts)]
    finally:
        engine.stop()


def parity_one(arch: str, preset: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from qwen_inference.engine.models import load_model
    from qwen_inference.engine.platform import Platform

    cuda = torch.device(DEVICE)
    path = make(preset, "float32")
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(cuda).eval()
    hf.generation_config.suppress_tokens = None
    im_start = 248045 if arch == "qwen3_5" else 151644
    prompts = _prompts(im_start)
    with torch.no_grad():
        want = [hf.generate(torch.tensor([p], device=cuda), max_new_tokens=PARITY_TOKENS, do_sample=False,
                            attention_mask=torch.ones(1, len(p), dtype=torch.long, device=cuda))[0, len(p):].tolist()
                for p in prompts]
    model = load_model(path, Platform((cuda,), torch.float32))
    alone = asyncio.run(_engine_replies(model, prompts[:3], together=False))
    together = asyncio.run(_engine_replies(model, prompts, together=True))
    res = {"arch": arch, "preset": preset, "tokens": PARITY_TOKENS, "prompts": len(prompts),
           "float32_alone_equal": sum(a == b for a, b in zip(alone, want)), "alone": len(alone),
           "float32_together_equal": sum(a == b for a, b in zip(together, want)),
           "first_difference": next(([i, a, b] for i, (a, b) in enumerate(zip(together, want)) if a != b), None)}
    del model
    # lower precisions: the engine's prompt logits against transformers' float32 ones, beside transformers' own
    ids = list(range(500, 640))
    with torch.no_grad():
        ref = hf(torch.tensor([ids], device=cuda)).logits[0].float()
    del hf
    slots = 1 if arch == "qwen3_5" else 0
    for dtype in (torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")
        m = load_model(path, Platform((cuda,), dtype))
        ours = prompt_logits(m, ids, state_slots=slots).to(cuda)
        del m
        hf_low = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(cuda).eval()
        with torch.no_grad():
            theirs = hf_low(torch.tensor([ids], device=cuda)).logits[0].float()
        del hf_low
        res[name] = {
            "max_abs_diff": (ours - ref).abs().max().item(),
            "transformers_max_abs_diff": (theirs - ref).abs().max().item(),
            "cosine_min": torch.nn.functional.cosine_similarity(ours, ref, dim=-1).min().item(),
            "transformers_cosine_min": torch.nn.functional.cosine_similarity(theirs, ref, dim=-1).min().item(),
            "argmax_agree": (ours.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "transformers_argmax_agree": (theirs.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "logit_scale": ref.abs().max().item(),
        }
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return res


# ---- throughput ---------------------------------------------------------------------------------------------


class MemorySampler(threading.Thread):
    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self.done = interval, 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, gpu_memory_used() or 0.0)
            self.done.wait(self.interval)


def requests_for(level: int) -> int:
    return 4 if level == 1 else 2 * level


async def serve_levels(port: int, levels: list[int], words: int, pid: int, stop_at: float) -> list[dict]:
    from qwen_inference.bench.load import run_level, summary_line

    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    await run_level(url, None, 4, 8, words, 8, seed=10**6)  # warm-up, not counted
    out = []
    for i, c in enumerate(levels):
        if time.monotonic() > stop_at:
            log(f"qwen-serve: deadline reached before {c} streams")
            break
        level = await run_level(url, None, c, requests_for(c), words, OUTPUT_TOKENS, seed=1000 * (i + 1), pid=pid)
        log(f"qwen-serve: {summary_line(level)}")
        out.append(asdict(level))
    return out


def prompt_ids(path: Path, words: int, seeds: list[int]) -> list[list[int]]:
    from transformers import AutoTokenizer

    from qwen_inference.bench.load import prompt_text

    tok = AutoTokenizer.from_pretrained(str(path))
    return [tok.apply_chat_template([{"role": "user", "content": prompt_text(words, s)}], tokenize=True,
                                    add_generation_prompt=True, return_dict=False) for s in seeds]


def hf_levels(path: Path, levels: list[int], words: int, stop_at: float) -> list[dict]:
    """transformers on the same GPU: continuous batching where it has a cache for every layer, else generate()."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from qwen_inference.bench.load import pct

    cuda = torch.device(DEVICE)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).to(cuda).eval()
    hybrid = "linear_attention" in (getattr(model.config.get_text_config(), "layer_types", None) or [])
    gen = GenerationConfig(max_new_tokens=OUTPUT_TOKENS, min_new_tokens=OUTPUT_TOKENS, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    out = []
    for i, c in enumerate(levels):
        if time.monotonic() > stop_at:
            log(f"transformers: deadline reached before {c} streams")
            break
        n = requests_for(c)
        prompts = prompt_ids(path, words, [1000 * (i + 1) + k for k in range(n)])
        sync()
        ttft = tpot = []
        if hybrid:
            mode = "generate (left-padded batches)"
            tokens = 0
            t0 = time.perf_counter()
            for s in range(0, n, c):
                batch = prompts[s:s + c]
                width = max(map(len, batch))
                ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=cuda)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=cuda)
                with torch.no_grad():
                    got = model.generate(ids, attention_mask=mask, generation_config=gen)
                tokens += (got.shape[1] - width) * len(batch)
            sync()
            wall = time.perf_counter() - t0
        else:
            from transformers import ContinuousBatchingConfig

            mode = "generate_batch (continuous batching)"
            # on the CPU (the harness's own run, on tiny models) a cache for these requests alone: sized from free
            # memory, as on a GPU, it is gigabytes that take longer to fill than the run itself
            pages = -(-(max(map(len, prompts)) + OUTPUT_TOKENS) // 256)  # 256 tokens a page
            sized = {} if DEVICE == "cuda" else {"num_blocks": c * pages + 1, "max_batch_tokens": 1024}
            cb = ContinuousBatchingConfig(max_requests_per_batch=c, **sized)
            res = model.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb,
                                       record_timestamps=True)
            done = list(res.values())
            tokens = sum(len(r.generated_tokens) for r in done)
            # from the first request's creation to the last one's end: the manager's set-up and its warm-up
            # (CUDA graph capture) before the requests are let in are not counted
            wall = max(r.lifespan[1] for r in done) - min(r.created_time for r in done)
            stamped = [r for r in done if r.timestamps]
            # from admission (no longer pending) to the first token: the client-side semaphore of qwen-serve's
            # levels likewise holds requests back before they are sent
            ttft = [r.timestamps[0] - r.lifespan[0] for r in stamped]
            tpot = [(r.timestamps[-1] - r.timestamps[0]) / (len(r.timestamps) - 1) for r in stamped
                    if len(r.timestamps) > 1]
        row = {"concurrency": c, "requests": n, "mode": mode, "generated_tokens": tokens, "wall_seconds": wall,
               "tokens_per_second": tokens / wall, "ttft_p50": pct(ttft, 0.5), "tpot_p50": pct(tpot, 0.5),
               "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None}
        log(f"transformers ({mode}): c={c} req={n} tok/s={row['tokens_per_second']:.1f} ttft p50 {row['ttft_p50']} "
            f"tpot p50 {row['tpot_p50']}")
        out.append(row)
    del model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return out


def throughput_one(preset: str, levels: list[int], stop_at: float, skip_hf: bool) -> dict:
    path = make(preset, "bfloat16")
    words = words_for(PROMPT_TOKENS, path)
    res: dict = {"model": preset, "levels": levels}
    port = free_port()
    cmd = [sys.executable, "-c", "import sys; from qwen_inference.cli import serve_main; sys.exit(serve_main())",
           "--model", str(path), "--port", str(port), "--device", DEVICE, "--dtype", "bfloat16",
           "--max-concurrency", str(max(levels)), "--max-queue", str(4 * max(levels)), "--prefill-chunk", "2048"]
    idle = gpu_memory_used()
    t = time.monotonic()
    with Server("qwen-serve", cmd, port, "/health", env={"PYTHONPATH": os.pathsep.join(
            [str(ROOT / "inference"), os.environ.get("PYTHONPATH", "")])}) as server:
        res["qwen_serve_start_seconds"] = time.monotonic() - t
        res["qwen_serve_memory_loaded_gib"] = gpu_memory_used()
        mem = MemorySampler()
        mem.start()
        try:
            res["qwen_serve"] = asyncio.run(serve_levels(port, levels, words, server.proc.pid, stop_at))
        finally:
            mem.done.set()
            mem.join()
        res["qwen_serve_memory_peak_gib"] = mem.peak
        res["qwen_serve_log_tail"] = server.log.read_text()[-1500:]
    res["gpu_memory_idle_gib"] = idle
    if not skip_hf:
        try:
            res["transformers"] = hf_levels(path, levels, words, stop_at + 120)
        except Exception:  # noqa: BLE001 (the baseline's failure is recorded, the run goes on)
            res["transformers_error"] = traceback.format_exc()[-3000:]
            log(res["transformers_error"])
    return res


# ---- report -------------------------------------------------------------------------------------------------


def ratio(ours: float, theirs: float | None) -> str:
    return "-" if not theirs else f"{ours / theirs:.2f}×"


def markdown(meta: dict, parity: list[dict], throughput: list[dict]) -> str:
    g = meta["gpu"]
    lines = [f"Run {meta['date']} on {g.get('name')} ({g.get('memory_gib')} GiB; torch {g.get('torch')}, CUDA "
             f"{g.get('cuda')}, driver {g.get('driver')}, transformers {g.get('transformers')}): `{meta['command']}`", ""]
    if parity:
        lines += ["| architecture | float32 greedy = transformers, alone | eight at once | bf16 max abs diff "
                  "(transformers' bf16) | fp16 max abs diff (transformers' fp16) | logits' scale |",
                  "|---|---|---|---|---|---|"]
        for p in parity:
            if "error" in p:
                lines.append(f"| {p['arch']} | error: {p['error'].splitlines()[-1][:120]} | | | | |")
                continue
            b, h = p["bfloat16"], p["float16"]
            lines.append(f"| {p['arch']} | {p['float32_alone_equal']}/{p['alone']} | {p['float32_together_equal']}/"
                         f"{p['prompts']} | {b['max_abs_diff']:.3f} ({b['transformers_max_abs_diff']:.3f}) | "
                         f"{h['max_abs_diff']:.3f} ({h['transformers_max_abs_diff']:.3f}) | {b['logit_scale']:.1f} |")
        lines.append("")
    for t in throughput:
        lines.append(f"**{t['model']}** (bf16)" + (f": error {t['error'].splitlines()[-1][:200]}" if "error" in t else ""))
        if "qwen_serve" not in t:
            continue
        hf = {r["concurrency"]: r for r in t.get("transformers", [])}
        lines += ["", "| streams | qwen-serve tok/s | TTFT p50 | TPOT p50 | transformers tok/s | its TTFT p50 | its TPOT "
                      "p50 | ratio |", "|---|---|---|---|---|---|---|---|"]
        for lv in t["qwen_serve"]:
            c = lv["concurrency"]
            h = hf.get(c, {})
            theirs = h.get("tokens_per_second")
            f = lambda v, unit="", k=1: "-" if v is None else f"{v * k:.3f}{unit}"  # noqa: E731
            lines.append(f"| {c} | {lv['tokens_per_second']:.1f} | {f(lv['ttft_p50'], ' s')} | "
                         f"{f(lv['tpot_p50'], ' ms', 1000)} | {f(theirs)} | {f(h.get('ttft_p50'), ' s')} | "
                         f"{f(h.get('tpot_p50'), ' ms', 1000)} | "
                         f"{ratio(lv['tokens_per_second'], theirs)} |")
        mode = next(iter(hf.values()), {}).get("mode", "")
        lines += ["", f"GPU memory: {t.get('qwen_serve_memory_loaded_gib')} GiB after qwen-serve loaded, peak "
                      f"{t.get('qwen_serve_memory_peak_gib')} GiB; transformers: {mode}" + (
                          f", error: {t['transformers_error'].splitlines()[-1][:200]}" if "transformers_error" in t
                          else ""), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="make bench-gpu")
    ap.add_argument("--parts", default="parity,throughput")
    ap.add_argument("--models", default=",".join(THROUGHPUT_MODELS))
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)))
    ap.add_argument("--deadline", type=float, default=3600, help="seconds after which no new part starts")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: the harness itself, on the tiny model (no GPU needed)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    a = ap.parse_args(argv)
    import torch

    global DEVICE
    DEVICE = a.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        log("no CUDA GPU here: nothing to measure")
        return 2
    start = time.monotonic()
    stop_at = start + a.deadline
    parts = a.parts.split(",")
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "gpu": gpu_info(),
            "command": "python -m bench.gpu " + " ".join(argv if argv is not None else sys.argv[1:]),
            "prompt_tokens": PROMPT_TOKENS, "output_tokens": OUTPUT_TOKENS}
    log(f"GPU: {meta['gpu']}")
    a.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = f"{dt.date.today().isoformat()}-gpu"
    parity: list[dict] = []
    throughput: list[dict] = []

    def write() -> None:
        (a.out_dir / f"{stamp}.json").write_text(json.dumps({"meta": meta, "parity": parity,
                                                             "throughput": throughput}, indent=2))
        (a.out_dir / f"{stamp}.md").write_text(markdown(meta, parity, throughput))

    if "parity" in parts:
        for arch, preset in PARITY_MODELS.items():
            t = time.monotonic()
            try:
                parity.append(parity_one(arch, preset))
            except Exception:  # noqa: BLE001 (recorded, the next architecture still runs)
                parity.append({"arch": arch, "preset": preset, "error": traceback.format_exc()[-3000:]})
            log(f"parity {arch} ({time.monotonic() - t:.0f}s): {json.dumps(parity[-1])[:1500]}")
            write()
    if "throughput" in parts:
        levels = [int(x) for x in a.levels.split(",")]
        for preset in a.models.split(","):
            if time.monotonic() > stop_at:
                log(f"deadline reached before {preset}")
                break
            t = time.monotonic()
            try:
                throughput.append(throughput_one(preset, levels, stop_at, a.skip_transformers))
            except Exception:  # noqa: BLE001
                throughput.append({"model": preset, "error": traceback.format_exc()[-3000:]})
                log(throughput[-1]["error"])
            log(f"throughput {preset} took {time.monotonic() - t:.0f}s")
            write()
    write()
    print(markdown(meta, parity, throughput))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

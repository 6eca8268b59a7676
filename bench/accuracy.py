"""What each quantized mode costs in accuracy, against float32 on the same weights.

    python -m bench.accuracy                      # Qwen2.5-0.5B's architecture: bf16, int8, int4
    python -m bench.accuracy --model qwen3.5-2b

For a fixed set of prompts (real-vocabulary text) it reports the cosine of each mode's next-token logits with
float32's over every prompt position, and how many greedy replies (32 tokens) agree with float32's token for
token, and up to which token on average. The weights are random (make-random), which exaggerates every
rounding error compared with a trained model: read the figures as upper bounds and as a ranking of the modes.
Writes bench/results/accuracy-<date>-<model>.md, with the CPU named.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
from pathlib import Path

import torch

from .run import MODELS, ROOT, cpu_info, log, model_dir

MODES = (("bfloat16", "none"), ("float32", "int8"), ("bfloat16", "int4"))


def prompts(tokenizer, n: int) -> list[list[int]]:
    from qwen_inference.bench.load import prompt_text

    out = []
    for i in range(n):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt_text(20 + 5 * i, 4242 + i)}],
                                             tokenize=False, add_generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def logits_of(model, ids: list[int]) -> torch.Tensor:
    from qwen_inference.engine.runner import ModelRunner, SeqChunk

    runner = ModelRunner(model, kv_tokens=-(-len(ids) // 16) * 16, state_slots=1)
    with torch.inference_mode():
        return runner.execute([SeqChunk(ids, 0, list(range(1, runner.num_blocks)), 0, all_logits=True)])


async def greedy(model, ps: list[list[int]], n: int) -> list[list[int]]:
    from qwen_inference.engine import Engine, SamplingParams
    from qwen_inference.engine.engine import TokenEvent

    engine = Engine(model, max_concurrency=len(ps), max_queue=len(ps), max_model_len=1024, kv_cache_tokens=8192)
    engine.start()
    try:
        async def one(i, p):
            h = engine.submit(str(i), p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), 3600)
            return [ev.token_id async for ev in h.events() if isinstance(ev, TokenEvent)]

        return await asyncio.gather(*(one(i, p) for i, p in enumerate(ps)))
    finally:
        engine.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.accuracy")
    ap.add_argument("--model", choices=MODELS, default=MODELS[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    a = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from qwen_inference.engine.models import load_model
    from qwen_inference.engine.platform import Platform
    from qwen_inference.sysinfo import cgroup_cpu_limit

    torch.set_num_threads(cgroup_cpu_limit())
    cpu = cpu_info()
    path = model_dir(False, a.model)
    ps = prompts(AutoTokenizer.from_pretrained(str(path)), a.prompts)
    log(f"{a.model}: {len(ps)} prompts of {min(map(len, ps))}-{max(map(len, ps))} tokens, {a.tokens} tokens out")
    reference = load_model(path, Platform.cpu(torch.float32))
    ref_logits = [logits_of(reference, p) for p in ps]
    ref_replies = asyncio.run(greedy(reference, ps, a.tokens))
    del reference
    rows = ["| mode | weight bytes | logits cosine: mean | min | greedy replies equal | tokens equal before the "
            "first difference (mean) |", "|---|---|---|---|---|---|"]
    for dtype, quant in MODES:
        platform = Platform.cpu(getattr(torch, dtype), quant)
        model = load_model(path, platform)
        cos = torch.cat([torch.nn.functional.cosine_similarity(logits_of(model, p), r, dim=-1)
                         for p, r in zip(ps, ref_logits)])
        replies = asyncio.run(greedy(model, ps, a.tokens))
        same = sum(r == w for r, w in zip(replies, ref_replies))
        prefix = [next((i for i, (x, y) in enumerate(zip(r, w)) if x != y), len(r)) for r, w in zip(replies, ref_replies)]
        rows.append(f"| {platform.dtype_name()} | {model.weight_bytes() / 2**20:.0f} MiB | {cos.mean():.4f} | "
                    f"{cos.min():.4f} | {same}/{len(ps)} | {sum(prefix) / len(prefix):.1f} of {a.tokens} |")
        log(rows[-1])
        del model
    text = "\n".join([f"# Accuracy of the quantized modes: {a.model}", "",
                      f"{dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')} on {cpu['model']} "
                      f"({cpu['cpus']} CPUs; {', '.join(cpu['flags'])}); against float32 on the same random weights; "
                      f"`python -m bench.accuracy {' '.join(sys.argv[1:] if argv is None else argv)}`", ""] + rows) + "\n"
    print(text)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / f"accuracy-{dt.date.today().isoformat()}-{a.model}.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

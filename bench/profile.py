"""Where a decode step and a prefill chunk spend their time: the engine's forward profiled by operator.

    python -m bench.profile                          # Qwen2.5-0.5B's architecture, bf16, the default path
    python -m bench.profile --model qwen3.5-2b --quantize int8
    python -m bench.profile --no-kernels             # torch's matmuls only, to compare

    python -m bench.profile --context 4000           # decode rows 4000 tokens into their sequences

For batches of 1 and 16 decode rows (each 128 tokens into its sequence, or `--context` tokens) and a 256-token
prompt chunk, it prints the wall time per step, the share of the top operators (torch.profiler's self CPU time),
and how much of the step is neither a matmul nor attention (the per-layer small ops and Python). Writes
bench/results/profile-<date>-<model>-<mode>[-ctx<N>].md, with the CPU named.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import torch

from .run import MODELS, ROOT, cpu_info, log, model_dir

MATMUL_OPS = ("aten::linear", "aten::mm", "aten::addmm", "aten::_int_mm", "aten::_weight_int8pack_mm",
              "aten::_weight_int4pack_mm_for_cpu", "aten::matmul", "aten::bmm")
KERNEL_MATMUL_PREFIX = "qwen::linear_"  # the engine's own matmul kernels
ATTENTION_OPS = ("qwen::decode_attention",)  # and torch's SDPA


def steps(runner, chunks_for, repeat: int) -> list[float]:
    times = []
    for i in range(repeat):
        chunks = chunks_for(i)
        t = time.perf_counter()
        runner.execute(chunks)
        times.append(time.perf_counter() - t)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile")
    ap.add_argument("--model", choices=MODELS, default=MODELS[0])
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    ap.add_argument("--quantize", default="none")
    ap.add_argument("--no-kernels", action="store_true", help="torch's matmuls only")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--context", type=int, default=128, help="tokens already in each decode row's sequence")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    a = ap.parse_args(argv)

    from qwen_inference.engine.models import load_model
    from qwen_inference.engine.platform import Platform
    from qwen_inference.engine.runner import ModelRunner, SeqChunk
    from qwen_inference.engine.weights import linear
    from qwen_inference.sysinfo import cgroup_cpu_limit

    torch.set_num_threads(cgroup_cpu_limit())
    cpu = cpu_info()
    path = model_dir(False, a.model)
    platform = Platform.resolve("cpu", a.dtype, a.quantize)
    model = load_model(path, platform)
    if a.no_kernels:
        model.linear = linear
    mode = f"{platform.dtype_name()}{'-torch' if a.no_kernels else ''}"
    log(f"{a.model} {mode} on {cpu['model']}; matmuls: {getattr(model.linear, '__name__', 'linear')}")
    bs, ctx = 16, a.context
    per_seq = -(-(ctx + 40) // bs)
    runner = ModelRunner(model, kv_tokens=17 * per_seq * bs + 512, state_slots=17)
    tables = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(17)]
    prompt = [1000 + i % 5000 for i in range(ctx)]
    fresh = list(range(1 + 17 * per_seq, 1 + 17 * per_seq + 16))  # 256 tokens of blocks no sequence holds
    with torch.inference_mode():
        for i in range(17):  # fill every sequence's cache (and state) to `ctx` tokens
            for start in range(0, ctx, 512):
                runner.execute([SeqChunk(prompt[start:start + 512], start, tables[i], i)])
        cases = {
            "decode, 1 row": lambda i: [SeqChunk([7], ctx + i % 32, tables[0], 0, logits=True)],
            "decode, 16 rows": lambda i: [SeqChunk([7], ctx + i % 32, tables[j], j, logits=True) for j in range(16)],
            "prefill, 256 tokens": lambda i: [SeqChunk(list(range(2000, 2256)), 0, fresh, 16, logits=True)],
        }
        lines = [f"# Profile of one engine step: {a.model}, {mode}", "",
                 f"{dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')} on {cpu['model']} "
                 f"({cpu['cpus']} CPUs; {', '.join(cpu['flags'])}"
                 + (f", held to {cpu['max_cpu_isa']} (QWEN_MAX_CPU_ISA)" if "max_cpu_isa" in cpu else "")
                 + f"; load {cpu['loadavg']:.1f}); torch "
                 f"{torch.__version__}; `python -m bench.profile {' '.join(sys.argv[1:] if argv is None else argv)}`", ""]
        for name, chunks_for in cases.items():
            steps(runner, chunks_for, 3)  # warm
            wall = statistics.median(steps(runner, chunks_for, a.repeat))
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                steps(runner, chunks_for, max(3, a.repeat // 4))
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events)
            matmul = sum(e.self_cpu_time_total for e in events
                         if e.key in MATMUL_OPS or e.key.startswith(KERNEL_MATMUL_PREFIX))
            attention = sum(e.self_cpu_time_total for e in events
                            if "scaled_dot_product" in e.key or e.key in ATTENTION_OPS)
            top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
            lines += [f"## {name}: {wall * 1000:.1f} ms per step", "",
                      f"matmuls {100 * matmul / total:.0f}%, attention {100 * attention / total:.0f}%, "
                      f"everything else {100 * (total - matmul - attention) / total:.0f}% of the profiled CPU time",
                      "", "| operator | calls per step | self CPU per step | share |", "|---|---|---|---|"]
            n = max(3, a.repeat // 4)
            for e in top:
                lines.append(f"| `{e.key}` | {e.count / n:.0f} | {e.self_cpu_time_total / n / 1000:.2f} ms | "
                             f"{100 * e.self_cpu_time_total / total:.1f}% |")
            lines.append("")
    text = "\n".join(lines)
    print(text)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    suffix = ("" if ctx == 128 else f"-ctx{ctx}") + (f"-{cpu['max_cpu_isa']}" if "max_cpu_isa" in cpu else "")
    (a.out_dir / f"profile-{dt.date.today().isoformat()}-{a.model}-{mode}{suffix}.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

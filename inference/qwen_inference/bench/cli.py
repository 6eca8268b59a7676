"""`qwen-bench`: load-test an OpenAI-compatible endpoint at several concurrency levels; write JSON and a chart."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict


class BenchSettings(BaseSettings):
    """Settings of `qwen-bench`."""

    model_config = SettingsConfigDict(env_prefix="QWEN_BENCH_", cli_kebab_case=True, cli_prog_name="qwen-bench")

    url: str = Field("http://127.0.0.1:8000/v1", description="Base URL of the OpenAI-compatible API.")
    model: str | None = Field(None, description="Model name to send (default: none).")
    concurrency: list[int] = Field(default_factory=lambda: [1, 4, 16], description="Concurrency levels.")
    requests: int | None = Field(None, ge=1, description="Requests per level (default: 2 × concurrency, at least 3).")
    prompt_words: int = Field(60, ge=1, description="Words per prompt (about 1.2 tokens each, plus the template).")
    max_tokens: int = Field(48, ge=1, description="Tokens to generate per request.")
    seed: int = Field(0, description="Seed of the prompts.")
    pid: int | None = Field(None, description="Server process id, to record its peak resident memory.")
    api_key: str | None = Field(None, description="API key to send.")
    ignore_eos: bool = Field(True, description="Send `ignore_eos` (vLLM's and llama.cpp's extension) so every request "
                                               "generates max-tokens; turn off for servers that refuse it.")
    label: str = Field("server", description="Name of this server in the output.")
    out: Path | None = Field(None, description="Write the results as JSON here.")
    chart: Path | None = Field(None, description="Write a PNG chart of throughput and TTFT here.")


async def bench(s: BenchSettings) -> dict:
    from .load import run_level, summary_line

    url = s.url.rstrip("/") + "/chat/completions"
    levels = []
    for i, c in enumerate(s.concurrency):
        n = s.requests or max(3, 2 * c)
        level = await run_level(url, s.model, c, n, s.prompt_words, s.max_tokens, s.seed + 100000 * (i + 1), s.pid,
                                s.api_key, ignore_eos=s.ignore_eos)
        print(f"{s.label}: {summary_line(level)}", file=sys.stderr, flush=True)
        levels.append(level)
    from dataclasses import asdict

    return {"label": s.label, "url": s.url, "prompt_words": s.prompt_words, "max_tokens": s.max_tokens,
            "levels": [asdict(x) for x in levels]}


def chart(runs: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in runs:
        xs = [lv["concurrency"] for lv in run["levels"]]
        ax1.plot(xs, [lv["tokens_per_second"] for lv in run["levels"]], marker="o", label=run["label"])
        ax2.plot(xs, [lv["ttft_p50"] or 0 for lv in run["levels"]], marker="o", label=run["label"])
    ax1.set(xlabel="concurrent streams", ylabel="generated tokens/s (aggregate)", title="Throughput")
    ax2.set(xlabel="concurrent streams", ylabel="seconds", title="Time to first token (p50)")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.set_xscale("log", base=2)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    s = CliApp.run(BenchSettings, cli_args=sys.argv[1:] if argv is None else argv)
    result = asyncio.run(bench(s))
    if s.out:
        s.out.write_text(json.dumps(result, indent=2))
    if s.chart:
        chart([result], s.chart)
    if not s.out:
        print(json.dumps(result, indent=2))
    return 1 if any(lv["errors"] for lv in result["levels"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A load generator for any OpenAI-compatible chat endpoint: streaming requests at fixed concurrency,
measuring time to first token, time per output token, end-to-end latency, throughput and errors."""

from __future__ import annotations

import asyncio
import collections
import json
import random
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field

import httpx

WORDS = ("river stone cloud lamp garden violet engine paper winter orange silver market candle forest bridge "
         "harbor quiet marble thunder velvet copper meadow lantern summit echo falcon ember glacier orchard "
         "pebble saddle timber walnut anchor basket cobalt dune fern").split()


def prompt_text(n_words: int, seed: int) -> str:
    """A prompt that differs from every other (no prefix-cache hits between runs or requests)."""
    rng = random.Random(seed)
    return f"[{seed}] " + " ".join(rng.choice(WORDS) for _ in range(n_words))


@dataclass
class Result:
    ok: bool
    ttft: float | None = None
    e2e: float | None = None
    tokens: int = 0
    itl: list[float] = field(default_factory=list)  # gaps between content (or reasoning) chunks
    error: str | None = None
    finish_reason: str | None = None
    text: str = ""


@dataclass
class LevelReport:
    concurrency: int
    requests: int
    errors: int
    wall_seconds: float
    generated_tokens: int
    tokens_per_second: float
    requests_per_second: float
    ttft_p50: float | None
    ttft_p95: float | None
    ttft_p99: float | None
    tpot_p50: float | None
    tpot_p95: float | None
    e2e_p50: float | None
    e2e_p95: float | None
    e2e_p99: float | None
    peak_rss_bytes: int | None = None
    error_samples: list[str] = field(default_factory=list)
    finish_reasons: dict[str, int] = field(default_factory=dict)
    valid_json: int | None = None  # replies that finished and parse as JSON (when asked to check)
    # CPU time the server process (and its children) spent during the level: on a shared machine, steadier than
    # wall time as a measure of what the work costs
    server_cpu_seconds: float | None = None


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


async def one_request(client: httpx.AsyncClient, url: str, model: str | None, prompt: str, max_tokens: int,
                      api_key: str | None, ignore_eos: bool = True, extra: dict | None = None) -> Result:
    """One streamed chat completion; `extra` adds fields to the body (e.g. a response_format)."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}
    if ignore_eos:  # vLLM's and llama.cpp's extension: every request generates max_tokens
        body["ignore_eos"] = True
    if model:
        body["model"] = model
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    start = time.perf_counter()
    first = last = None
    chunks = 0
    usage_tokens = None
    gaps: list[float] = []
    parts: list[str] = []
    finish = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")[:200]
                return Result(False, error=f"HTTP {r.status_code}: {text}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    return Result(False, error=str(data["error"])[:200])
                if data.get("usage"):
                    usage_tokens = data["usage"].get("completion_tokens")
                for choice in data.get("choices") or []:
                    delta = choice.get("delta") or {}
                    content = delta.get("content")
                    # a reasoning model's first tokens may arrive as reasoning (llama-server: reasoning_content)
                    thought = delta.get("reasoning") or delta.get("reasoning_content")
                    finish = choice.get("finish_reason") or finish
                    if content:
                        parts.append(content)
                    if content or thought:
                        now = time.perf_counter()
                        if first is None:
                            first = now
                        else:
                            gaps.append(now - last)
                        last = now
                        chunks += 1
    except (httpx.HTTPError, ValueError) as exc:
        return Result(False, error=f"{type(exc).__name__}: {exc}"[:200])
    end = time.perf_counter()
    tokens = usage_tokens if usage_tokens is not None else chunks
    return Result(True, ttft=(first - start) if first else None, e2e=end - start, tokens=tokens, itl=gaps,
                  finish_reason=finish, text="".join(parts))


def cpu_seconds(pid: int | None) -> float | None:
    """User and system CPU time of a process and its children so far."""
    if pid is None:
        return None
    import psutil

    try:
        p = psutil.Process(pid)
        total = 0.0
        for proc in [p] + p.children(recursive=True):
            t = proc.cpu_times()
            total += t.user + t.system
        return total
    except psutil.Error:
        return None


class RssSampler(threading.Thread):
    """Peak resident memory of a process and its children."""

    def __init__(self, pid: int | None, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak = pid, interval, 0
        self.done = threading.Event()

    def sample(self) -> int:
        import psutil

        try:
            p = psutil.Process(self.pid)
            procs = [p] + p.children(recursive=True)
            return sum(x.memory_info().rss for x in procs)
        except psutil.Error:
            return 0

    def run(self) -> None:
        if self.pid is None:
            return
        while not self.done.is_set():
            self.peak = max(self.peak, self.sample())
            self.done.wait(self.interval)


async def run_level(url: str, model: str | None, concurrency: int, requests: int, prompt_words: int,
                    max_tokens: int, seed: int, pid: int | None = None, api_key: str | None = None,
                    timeout: float = 1800, ignore_eos: bool = True, extra: dict | None = None,
                    check_json: bool = False) -> LevelReport:
    """`extra`: fields added to every request's body; `check_json`: count the replies that finished and parse
    as JSON."""
    sem = asyncio.Semaphore(concurrency)
    sampler = RssSampler(pid)
    sampler.start()
    # a fresh connection per request: a keep-alive connection the server has just closed would count as an error
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def task(i: int) -> Result:
            async with sem:
                return await one_request(client, url, model, prompt_text(prompt_words, seed + i), max_tokens, api_key,
                                         ignore_eos, extra)

        cpu_before = cpu_seconds(pid)
        start = time.perf_counter()
        results = await asyncio.gather(*(task(i) for i in range(requests)))
        wall = time.perf_counter() - start
        cpu_after = cpu_seconds(pid)
    sampler.done.set()
    sampler.join()
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tpot = [(r.e2e - r.ttft) / (r.tokens - 1) for r in ok if r.ttft is not None and r.tokens > 1]
    e2e = [r.e2e for r in ok if r.e2e is not None]
    tokens = sum(r.tokens for r in ok)
    return LevelReport(
        concurrency=concurrency, requests=requests, errors=len(results) - len(ok), wall_seconds=wall,
        generated_tokens=tokens, tokens_per_second=tokens / wall if wall else 0.0,
        requests_per_second=len(ok) / wall if wall else 0.0,
        ttft_p50=pct(ttft, 0.5), ttft_p95=pct(ttft, 0.95), ttft_p99=pct(ttft, 0.99),
        tpot_p50=pct(tpot, 0.5), tpot_p95=pct(tpot, 0.95),
        e2e_p50=pct(e2e, 0.5), e2e_p95=pct(e2e, 0.95), e2e_p99=pct(e2e, 0.99),
        peak_rss_bytes=sampler.peak or None,
        error_samples=[r.error for r in results if not r.ok][:3],
        finish_reasons=dict(collections.Counter(r.finish_reason or "none" for r in ok)),
        valid_json=sum(_is_json(r) for r in ok) if check_json else None,
        server_cpu_seconds=cpu_after - cpu_before if cpu_before is not None and cpu_after is not None else None,
    )


def _is_json(r: Result) -> bool:
    if r.finish_reason != "stop":
        return False
    try:
        json.loads(r.text)
    except ValueError:
        return False
    return True


def report_dict(levels: list[LevelReport]) -> list[dict]:
    return [asdict(x) for x in levels]


def summary_line(level: LevelReport) -> str:
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    return (f"c={level.concurrency:>3} req={level.requests:>4} err={level.errors} tok/s={level.tokens_per_second:7.2f} "
            f"ttft p50={f(level.ttft_p50)} p95={f(level.ttft_p95)} tpot p50={f(level.tpot_p50)} "
            f"e2e p50={f(level.e2e_p50)} rss={'-' if not level.peak_rss_bytes else f'{level.peak_rss_bytes / 2**30:.2f}GiB'}")


def median(xs: list[float]) -> float:
    return statistics.median(xs)

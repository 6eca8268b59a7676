"""`make bench`: qwen-serve, the seeds' design and llama.cpp's llama-server, side by side in one run on the same
random-weight model (Qwen's real vocabulary); writes bench/results/<date>-<model>.json, .png and .md, with the
CPU named.

    python -m bench.run                        # Qwen2.5-0.5B's architecture (builds llama.cpp once)
    python -m bench.run --model qwen3.5-2b     # Qwen3.5-2B's architecture (hybrid DeltaNet + attention)
    python -m bench.run --model qwen3.5-0.8b   # Qwen3.5-0.8B's, the smallest
    python -m bench.run --smoke                # the harness on the tiny model: what CI runs
    python -m bench.run --skip-llamacpp        # qwen-serve and the baseline only
    python -m bench.run --only qwen-serve --structured only   # json_schema against free text, nothing else

The structured-output scenario (on qwen-serve, `--structured on` by default) runs 16 streams of free text and 16
of json_schema output on the same server, alternating, and reports the throughput json_schema costs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import httpx

from qwen_inference.sysinfo import MAX_CPU_ISA_ENV

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from devcluster import free_port  # noqa: E402  (the project's one helper for a free loopback port)

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen-operator"
PROMPT_TOKENS = 70
LONG_PROMPT_TOKENS = 256
OUTPUT_TOKENS = 48
STRUCTURED_ROUNDS = 4
# one stream on two servers at once, a request on each in turn: qwen-serve against llama.cpp at the same precision
# (the smoke run pairs qwen-serve with the seeds' design, to exercise the same code)
PAIRS = (("qwen-serve", "llama.cpp-bf16"), ("qwen-serve-int8", "llama.cpp-q8_0"), ("qwen-serve-int4", "llama.cpp-q4_k_m"))
SMOKE_PAIRS = (("qwen-serve", "seeds-design"),)
PAIRED_ROUNDS = 6
# the first pair again at a long context (an agent's tools and history): a new prompt of this many tokens each round
LONG_CONTEXT_TOKENS = 4000
LONG_CONTEXT_ROUNDS = 4
SMOKE_LONG_CONTEXT = 300
# on the same servers, a conversation's next turn: a new long first turn, a short reply, then a question more
CONVERSATION_ROUNDS = 3
CONVERSATION_REPLY_TOKENS = 16
# a record whose JSON runs well past OUTPUT_TOKENS, so that json_schema replies are cut at the same length as free
# text: objects, an array, a pattern, a format, an enum, numbers and free strings
RECORD_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1},
        "name": {"type": "string", "maxLength": 40},
        "email": {"type": "string", "format": "email"},
        "status": {"enum": ["active", "suspended", "closed"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 3, "maxItems": 8},
        "address": {"type": "object", "properties": {
            "street": {"type": "string"}, "city": {"type": "string"},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"], "additionalProperties": False},
        "balance": {"type": "number"},
        "notes": {"type": "string", "minLength": 200},
    },
    "required": ["id", "name", "email", "status", "tags", "address", "balance", "notes"],
    "additionalProperties": False,
}
# the smoke run's replies finish, so that each one is checked to parse
SMOKE_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                                 "n": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["ok", "n"], "additionalProperties": False}


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


MODELS = ("qwen2.5-0.5b", "qwen3.5-2b", "qwen3.5-0.8b")


def model_dir(smoke: bool, preset: str = MODELS[0]) -> Path:
    from qwen_inference.random_model import FORMAT_VERSION, make_random_model

    preset, dtype = ("tiny", "float32") if smoke else (preset, "bfloat16")
    out = CACHE / "bench-models" / f"{preset}-{dtype}-v{FORMAT_VERSION}"
    if not out.is_dir():
        log(f"making the random {preset} model in {out}")
        make_random_model(preset, out, dtype)
    return out


def words_for(tokens: int, model: Path) -> int:
    """How many prompt words give about `tokens` prompt tokens, chat template included."""
    from transformers import AutoTokenizer

    from qwen_inference.bench.load import prompt_text

    tok = AutoTokenizer.from_pretrained(str(model))

    def count(n: int) -> int:
        text = tok.apply_chat_template([{"role": "user", "content": prompt_text(n, 1)}], tokenize=False,
                                       add_generation_prompt=True)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    lo, hi = 1, tokens
    while lo < hi:
        mid = (lo + hi) // 2
        if count(mid) < tokens:
            lo = mid + 1
        else:
            hi = mid
    return lo


class Server:
    def __init__(self, label: str, cmd: list[str], port: int, health: str, env: dict | None = None,
                 ignore_eos: bool = True) -> None:
        self.label, self.cmd, self.port, self.health = label, cmd, port, health
        self.ignore_eos = ignore_eos  # False for servers that refuse the field
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log = CACHE / "bench-logs" / f"{label}.log"
        self.started = 0.0
        self.ready_seconds: float | None = None  # from the process's start to its first healthy answer

    @property
    def chat_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    def __enter__(self) -> "Server":
        self.start()
        return self.ready()

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def ready(self) -> "Server":
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}{self.health}", timeout=2).status_code == 200:
                    self.ready_seconds = time.monotonic() - self.started
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.label} did not become healthy")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def side_by_side(*servers: Server):
    """Servers up together: all started at once, then each waited for, so that their loading overlaps."""
    with contextlib.ExitStack() as stack:
        for server in servers:
            stack.callback(server.stop)
            server.start()
        for server in servers:
            server.ready()
        yield servers


async def structured(server: Server, words: int, smoke: bool) -> dict:
    """json_schema output against free text at 16 streams on one server: alternating runs of each (the order
    swapped every round, different prompts every run), medians over the rounds."""
    import statistics

    from qwen_inference.bench.load import run_level, summary_line

    url = server.chat_url
    schema = SMOKE_SCHEMA if smoke else RECORD_SCHEMA
    extra = {"response_format": {"type": "json_schema", "json_schema": {"name": "record", "schema": schema,
                                                                        "strict": True}}}
    concurrency, requests = (2, 2) if smoke else (16, 32)
    max_tokens = 64 if smoke else OUTPUT_TOKENS
    load_before = os.getloadavg()[0]
    # a warm-up: the grammar compiler is built and the schema compiled on first use, not counted
    await run_level(url, None, 1, 1, words, 4, seed=9 * 10**6, ignore_eos=True, extra=extra)
    def grammar_seconds() -> float:
        """The server's own count of the time its engine spent on grammar work (masks and grammar state)."""
        text = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=30).text
        return float(next(line.split()[1] for line in text.splitlines()
                          if line.startswith("qwen_structured_output_seconds_total ")))

    rounds = []
    for r in range(1 if smoke else STRUCTURED_ROUNDS):
        kinds = ["free", "json_schema"] if r % 2 == 0 else ["json_schema", "free"]
        got = {}
        for k, kind in enumerate(kinds):
            before = grammar_seconds()
            level = await run_level(url, None, concurrency, requests, words, max_tokens,
                                    seed=5 * 10**6 + 1000 * (2 * r + k), pid=server.proc.pid, ignore_eos=True,
                                    extra=extra if kind == "json_schema" else None, check_json=kind == "json_schema")
            got[kind] = asdict(level)
            got[kind]["grammar_seconds"] = grammar_seconds() - before
            log(f"{server.label} {kind}: {summary_line(level)}; grammar {got[kind]['grammar_seconds']:.2f}s")
        rounds.append(got)

    def med(kind: str, key: str) -> float:
        return statistics.median(r[kind][key] or 0.0 for r in rounds)

    def cpu_ms(level: dict) -> float:
        return 1000 * (level["server_cpu_seconds"] or 0.0) / max(1, level["generated_tokens"])

    free_tps, json_tps = med("free", "tokens_per_second"), med("json_schema", "tokens_per_second")
    free_tpot, json_tpot = med("free", "tpot_p50"), med("json_schema", "tpot_p50")
    free_cpu = statistics.median(cpu_ms(r["free"]) for r in rounds)
    json_cpu = statistics.median(cpu_ms(r["json_schema"]) for r in rounds)
    # each round's own ratio, measured minutes apart at most: steadier than the ratio of medians when the machine's
    # load moves between rounds
    ratios = [r["json_schema"]["tokens_per_second"] / r["free"]["tokens_per_second"] for r in rounds
              if r["free"]["tokens_per_second"]]
    # the share of each json_schema run the engine spent on grammar work, measured in the same interval as the
    # run itself: the throughput the grammar costs, whatever else slows the machine down
    shares = [r["json_schema"]["grammar_seconds"] / r["json_schema"]["wall_seconds"] for r in rounds]
    per_token = [1000 * r["json_schema"]["grammar_seconds"] / max(1, r["json_schema"]["generated_tokens"])
                 for r in rounds]
    out = {"concurrency": concurrency, "requests": requests, "max_tokens": max_tokens, "schema": schema,
           "rounds": rounds, "free_tokens_per_second": free_tps, "json_tokens_per_second": json_tps,
           "throughput_overhead": 1 - statistics.median(ratios) if ratios else None,
           "free_tpot_p50": free_tpot, "json_tpot_p50": json_tpot,
           "tpot_overhead": json_tpot / free_tpot - 1 if free_tpot else None,
           "free_cpu_ms_per_token": free_cpu, "json_cpu_ms_per_token": json_cpu,
           "cpu_overhead": json_cpu / free_cpu - 1 if free_cpu else None,
           "grammar_share": statistics.median(shares), "grammar_ms_per_token": statistics.median(per_token),
           "grammar_seconds_free_runs": sum(r["free"]["grammar_seconds"] for r in rounds),
           "loadavg_before": load_before, "loadavg_after": os.getloadavg()[0]}
    log(f"{server.label}: json_schema at {concurrency} streams: {json_tps:.1f} tok/s against {free_tps:.1f} free "
        f"(median of the rounds' ratios: {100 * (out['throughput_overhead'] or 0):.1f}% less); server CPU "
        f"{json_cpu:.0f} against {free_cpu:.0f} ms per token; grammar work {100 * out['grammar_share']:.1f}% of the "
        f"json_schema runs ({out['grammar_ms_per_token']:.2f} ms per token)")
    return out


async def paired(a: Server, b: Server, words: int, smoke: bool, rounds: int = PAIRED_ROUNDS,
                 context: int | None = None) -> dict:
    """One stream on two servers running side by side, one request on each in turn with the same prompt (the order
    swapped every round), so that both see the machine as it is at that minute: on shared machines whose memory
    bandwidth moves by a third within an hour, the ratio of each round's time per output token is steadier than
    the ratio of two runs made minutes apart. `speed` is b's time per token over a's: above 1, a is faster.
    With `context`, each round's prompt is a new one of that many tokens (no prefix either server has cached), and
    the time to its first token is compared too."""
    import statistics

    from qwen_inference.bench.load import run_level

    max_tokens = 8 if smoke else OUTPUT_TOKENS
    for s in (a, b):  # warm-up, not counted
        await run_level(s.chat_url, None, 1, 1, 8, 4, seed=10**6, ignore_eos=s.ignore_eos)
    out = []
    for r in range(2 if smoke else rounds):
        got = {}
        for s in ((a, b) if r % 2 == 0 else (b, a)):
            seed = (7 if context else 3) * 10**6 + 100 * r
            level = await run_level(s.chat_url, None, 1, 1, words, max_tokens, seed=seed, ignore_eos=s.ignore_eos)
            if level.errors or level.tpot_p50 is None:
                raise RuntimeError(f"{s.label}: the paired request failed: {level.error_samples}")
            got[s.label] = level
        out.append(got)
        log(f"paired {a.label} / {b.label}{f' at {context} tokens' if context else ''}, round {r + 1}: "
            f"{1000 * got[a.label].tpot_p50:.1f} / {1000 * got[b.label].tpot_p50:.1f} ms per token, first token "
            f"{got[a.label].ttft_p50:.2f} / {got[b.label].ttft_p50:.2f} s")
    tpot = [{k: v.tpot_p50 for k, v in r.items()} for r in out]
    speeds = [t[b.label] / t[a.label] for t in tpot]
    result = {"a": a.label, "b": b.label, "rounds": tpot, "max_tokens": max_tokens,
              "tpot_a_median": statistics.median(t[a.label] for t in tpot),
              "tpot_b_median": statistics.median(t[b.label] for t in tpot),
              "speed_median": statistics.median(speeds), "speed_min": min(speeds), "speed_max": max(speeds)}
    if context:
        ttft = [{k: v.ttft_p50 for k, v in r.items()} for r in out]
        result.update(context=context, ttft_rounds=ttft,
                      ttft_a_median=statistics.median(t[a.label] for t in ttft),
                      ttft_b_median=statistics.median(t[b.label] for t in ttft),
                      prefill_speed_median=statistics.median(t[b.label] / t[a.label] for t in ttft))
    return result


async def conversation(a: Server, b: Server, words: int, smoke: bool, context: int,
                       rounds: int = CONVERSATION_ROUNDS) -> dict:
    """The next turn of a conversation, on two servers side by side (the order swapped every round): turn 1 is a
    new prompt of about `context` tokens (a text and a question) answered in a few tokens; turn 2 is that history,
    the reply and a new question. Each server keeps what its cache keeps (qwen-serve: prefix caching, with state
    checkpoints for Qwen3.5; llama-server: its slot's prompt cache), so turn 2's first token shows how much of
    the history each computes again. A server that fails ends the rounds (the failure is recorded: the rest of the
    run's results are kept)."""
    import statistics

    from qwen_inference.bench.load import one_request, prompt_text

    out, failed = [], None
    async with httpx.AsyncClient(timeout=600) as client:
        for r in range(1 if smoke else rounds):
            got = {}
            for s in ((a, b) if r % 2 == 0 else (b, a)):
                history = [{"role": "system", "content": prompt_text(words, 9 * 10**6 + 100 * r)},
                           {"role": "user", "content": "Say in one sentence what the text above is about."}]
                first = await one_request(client, s.chat_url, None, "", CONVERSATION_REPLY_TOKENS, None,
                                          s.ignore_eos, extra={"messages": history})
                history += [{"role": "assistant", "content": first.text or ""},
                            {"role": "user", "content": "Which of its words comes first?"}]
                second = await one_request(client, s.chat_url, None, "", 4, None, s.ignore_eos,
                                           extra={"messages": history})
                if not (first.ok and second.ok) or first.ttft is None or second.ttft is None:
                    failed = f"{s.label} failed in round {r + 1}: {first.error or second.error or 'no token'}"
                    break
                got[s.label] = {"first_turn": first.ttft, "next_turn": second.ttft}
            if failed:
                log(f"conversation: {failed}")
                break
            out.append(got)
            log(f"conversation at {context} tokens, round {r + 1}: next turn's first token "
                f"{got[a.label]['next_turn']:.2f} / {got[b.label]['next_turn']:.2f} s (first turn "
                f"{got[a.label]['first_turn']:.2f} / {got[b.label]['first_turn']:.2f} s), {a.label} / {b.label}")

    def med(label: str, turn: str) -> float | None:
        return statistics.median(r[label][turn] for r in out) if out else None

    return {"a": a.label, "b": b.label, "context": context, "rounds": out, "failed": failed,
            "first_turn_a_median": med(a.label, "first_turn"), "first_turn_b_median": med(b.label, "first_turn"),
            "next_turn_a_median": med(a.label, "next_turn"), "next_turn_b_median": med(b.label, "next_turn")}


def conversation_table(c: dict) -> str:
    rows = ["", f"A conversation's next turn at {c['context']} tokens of history (first token, median of "
                f"{len(c['rounds'])} rounds):", ""]
    if c["rounds"]:
        rows += ["| server | first turn | next turn |", "|---|---|---|",
                 f"| {c['a']} | {c['first_turn_a_median']:.2f} s | {c['next_turn_a_median']:.2f} s |",
                 f"| {c['b']} | {c['first_turn_b_median']:.2f} s | {c['next_turn_b_median']:.2f} s |"]
    if c["failed"]:
        rows += ["", f"Not finished: {c['failed']}"]
    return "\n".join(rows + [""])


def paired_table(pairs: list[dict]) -> str:
    def cells(p: dict) -> str:
        return (f"| {p['a']} | {p['b']} | {len(p['rounds'])} | {1000 * p['tpot_a_median']:.1f} ms | "
                f"{1000 * p['tpot_b_median']:.1f} ms | {p['speed_median']:.2f}× ({p['speed_min']:.2f}–"
                f"{p['speed_max']:.2f}) |")

    rows = []
    short = [p for p in pairs if not p.get("context")]
    if short:
        rows += ["", "One stream, paired (both servers up, one request on each in turn):", "",
                 "| server | against | rounds | time per token | theirs | speed, median (min–max) |",
                 "|---|---|---|---|---|---|", *map(cells, short)]
    for p in pairs:
        if p.get("context"):
            rows += ["", f"One stream at {p['context']} tokens of context, paired (a new prompt each round):", "",
                     "| server | against | rounds | time per token | theirs | speed, median (min–max) | "
                     "first token | theirs |", "|---|---|---|---|---|---|---|---|",
                     cells(p) + f" {p['ttft_a_median']:.2f} s | {p['ttft_b_median']:.2f} s |"]
    return "\n".join(rows) + "\n"


async def measure(server: Server, levels: list[int], words: int, long_words: int, smoke: bool,
                  scenario: str = "on") -> dict:
    from qwen_inference.bench.load import run_level, summary_line

    url = server.chat_url
    pid = server.proc.pid
    # a warm-up request, not counted
    eos = server.ignore_eos
    await run_level(url, None, 1, 1, words, 4, seed=10**6, pid=None, ignore_eos=eos)
    out = {"label": server.label, "levels": [], "ready_seconds": server.ready_seconds}
    if server.label == "qwen-serve" and scenario != "off":
        out["structured"] = await structured(server, words, smoke)
        if scenario == "only":
            return out
    for i, c in enumerate(levels):
        n = 2 if smoke else (3 if c == 1 else c)
        level = await run_level(url, None, c, n, words, OUTPUT_TOKENS if not smoke else 8, seed=1000 * (i + 1),
                                pid=pid, ignore_eos=eos)
        log(f"{server.label}: {summary_line(level)}")
        out["levels"].append(asdict(level))
    long = await run_level(url, None, 1, 1 if smoke else 3, long_words, 4, seed=777000, pid=pid, ignore_eos=eos)
    ttft = "not measured (no token streamed)" if long.ttft_p50 is None else f"{long.ttft_p50:.2f}s"
    log(f"{server.label}: {LONG_PROMPT_TOKENS}-token prompt alone: ttft p50 {ttft}")
    out["ttft_long_prompt_p50"] = long.ttft_p50
    out["peak_rss_bytes"] = max([lv["peak_rss_bytes"] or 0 for lv in out["levels"]] + [long.peak_rss_bytes or 0])
    return out


def cpu_info() -> dict:
    """The CPU this run measured: model name, the flags that choose kernels, cores and the load around it."""
    from qwen_inference.sysinfo import cpu_flags

    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if not line.strip():
                break  # the first CPU's block is enough
    except OSError:
        pass
    name = fields.get("model name", "unknown")
    if "cpu family" in fields and "model" in fields:  # a VM may hide the marketing name ("AMD EPYC"): say which
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_int8", "amx_tile")
    info = {"model": name, "flags": [f for f in wanted if f in cpu_flags()], "cpus": os.cpu_count(),
            "loadavg": os.getloadavg()[0]}
    cap = os.environ.get(MAX_CPU_ISA_ENV)
    if cap:
        info["max_cpu_isa"] = cap  # the flags above are what the engine, oneDNN and llama.cpp were held to
    return info


def servers(model: Path, smoke: bool, skip_llamacpp: bool, only: list[str] | None = None,
            context: int = 0) -> list[Server]:
    """The servers to measure (with `only`, just those labels: llama.cpp is then built and converted only if
    asked for). With `context`, each holds one sequence of that many tokens and a reply (llama.cpp one slot)."""
    if only and not any(label.startswith("llama.cpp") for label in only):
        skip_llamacpp = True
    py = sys.executable
    bin_dir = Path(py).parent
    dtype = "float32" if smoke else "auto"
    p = free_port()
    window = context + 2 * OUTPUT_TOKENS
    longer = ["--max-model-len", str(window)] if context else []
    out = [Server("qwen-serve", [str(bin_dir / "qwen-serve"), "--model", str(model), "--port", str(p),
                                 "--dtype", dtype, "--max-concurrency", "16", "--log-level", "warning", *longer], p,
                  "/health")]
    if not smoke:
        for q in ("int8", "int4"):
            p = free_port()
            out.append(Server(f"qwen-serve-{q}", [str(bin_dir / "qwen-serve"), "--model", str(model), "--port",
                                                  str(p), "--dtype", dtype, "--quantize", q, "--max-concurrency",
                                                  "16", "--log-level", "warning", *longer], p, "/health"))
    if not smoke and "qwen3.5" not in model.name:
        # transformers' own continuous batching (paged cache), in bf16 as its maintainers run it on CPU; it refuses
        # `ignore_eos`, so a request may end early: throughput counts the tokens its usage reports
        p = free_port()
        out.append(Server("transformers-cb", [str(bin_dir / "transformers"), "serve", "--continuous-batching",
                                              "--dtype", "bfloat16", "--host", "127.0.0.1", "--port", str(p),
                                              str(model)], p, "/health", ignore_eos=False))
    p = free_port()
    out.append(Server("seeds-design", [py, "-m", "bench.baselines.seed_server", "--model", str(model), "--port", str(p)],
                      p, "/health", env={"PYTHONPATH": str(ROOT)}))
    if not smoke and not skip_llamacpp:
        from . import llamacpp

        cap = os.environ.get(MAX_CPU_ISA_ENV) or None
        bins = llamacpp.binaries(cap)
        for outtype in ("bf16", "q8_0", "q4_k_m"):
            gguf = llamacpp.quantize(model, "Q4_K_M", cap) if outtype == "q4_k_m" else llamacpp.convert(model, outtype)
            p = free_port()
            out.append(Server(f"llama.cpp-{outtype}", [str(bins / "llama-server"), "-m", str(gguf), "--port", str(p),
                                                      "--host", "127.0.0.1",
                                                      *(["-np", "1", "-c", str(window)] if context else
                                                        ["-np", "16", "-c", str(16 * 512)]),
                                                      "-t", "2", "--no-webui"], p, "/health"))
    return out


def table(runs: list[dict], baseline: str = "seeds-design") -> str:
    base = next((r for r in runs if r["label"] == baseline), None)

    def level(run, c):
        return next((lv for lv in run["levels"] if lv["concurrency"] == c), None)

    top = max(lv["concurrency"] for lv in runs[0]["levels"])
    many_head = f"{top} streams: tok/s | ×baseline | " if top > 1 else ""  # one level only: its columns once
    rows = [f"| server | 1 stream: tok/s | ×baseline | {many_head}TTFT p50 @{top} | "
            f"TTFT, {LONG_PROMPT_TOKENS}-token prompt alone | peak RSS | start to ready |",
            "|---" * (9 if top > 1 else 7) + "|"]
    for r in runs:
        one, many = level(r, 1), level(r, top)
        b1, bm = (level(base, 1), level(base, top)) if base else (None, None)
        ratio = lambda x, y: f"{x['tokens_per_second'] / y['tokens_per_second']:.1f}×" if x and y and y["tokens_per_second"] else "–"  # noqa: E731
        secs = lambda t: "–" if t is None else f"{t:.2f} s"  # noqa: E731  (no token streamed: not measured)
        many_cells = f"{many['tokens_per_second']:.1f} | {ratio(many, bm)} | " if top > 1 else ""
        rows.append(f"| {r['label']} | {one['tokens_per_second']:.1f} | {ratio(one, b1)} | {many_cells}"
                    f"{secs(many['ttft_p50'])} | {secs(r['ttft_long_prompt_p50'])} | "
                    f"{r['peak_rss_bytes'] / 2**30:.2f} GiB | {secs(r.get('ready_seconds'))} |")
    return "\n".join(rows)


def structured_table(run: dict) -> str:
    s = run["structured"]
    pct = lambda x: "–" if x is None else f"{100 * x:+.1f}%"  # noqa: E731
    rows = [f"\njson_schema output against free text on {run['label']}, {s['concurrency']} streams, {s['max_tokens']} "
            f"tokens out, {len(s['rounds'])} alternating rounds of {s['requests']} requests (medians; load average "
            f"{s['loadavg_before']:.1f} before, {s['loadavg_after']:.1f} after):\n",
            "| output | tok/s | time per token p50 | server CPU per token | tokens per reply | replies that finished "
            "as valid JSON |",
            "|---|---|---|---|---|---|"]
    for kind, label in (("free", "free text"), ("json_schema", "json_schema (strict)")):
        lv = [r[kind] for r in s["rounds"]]
        tokens = sum(x["generated_tokens"] for x in lv) / max(1, sum(x["requests"] - x["errors"] for x in lv))
        valid = ("–" if kind == "free" else
                 f"{sum(x['valid_json'] or 0 for x in lv)} of {sum(x['requests'] for x in lv)}")
        key = "free" if kind == "free" else "json"
        rows.append(f"| {label} | {s[f'{key}_tokens_per_second']:.1f} | {s[f'{key}_tpot_p50'] * 1000:.0f} ms | "
                    f"{s[f'{key}_cpu_ms_per_token']:.0f} ms | {tokens:.1f} | {valid} |")
    rows.append(f"\nThe engine's grammar work (qwen_structured_output_seconds_total: filling and applying the token "
                f"masks, advancing the grammars) took **{100 * s['grammar_share']:.1f}%** of the json_schema runs' "
                f"wall time ({s['grammar_ms_per_token']:.2f} ms per generated token; medians over the rounds): the "
                f"throughput it costs. Compared run against run on this machine: throughput "
                f"{pct(-s['throughput_overhead'] if s['throughput_overhead'] is not None else None)}, time per token "
                f"{pct(s['tpot_overhead'])}, server CPU per token {pct(s['cpu_overhead'])}.\n")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="make bench")
    ap.add_argument("--smoke", action="store_true", help="the harness on the tiny model (CI)")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--levels", default=None, help="concurrency levels, e.g. 1,4,16")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--only", default=None, help="comma-separated server labels to run")
    ap.add_argument("--model", choices=MODELS, default=MODELS[0], help="the architecture to measure")
    ap.add_argument("--structured", choices=("on", "off", "only"), default="on",
                    help="json_schema against free text at 16 streams on qwen-serve (only: nothing else)")
    ap.add_argument("--paired", choices=("on", "off", "only"), default="on",
                    help="one stream on qwen-serve and llama.cpp side by side, alternating (only: nothing else)")
    ap.add_argument("--long-context", type=int, default=None, metavar="TOKENS",
                    help=f"with the paired rounds: qwen-serve (bf16) and llama.cpp bf16 paired again on prompts of "
                         f"this many tokens (default {LONG_CONTEXT_TOKENS}, {SMOKE_LONG_CONTEXT} in --smoke; 0: not)")
    ap.add_argument("--max-cpu-isa", choices=("avx512_vnni", "avx512", "avx2"), default=None,
                    help="measure as on a CPU with these instruction sets at most: qwen-serve and the transformers "
                         "baselines run with QWEN_MAX_CPU_ISA, ONEDNN_MAX_CPU_ISA and MKL_ENABLE_INSTRUCTIONS set, "
                         "llama.cpp is built for it "
                         "(avx512_vnni: Cascade Lake and Ice Lake; avx512: Skylake-SP; avx2: Zen 2 and 3)")
    a = ap.parse_args(argv)
    if a.max_cpu_isa:
        from qwen_inference.sysinfo import torch_isa_env

        os.environ[MAX_CPU_ISA_ENV] = a.max_cpu_isa  # before cpu_info reads the flags; every server inherits it
        os.environ.update(torch_isa_env(a.max_cpu_isa))
    levels = [int(x) for x in (a.levels or ("1,2" if a.smoke else "1,4,16")).split(",")]
    model = model_dir(a.smoke, a.model)
    cpu = cpu_info()
    log(f"CPU: {cpu['model']} ({cpu['cpus']} CPUs; {', '.join(cpu['flags'])}); load {cpu['loadavg']:.1f}")
    words = words_for(PROMPT_TOKENS, model)
    long_words = words_for(LONG_PROMPT_TOKENS, model)
    log(f"model {model}; {words} words ≈ {PROMPT_TOKENS} prompt tokens; {long_words} ≈ {LONG_PROMPT_TOKENS}")
    runs = []
    only = a.only.split(",") if a.only else None
    chosen = [s for s in servers(model, a.smoke, a.skip_llamacpp, only) if not only or s.label in only]
    for server in chosen if a.paired != "only" else []:
        log(f"starting {server.label}")
        with server:
            runs.append(asyncio.run(measure(server, levels, words, long_words, a.smoke, a.structured)))
    pairs, talk = [], None
    by_label = {s.label: s for s in chosen}
    for x, y in (SMOKE_PAIRS if a.smoke else PAIRS) if a.paired != "off" else ():
        if x in by_label and y in by_label:
            log(f"starting {x} and {y} side by side")
            with side_by_side(by_label[x], by_label[y]):
                pairs.append(asyncio.run(paired(by_label[x], by_label[y], words, a.smoke)))
    context = a.long_context if a.long_context is not None else (SMOKE_LONG_CONTEXT if a.smoke else LONG_CONTEXT_TOKENS)
    x, y = (SMOKE_PAIRS if a.smoke else PAIRS)[0]
    if context and a.paired != "off" and x in by_label and y in by_label:
        a_long, b_long = [s for s in servers(model, a.smoke, a.skip_llamacpp, [x, y], context=context)
                          if s.label in (x, y)]
        log(f"starting {x} and {y} side by side for {context}-token prompts")
        with side_by_side(a_long, b_long):
            pairs.append(asyncio.run(paired(a_long, b_long, words_for(context, model), a.smoke, LONG_CONTEXT_ROUNDS,
                                            context)))
            # the next turn (the history, a reply and a question) must fit the servers' window too
            talk = asyncio.run(conversation(a_long, b_long, words_for(context - 64, model), a.smoke, context))
    a.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = "smoke" if a.smoke else f"{dt.date.today().isoformat()}-{a.model}" + (
        "-structured" if a.structured == "only" else "")
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "model": model.name,
            "prompt_tokens": PROMPT_TOKENS, "output_tokens": OUTPUT_TOKENS, "levels": levels,
            "cpus": os.cpu_count(), "cpu": cpu, "loadavg_after": os.getloadavg()[0],
            "command": "python -m bench.run " + " ".join(argv or sys.argv[1:])}
    if a.paired == "only":
        stamp += "-paired"
    if a.max_cpu_isa and not a.smoke:
        stamp += f"-{a.max_cpu_isa}"
    (a.out_dir / f"{stamp}.json").write_text(json.dumps({"meta": meta, "runs": runs, "paired": pairs,
                                                        "conversation": talk}, indent=2))
    from qwen_inference.bench.cli import chart

    measured = [r for r in runs if r["levels"]]
    if measured:
        chart(measured, a.out_dir / f"{stamp}.png", title=f"{model.name}, {PROMPT_TOKENS}-token prompts, "
                                                          f"{OUTPUT_TOKENS} tokens out")
    held = f", held to {a.max_cpu_isa} (QWEN_MAX_CPU_ISA, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS, llama.cpp " \
        "built for it)" \
        if a.max_cpu_isa else ""
    md = (f"Run {meta['date']} on {cpu['model']} ({cpu['cpus']} CPUs; {', '.join(cpu['flags'])}{held}), model "
          f"{model.name}: "
          f"`{meta['command']}`\n\n" + (table(measured) + "\n" if measured else "")
          + "".join(structured_table(r) for r in runs if "structured" in r) + (paired_table(pairs) if pairs else "")
          + (conversation_table(talk) if talk else ""))
    (a.out_dir / f"{stamp}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Load without loss: many requests, more than the server takes at once, a fifth of them cancelled mid-stream.
Every request is answered or cleanly refused with 429 and Retry-After; nothing leaks (slots, KV blocks,
gauges, memory); the metrics count exactly the requests sent. `make soak` runs the long version
(QWEN_SOAK=long)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re

import httpx
import psutil

from ..conftest import running_server

LONG = os.environ.get("QWEN_SOAK") == "long"
REQUESTS = 5000 if LONG else 500
CONCURRENCY = 32
RETRIES = 3


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def test_soak(tiny_model):
    with running_server(tiny_model, max_concurrency=8, max_queue=16, max_tokens_cap=64) as s:
        engine = s.state.model.engine
        rng = random.Random(7)
        outcome: dict[str, int] = {"ok": 0, "refused": 0, "cancelled": 0, "other": 0}
        refusals = [0]  # every 429 answered, retried or not
        bad: list[str] = []
        proc = psutil.Process()
        sem = asyncio.Semaphore(CONCURRENCY)

        async def one(i: int, c: httpx.AsyncClient) -> None:
            cancel = rng.random() < 0.2
            body = {"messages": [{"role": "user", "content": f"request {i} " + "word " * rng.randint(1, 40)}],
                    "max_tokens": rng.randint(4, 48), "temperature": rng.choice([0, 0.7]), "stream": True}
            async with sem:
                for attempt in range(RETRIES + 1):  # a client that honours Retry-After, as OpenAI's SDK does
                    r = await c.send(c.build_request("POST", "/v1/chat/completions", json=body), stream=True)
                    if r.status_code != 429:
                        break
                    await r.aclose()
                    refusals[0] += 1
                    if attempt == RETRIES:
                        outcome["refused"] += 1
                        return
                    await asyncio.sleep(float(r.headers["retry-after"]))
                try:
                    if r.status_code != 200:
                        outcome["other"] += 1
                        bad.append(f"{r.status_code} {(await r.aread())[:200]!r}")
                        return
                    chunks, done = 0, False
                    async for line in r.aiter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: {"):
                            if "error" in json.loads(line[6:]):
                                bad.append(line)
                            chunks += 1
                            if cancel and chunks >= 2:
                                outcome["cancelled"] += 1
                                return  # closing the stream mid-reply
                    if done:
                        outcome["ok"] += 1
                    else:
                        bad.append("stream ended without [DONE]")
                finally:
                    await r.aclose()

        async with httpx.AsyncClient(base_url=s.url, timeout=120,
                                     limits=httpx.Limits(max_connections=CONCURRENCY + 8)) as c:
            await one(-1, c)  # warm up before measuring memory
            rss_before = proc.memory_info().rss
            outcome["ok"] = 0
            await asyncio.gather(*(one(i, c) for i in range(REQUESTS)))
        assert not bad, bad[:5]
        assert sum(outcome.values()) == REQUESTS
        assert refusals[0] > 0, "the load never exceeded the queue: overload was not exercised"
        assert outcome["ok"] > REQUESTS / 2 and outcome["cancelled"] > 0

        # nothing leaks
        for _ in range(100):
            if engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0:
                break
            await asyncio.sleep(0.05)
        assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0
        assert engine.allocator.used_blocks == 0 and engine.allocator.reserved == 0
        growth = proc.memory_info().rss - rss_before
        assert growth < 150 * 2**20, f"resident memory grew by {growth / 2**20:.0f} MiB"
        text = httpx.get(s.url + "/metrics").text
        assert metric(text, "qwen_requests_running") == 0 and metric(text, "qwen_requests_waiting") == 0
        assert metric(text, "active_connections") == 1  # this scrape
        # the metrics add up: every request sent is counted once, by its status
        route = '{endpoint="/v1/chat/completions",method="POST",status_code="%s"}'
        counted_200 = metric(text, "http_requests_total", route % 200)
        counted_429 = metric(text, "http_requests_total", route % 429)
        assert counted_429 == refusals[0]
        assert counted_200 == outcome["ok"] + outcome["cancelled"] + 1  # + the warm-up
        assert metric(text, "qwen_request_errors_total", '{reason="queue_full"}') == refusals[0]
        assert metric(text, "qwen_request_errors_total", '{reason="cancelled"}') == outcome["cancelled"]
        successes = sum(metric(text, "qwen_request_success_total", f'{{finish_reason="{r}"}}') for r in ("stop", "length"))
        assert successes == outcome["ok"] + 1
        report = {"requests": REQUESTS, "concurrency": CONCURRENCY, **outcome, "429s": refusals[0], "leaked_slots": 0,
                  "rss_growth_mib": round(growth / 2**20, 1)}
        print("soak:", json.dumps(report))

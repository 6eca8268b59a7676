"""Many streams at once: independent, correct outputs; queue limits; disconnects free their slots."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from ..conftest import running_server

PROMPTS = [f"Request {i}: " + "tell me about topic %d " % i * (1 + i % 5) for i in range(16)]


async def stream_text(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> tuple[str, str]:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    text, finish = [], None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choice = chunk["choices"][0]
            text.append(choice["delta"].get("content") or "")
            finish = choice["finish_reason"] or finish
    return "".join(text), finish


async def test_16_concurrent_streams_equal_their_solo_runs(server):
    async with httpx.AsyncClient(base_url=server.url, timeout=300) as c:
        alone = [await stream_text(c, p, 20) for p in PROMPTS]
        together = await asyncio.gather(*(stream_text(c, p, 20) for p in PROMPTS))
    assert together == alone
    assert len(set(t for t, _ in alone)) > 1  # different prompts, different replies
    assert all(f == "length" for _, f in together)


async def test_batch_really_runs_together(server):
    """While 8 streams run, the engine reports them running at once (continuous batching)."""
    engine = server.state.model.engine
    peak = 0

    async def watch():
        nonlocal peak
        while True:
            peak = max(peak, engine.stats()["running"])
            await asyncio.sleep(0.005)

    async with httpx.AsyncClient(base_url=server.url, timeout=300) as c:
        w = asyncio.ensure_future(watch())
        await asyncio.gather(*(stream_text(c, p, 30) for p in PROMPTS[:8]))
        w.cancel()
    assert peak >= 4


def long_request(route: str, text: str, **extra) -> dict:
    """A body asking for 1500 tokens (the random model goes on to the end) on the chat, Responses or Messages
    route."""
    if route == "/v1/responses":
        return {"input": text, "max_output_tokens": 1500, "temperature": 0, "store": False, **extra}
    if route == "/v1/messages":
        return {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 1500,
                "temperature": 0, **extra}
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 1500, "temperature": 0, **extra}


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/responses", "/v1/messages"])
async def test_disconnect_mid_stream_frees_the_slot(server, route):
    engine = server.state.model.engine
    body = long_request(route, "go on forever", stream=True)
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
        async with c.stream("POST", route, json=body) as r:
            got = 0
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    got += 1
                if got >= 3:
                    break
            assert engine.stats()["running"] == 1
        # the response is closed: the slot must be freed without waiting for 1500 tokens
        deadline = time.monotonic() + 10
        while engine.stats()["running"] and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert engine.stats()["running"] == 0
        assert engine.allocator.used_blocks == 0 and engine.allocator.reserved == 0


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/responses", "/v1/messages"])
async def test_disconnect_while_waiting_non_streaming_frees_the_slot(server, route):
    engine = server.state.model.engine
    body = long_request(route, "long")
    async with httpx.AsyncClient(base_url=server.url, timeout=0.5) as c:
        with pytest.raises(httpx.ReadTimeout):
            await c.post(route, json=body)
    deadline = time.monotonic() + 10
    while engine.stats()["running"] and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert engine.stats()["running"] == 0
    assert engine.allocator.used_blocks == 0


async def test_queue_full_gets_429_with_retry_after(tiny_model):
    with running_server(tiny_model, max_concurrency=1, max_queue=1) as s:
        body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 300, "temperature": 0}
        async with httpx.AsyncClient(base_url=s.url, timeout=120) as c:
            results = await asyncio.gather(*(c.post("/v1/chat/completions", json=body) for _ in range(5)))
        codes = sorted(r.status_code for r in results)
        assert codes.count(200) >= 2 and codes.count(429) >= 1, codes
        refused = next(r for r in results if r.status_code == 429)
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert refused.json()["error"]["code"] == "queue_full"
        metrics = httpx.get(s.url + "/metrics").text
        assert f'qwen_request_errors_total{{reason="queue_full"}} {codes.count(429)}.0' in metrics


async def test_request_timeout_ends_the_request(tiny_model):
    with running_server(tiny_model, request_timeout=0.5) as s:
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
            r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                           "max_tokens": 2000, "temperature": 0})
            assert r.status_code == 504
            assert r.json()["error"]["code"] == "timeout"
            r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                           "max_tokens": 2000, "stream": True})
            last = [line for line in r.text.split("\n\n") if line][-2]
            assert json.loads(last[6:])["error"]["code"] == "timeout"
        assert s.state.model.engine.stats()["running"] == 0


async def test_kv_cache_full_makes_requests_wait_not_fail(tiny_model):
    # room for one long request at a time: the second waits for the first, then runs
    with running_server(tiny_model, kv_cache_tokens=400, max_concurrency=4) as s:
        body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 250, "temperature": 0}
        async with httpx.AsyncClient(base_url=s.url, timeout=120) as c:
            peak = 0
            engine = s.state.model.engine

            async def watch():
                nonlocal peak
                while True:
                    peak = max(peak, engine.stats()["running"])
                    await asyncio.sleep(0.005)

            w = asyncio.ensure_future(watch())
            results = await asyncio.gather(*(c.post("/v1/chat/completions", json=body) for _ in range(3)))
            w.cancel()
        assert [r.status_code for r in results] == [200, 200, 200]
        assert all(r.json()["usage"]["completion_tokens"] == 250 for r in results)
        assert peak == 1
        # a request that can never fit is refused at once
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
            r = await c.post("/v1/chat/completions", json={**body, "max_tokens": 500})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


async def test_int8_streams_in_a_batch_equal_their_solo_runs(tiny_model):
    """int8 activations are quantized per token, so a sequence's output does not depend on its batch."""
    with running_server(tiny_model, quantize="int8") as s:
        async with httpx.AsyncClient(base_url=s.url, timeout=300) as c:
            alone = [await stream_text(c, p, 16) for p in PROMPTS[:8]]
            together = await asyncio.gather(*(stream_text(c, p, 16) for p in PROMPTS[:8]))
        assert together == alone
        assert "+int8" in httpx.get(s.url + "/metrics").text

"""The model-server protocol of the Gateway API Inference Extension: /metrics serves vLLM's queue, batch and
KV-cache gauges (what its endpoint picker and KEDA read), and they follow the engine like the qwen_* ones."""

from __future__ import annotations

import asyncio
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ..conftest import running_server

PROTOCOL = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")


def scrape(url: str) -> dict[str, list]:
    text = httpx.get(url + "/metrics", timeout=10).text
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        out[family.name] = (family.type, family.samples)
    return out


def value(families: dict, name: str) -> float:
    _type, samples = families[name]
    assert len(samples) == 1, samples
    return samples[0].value


async def test_vllm_gauges_follow_the_queue_and_the_batch(tiny_model):
    # one slot: the first request runs, the others wait for it
    with running_server(tiny_model, max_concurrency=1, max_queue=8, kv_cache_tokens=4096) as s:
        idle = scrape(s.url)
        for name in PROTOCOL:
            kind, samples = idle[name]
            assert kind == "gauge" and samples[0].labels == {"model_name": "tiny"}, (name, samples)
            assert samples[0].value == 0
        engine = s.state.model.engine
        kind, samples = idle["vllm:cache_config_info"]
        assert kind == "gauge" and len(samples) == 1 and samples[0].value == 1
        assert samples[0].labels == {"block_size": "16", "num_gpu_blocks": str(engine.kv_capacity_tokens // 16),
                                     "enable_prefix_caching": "True"}

        body = {"messages": [{"role": "user", "content": "count"}], "max_tokens": 2000, "ignore_eos": True,
                "stream": True, "temperature": 0}
        async def stream(client: httpx.AsyncClient) -> None:
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200, await r.aread()
                async for _ in r.aiter_lines():
                    pass

        async with httpx.AsyncClient(base_url=s.url, timeout=60) as client:
            tasks = [asyncio.create_task(stream(client)) for _ in range(3)]
            try:
                seen = None
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and seen is None:
                    m = await asyncio.to_thread(scrape, s.url)
                    if value(m, "vllm:num_requests_running") == 1 and value(m, "vllm:num_requests_waiting") == 2:
                        seen = m
                    await asyncio.sleep(0.02)
                assert seen is not None, "never saw one request running and two waiting"
                # the same numbers as qwen_*, from the same engine step
                assert value(seen, "qwen_requests_running") == 1 and value(seen, "qwen_requests_waiting") == 2
                usage = value(seen, "vllm:kv_cache_usage_perc")
                assert 0 < usage <= 1 and usage == value(seen, "qwen_kv_cache_usage_ratio")
                assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        # the clients went away: their requests leave at the next step and the gauges come back to zero
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = scrape(s.url)
            if all(value(m, name) == 0 for name in PROTOCOL):
                break
            time.sleep(0.1)
        else:
            raise AssertionError({name: value(m, name) for name in PROTOCOL})

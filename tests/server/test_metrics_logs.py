"""Metrics move as requests succeed and fail; one JSON log line per request, with prompts and replies only
under --log-prompts."""

from __future__ import annotations

import json
import logging
import re
import time

import httpx

from qwen_inference.logs import JsonFormatter

from ..conftest import running_server
from .scripted import client as openai_client


def sample(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_metrics_move_with_success_and_failure(client):
    before = client.get("/metrics").text
    ok = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                   "max_tokens": 5, "temperature": 0})
    assert ok.status_code == 200
    bad = client.post("/v1/chat/completions", json={"messages": []})
    assert bad.status_code == 400
    after = client.get("/metrics").text
    route = '{endpoint="/v1/chat/completions",method="POST",status_code="%s"}'
    assert sample(after, "http_requests_total", route % 200) == sample(before, "http_requests_total", route % 200) + 1
    assert sample(after, "http_requests_total", route % 400) == sample(before, "http_requests_total", route % 400) + 1
    assert sample(after, "qwen_generation_tokens_total") >= sample(before, "qwen_generation_tokens_total") + 5
    prompt = ok.json()["usage"]["prompt_tokens"]
    assert sample(after, "qwen_prompt_tokens_total") >= sample(before, "qwen_prompt_tokens_total") + prompt
    assert sample(after, "qwen_request_success_total", '{finish_reason="length"}') == \
        sample(before, "qwen_request_success_total", '{finish_reason="length"}') + 1
    assert sample(after, "qwen_request_errors_total", '{reason="validation"}') == \
        sample(before, "qwen_request_errors_total", '{reason="validation"}') + 1
    for hist in ("qwen_time_to_first_token_seconds", "qwen_time_per_output_token_seconds",
                 "qwen_e2e_request_latency_seconds", "qwen_request_queue_seconds",
                 "model_inference_duration_seconds"):
        assert sample(after, hist + "_count") == sample(before, hist + "_count") + 1, hist
    assert sample(after, "http_request_duration_seconds_count", '{endpoint="/v1/chat/completions",method="POST"}') >= 2
    for gauge in ("qwen_requests_running", "qwen_requests_waiting", "qwen_kv_cache_usage_ratio",
                  "active_connections", "process_resident_memory_bytes", "process_cpu_seconds_total"):
        assert re.search(rf"^{gauge} ", after, re.M), gauge
    assert sample(after, "qwen_model_loaded") == 1.0


def test_a_shared_system_prompt_is_found_in_the_prefix_cache(client):
    system = {"role": "system", "content": "You answer in one short sentence, in plain words. " * 3}
    before = client.get("/metrics").text
    usages, cached = [], []
    for question in ("What is a pod?", "What is a node?"):
        r = client.post("/v1/chat/completions", json={"messages": [system, {"role": "user", "content": question}],
                                                      "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200
        usages.append(r.json()["usage"]["prompt_tokens"])
        cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    after = client.get("/metrics").text
    hits = sample(after, "qwen_prefix_cache_hit_tokens_total") - sample(before, "qwen_prefix_cache_hit_tokens_total")
    assert hits >= 16 and hits % 16 == 0 and hits < usages[1]  # whole blocks of the second prompt's shared start
    assert sum(cached) == hits and cached[1] >= 16  # and the replies say so
    # prompt tokens count every prompt token, found in the cache or computed
    assert sample(after, "qwen_prompt_tokens_total") - sample(before, "qwen_prompt_tokens_total") == sum(usages)


def test_the_next_turn_of_a_conversation_reports_its_cached_tokens(srv):
    """Through the official client, on both families (Qwen3.5 through its state checkpoints): the second turn
    starts past the first turn's prompt, short of its generation prompt, and says so in
    `usage.prompt_tokens_details.cached_tokens`, counted in whole blocks; streamed usage says the same."""
    system = {"role": "system", "content": "You are the conversation test's assistant. Answer in one short "
                                           "sentence, in plain words, and never in a list. " * 4}
    messages = [system, {"role": "user", "content": "What is a pod?"}]
    api = openai_client(srv)
    first = api.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    p1 = first.usage.prompt_tokens
    assert p1 >= 80
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And a node?"}]
    second = api.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached % 16 == 0 and (p1 - 8) // 16 * 16 <= cached < second.usage.prompt_tokens
    stream = api.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    last = [chunk for chunk in stream][-1]
    assert last.usage.prompt_tokens_details.cached_tokens >= cached


def test_text_completions_report_cached_tokens_per_request(client):
    """/v1/completions with two prompts: the usage adds up the cached tokens of both, as it adds up their tokens."""
    text = "The cached-tokens test reads this sentence several times over, for a prompt of some length. " * 3
    body = {"prompt": [text + "First.", text + "Second."], "max_tokens": 2, "temperature": 0}
    first = client.post("/v1/completions", json=body).json()["usage"]
    again = client.post("/v1/completions", json=body).json()["usage"]
    assert first["prompt_tokens"] == again["prompt_tokens"]
    # the second prompt of the first request may already find the first's blocks; the repeat finds every full block
    # of both prompts but the one holding each last token
    each = first["prompt_tokens"] // 2
    assert first["prompt_tokens_details"]["cached_tokens"] <= again["prompt_tokens_details"]["cached_tokens"]
    assert again["prompt_tokens_details"]["cached_tokens"] >= 2 * ((each - 2) // 16 * 16)


def test_unknown_paths_share_one_label(client):
    client.get("/no/such/path/1")
    client.get("/no/such/path/2")
    text = client.get("/metrics").text
    assert "/no/such/path" not in text
    assert 'endpoint="other"' in text


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def wait_for(self, request_ids: set[str]) -> None:
        """A request's line is written once the server has sent its last byte, which the client may read first."""
        deadline = time.monotonic() + 30
        while not request_ids <= {getattr(r, "request_id", None) for r in self.records}:
            assert time.monotonic() < deadline, "no access-log line"
            time.sleep(0.01)


def test_one_json_log_line_per_request_without_prompt(client):
    secret = "my secret prompt text"
    access = logging.getLogger("qwen_inference.access")
    access.disabled = False  # a library's logging.config call elsewhere in the session may have disabled it
    collect = Collect()
    access.addHandler(collect)
    old_level = access.level
    access.setLevel(logging.INFO)
    try:
        body = {"messages": [{"role": "user", "content": f"{secret}: " + "every word counts here. " * 12}],
                "max_tokens": 3}
        r = client.post("/v1/chat/completions", headers={"X-Request-ID": "log-check-1"}, json=body)
        again = client.post("/v1/chat/completions", headers={"X-Request-ID": "log-check-2"}, json=body)
        collect.wait_for({"log-check-1", "log-check-2"})
    finally:
        access.removeHandler(collect)
        access.setLevel(old_level)
    assert r.status_code == 200
    records = [rec for rec in collect.records if getattr(rec, "request_id", None) == "log-check-1"]
    assert len(records) == 1
    line = JsonFormatter().format(records[0])
    assert "\n" not in line
    entry = json.loads(line)
    for key in ("timestamp", "request_id", "method", "path", "status", "input_tokens", "output_tokens",
                "queue_time_ms", "inference_time_ms", "total_time_ms"):
        assert key in entry, key
    assert entry["status"] == 200 and entry["output_tokens"] == 3
    assert entry["input_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert entry["cached_tokens"] == r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    [second] = [json.loads(JsonFormatter().format(rec)) for rec in collect.records
                if getattr(rec, "request_id", None) == "log-check-2"]
    cached = again.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert second["cached_tokens"] == cached >= 16  # the same prompt again: its full blocks found
    assert entry["path"] == "/v1/chat/completions"
    assert secret not in line
    assert not any(secret in JsonFormatter().format(rec) for rec in collect.records)


def access_lines(client: httpx.Client, requests: list[tuple[str, dict]]) -> tuple[list[httpx.Response], dict]:
    """Sends each (request id, body) and returns the responses and each request's access-log entry."""
    access = logging.getLogger("qwen_inference.access")
    access.disabled = False
    collect = Collect()
    access.addHandler(collect)
    old_level = access.level
    access.setLevel(logging.INFO)
    try:
        responses = [client.post("/v1/chat/completions", headers={"X-Request-ID": rid}, json=body)
                     for rid, body in requests]
        collect.wait_for({rid for rid, _ in requests})
    finally:
        access.removeHandler(collect)
        access.setLevel(old_level)
    return responses, {rec.request_id: json.loads(JsonFormatter().format(rec))
                       for rec in collect.records if getattr(rec, "request_id", None)}


def streamed_text(response: httpx.Response) -> str:
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    return "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]
                   if json.loads(e)["choices"])


def test_prompts_and_replies_are_logged_only_with_log_prompts(tiny_model, client):
    secret = "tell me about the blue heron"
    body = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": secret}],
            "max_tokens": 6, "ignore_eos": True}
    requests = [("plain", body), ("streamed", {**body, "stream": True})]
    with running_server(tiny_model, log_prompts=True) as s, httpx.Client(base_url=s.url, timeout=120) as logged:
        (whole, streamed), entries = access_lines(logged, [(f"on-{rid}", b) for rid, b in requests])
    assert whole.status_code == streamed.status_code == 200
    reply = whole.json()["choices"][0]["message"]["content"]
    assert reply and streamed_text(streamed)
    assert entries["on-plain"]["prompt"] == body["messages"] == entries["on-streamed"]["prompt"]
    assert entries["on-plain"]["reply"] == reply
    assert entries["on-streamed"]["reply"] == streamed_text(streamed)

    (whole, streamed), entries = access_lines(client, [(f"off-{rid}", b) for rid, b in requests])  # the default
    assert whole.status_code == streamed.status_code == 200
    for rid in ("off-plain", "off-streamed"):
        assert "prompt" not in entries[rid] and "reply" not in entries[rid]
        assert secret not in json.dumps(entries[rid]) and entries[rid]["output_tokens"] == 6

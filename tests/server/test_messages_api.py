"""Anthropic's Messages API (/v1/messages) through the official `anthropic` client: the same prompt and reply as
chat completions for the same conversation (system blocks, thinking, tool_use and tool_result blocks); content
blocks in the order the model writes them, whole and streamed (the client's own stream helper assembles the
events); thinking signed and checked when it comes back, its budget enforced; tools forced by a grammar; errors
in Anthropic's shape; every field of the client's request types honoured or refused by name."""

from __future__ import annotations

import base64
import json
import logging
import time

import anthropic
import httpx
import jsonschema
import pytest
from anthropic.types import (cache_control_ephemeral_param, message_count_tokens_params, message_create_params,
                             metadata_param, output_config_param, text_block_param, thinking_block_param,
                             thinking_config_adaptive_param, thinking_config_disabled_param,
                             thinking_config_enabled_param, tool_choice_any_param, tool_choice_auto_param,
                             tool_choice_none_param, tool_choice_tool_param, tool_param, tool_result_block_param,
                             tool_use_block_param)

from qwen_inference.serving_responses import encrypt_reasoning

from .scripted import Scripted, failing
from .test_request_fields import HONOURED, REFUSED, proven
from .test_soak import metric
from .test_tools_api import SCHEMAS, TOOLS, call_of

CLAUDE_TOOLS = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"],
                 **{k: t["function"][k] for k in ("description", "strict") if k in t["function"]}} for t in TOOLS]
QUESTION = "What is the weather in Paris?"


def claude(server, **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, **kw)


def post(server, path: str = "/v1/messages", **body) -> httpx.Response:
    body.setdefault("model", "tiny")
    body.setdefault("messages", [{"role": "user", "content": QUESTION}])
    if path == "/v1/messages":
        body.setdefault("max_tokens", 4)
    return httpx.post(server.url + path, json=body, timeout=120)


def chat(server, messages, **body) -> dict:
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": messages, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def split(content) -> tuple[str | None, str]:
    """(thinking, text) of a message's content blocks."""
    thinking = [b.thinking for b in content if b.type == "thinking"]
    return ("".join(thinking) if thinking else None), "".join(b.text for b in content if b.type == "text")


def events_of(raw: bytes) -> list[dict]:
    out = []
    for block in raw.decode().split("\n\n"):
        if block.strip():
            name, data = block.split("\n")
            ev = json.loads(data[len("data: "):])
            assert name == "event: " + ev["type"]
            out.append(ev)
    return out


def test_same_reply_as_chat_completions_whole_and_streamed(srv):
    c = claude(srv)
    kwargs = dict(model="tiny", max_tokens=12, extra_body={"temperature": 0}, system="Answer briefly.",
                  messages=[{"role": "user", "content": QUESTION}])
    r = c.messages.create(**kwargs)
    ref = chat(srv, [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}],
               max_tokens=12, temperature=0)
    msg = ref["choices"][0]["message"]
    assert r.id.startswith("msg_") and r.type == "message" and r.role == "assistant" and r.model == "tiny"
    assert split(r.content) == (msg.get("reasoning_content"), msg["content"] or "")
    assert r.stop_reason == "max_tokens" and r.stop_sequence is None
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == ref["usage"]["prompt_tokens"]
    assert r.usage.output_tokens == 12 and r.usage.cache_creation_input_tokens == 0
    with c.messages.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert split(final.content) == split(r.content) and final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 12
    assert events[0].type == "message_start" and events[-1].type == "message_stop"
    # a reply that ends by itself: end_turn; at a stop sequence: stop_sequence, naming it
    with Scripted(srv) as script:
        script.say("ends", "Hello. Bye.")
        done = c.messages.create(**kwargs | {"max_tokens": 30}, extra_headers={"X-Request-ID": "ends"})
        cut = c.messages.create(**kwargs | {"max_tokens": 30, "stop_sequences": ["zz", "Bye"]},
                                extra_headers={"X-Request-ID": "ends"})
    assert split(done.content)[1] == "Hello. Bye." and done.stop_reason == "end_turn"
    assert split(cut.content)[1] == "Hello. " and cut.stop_reason == "stop_sequence" and cut.stop_sequence == "Bye"


def test_sse_framing(server):
    events = events_of(post(server, stream=True, max_tokens=3, temperature=0).content)
    assert [e["type"] for e in events] == [
        "message_start", "ping", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    start = events[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["output_tokens"] == 0
    assert events[2] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert all(e["index"] == 0 and e["delta"]["type"] == "text_delta" for e in events[3:6])
    assert events[7]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert events[7]["usage"]["output_tokens"] == 3


def conversation(thinking_block: dict | None = None, *, is_error: bool = False) -> list[dict]:
    assistant = [{"type": "text", "text": "Checking."},
                 {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris", "days": 3}}]
    return [{"role": "user", "content": QUESTION},
            {"role": "assistant", "content": ([thinking_block] if thinking_block else []) + assistant},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "Sunny, 21 C",
                                          "is_error": is_error},
                                         {"type": "text", "text": "And tomorrow?"}]}]


def chat_conversation(reasoning: str | None = None, tool_text: str = "Sunny, 21 C") -> list[dict]:
    assistant = {"role": "assistant", "content": "Checking.", "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 3})}}]}
    if reasoning is not None:
        assistant["reasoning_content"] = reasoning
    return [{"role": "system", "content": "Be brief.\n\nUse the tools."}, {"role": "user", "content": QUESTION},
            assistant, {"role": "tool", "tool_call_id": "call_1", "content": tool_text},
            {"role": "user", "content": "And tomorrow?"}]


def test_conversation_renders_as_chat_messages(srv):
    """System blocks, an assistant turn of thinking, text and a tool call, and a user turn of a tool result and
    text make the very prompt the same conversation makes in chat completions, and the same greedy reply."""
    c = claude(srv)
    system = [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
              {"type": "text", "text": "Use the tools."}]
    thought = {"type": "thinking", "thinking": "Look it up.", "signature": encrypt_reasoning("Look it up.")}
    r = c.messages.create(model="tiny", max_tokens=8, extra_body={"temperature": 0}, system=system,
                          tools=CLAUDE_TOOLS, messages=conversation(thought))
    ref = chat(srv, chat_conversation("Look it up."), tools=TOOLS, max_tokens=8, temperature=0)
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == ref["usage"]["prompt_tokens"]
    msg = ref["choices"][0]["message"]
    assert split(r.content) == (msg.get("reasoning_content"), msg["content"] or "")
    count = c.messages.count_tokens(model="tiny", system=system, tools=CLAUDE_TOOLS, messages=conversation(thought))
    assert count.input_tokens == ref["usage"]["prompt_tokens"]
    # a tool result marked is_error says so; the thinking block left out on the way back, a different prompt
    # where the template keeps it
    failed = c.messages.count_tokens(model="tiny", system=system, tools=CLAUDE_TOOLS,
                                     messages=conversation(thought, is_error=True))
    ref_failed = chat(srv, chat_conversation("Look it up.", "Error: Sunny, 21 C"), tools=TOOLS, max_tokens=1)
    assert failed.input_tokens == ref_failed["usage"]["prompt_tokens"]
    plain = c.messages.count_tokens(model="tiny", system=system, tools=CLAUDE_TOOLS, messages=conversation())
    assert plain.input_tokens == chat(srv, chat_conversation(), tools=TOOLS, max_tokens=1)["usage"]["prompt_tokens"]


def test_a_prefilled_reply_goes_on(srv):
    """A last message from the assistant is the start of the reply: the prompt ends inside it, as chat
    completions' continue_final_message renders it, and only the continuation comes back."""
    c = claude(srv)
    msgs = [{"role": "user", "content": "Count to five."}, {"role": "assistant", "content": "One, two,"}]
    ref = httpx.post(srv.url + "/tokenize", json={"messages": msgs, "add_generation_prompt": False,
                                                  "continue_final_message": True}).json()["count"]
    assert c.messages.count_tokens(model="tiny", messages=msgs).input_tokens == ref
    with Scripted(srv) as script:
        script.say("go-on", " three.")
        r = c.messages.create(model="tiny", max_tokens=10, messages=msgs, extra_headers={"X-Request-ID": "go-on"})
    assert split(r.content) == (None, " three.") and r.stop_reason == "end_turn"
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == ref


def test_tool_use_whole_and_streamed(srv):
    c = claude(srv)
    kwargs = dict(model="tiny", max_tokens=120, tools=CLAUDE_TOOLS, messages=[{"role": "user", "content": QUESTION}])
    with Scripted(srv) as script:
        script.say("call", "Sure.\n" + ("\n" if "<function=" in call_of(srv) else "") + call_of(srv))
        whole = c.messages.create(**kwargs, extra_headers={"X-Request-ID": "call"})
        with c.messages.stream(**kwargs, extra_headers={"X-Request-ID": "call"}) as stream:
            events = list(stream)
            final = stream.get_final_message()
    text, call = whole.content
    assert text.type == "text" and text.text == "Sure." and whole.stop_reason == "tool_use"
    assert call.type == "tool_use" and call.name == "get_weather" and call.input == {"city": "Paris", "days": 3}
    assert [b.type for b in final.content] == ["text", "tool_use"] and final.stop_reason == "tool_use"
    assert final.content[1].input == call.input and final.content[1].name == "get_weather"
    partial = "".join(e.delta.partial_json for e in events
                      if e.type == "content_block_delta" and e.delta.type == "input_json_delta")
    assert json.loads(partial) == call.input
    # the tool's result goes back with the call: the next turn
    nxt = c.messages.create(model="tiny", max_tokens=4, tools=CLAUDE_TOOLS, messages=[
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in whole.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": [
            {"type": "text", "text": "Sunny"}]}]}])
    assert nxt.usage.input_tokens + nxt.usage.cache_read_input_tokens > whole.usage.input_tokens


@pytest.mark.parametrize("tool_choice", [{"type": "any"}, {"type": "tool", "name": "get_time"}])
def test_forced_tool_use_follows_the_schema(srv, tool_choice):
    r = claude(srv).messages.create(model="tiny", max_tokens=200, extra_body={"temperature": 1.0}, tools=CLAUDE_TOOLS,
                                    tool_choice={**tool_choice, "disable_parallel_tool_use": True},
                                    messages=[{"role": "user", "content": "Weather?"}])
    calls = [b for b in r.content if b.type == "tool_use"]
    assert len(calls) == 1 and r.stop_reason == "tool_use"
    if tool_choice["type"] == "tool":
        assert calls[0].name == "get_time"
    jsonschema.validate(calls[0].input, SCHEMAS[calls[0].name])
    none = claude(srv).messages.create(model="tiny", max_tokens=30, tools=CLAUDE_TOOLS, tool_choice={"type": "none"},
                                       messages=[{"role": "user", "content": "Weather?"}])
    assert all(b.type != "tool_use" for b in none.content)


def test_output_config_format_is_held_by_a_grammar(server):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
              "additionalProperties": False}
    r = claude(server).messages.create(model="tiny", max_tokens=60, extra_body={"temperature": 1.0},
                                       output_config={"format": {"type": "json_schema", "schema": schema}},
                                       messages=[{"role": "user", "content": "A city?"}])
    assert r.stop_reason == "end_turn"
    jsonschema.validate(json.loads(split(r.content)[1]), schema)


@pytest.mark.parametrize("which, reply", [
    ("qwen35_server", "Two and two.\n</think>\n\nIt is 4."),  # the template opened the block
    ("qwen3_server", "<think>\nTwo and two.\n</think>\n\nIt is 4."),  # the model opens it
])
def test_thinking_signed_shown_or_omitted_and_sent_back(request, which, reply):
    srv = request.getfixturevalue(which)
    c = claude(srv)
    kwargs = dict(model="tiny", max_tokens=50, messages=[{"role": "user", "content": "What is 2 + 2?"}])
    with Scripted(srv) as script:
        script.say("r", reply)
        whole = c.messages.create(**kwargs, thinking={"type": "enabled", "budget_tokens": 40},
                                  extra_headers={"X-Request-ID": "r"})
        with c.messages.stream(**kwargs, thinking={"type": "adaptive"}, extra_headers={"X-Request-ID": "r"}) as st:
            events = list(st)
            streamed = st.get_final_message()
        omitted = c.messages.create(**kwargs, thinking={"type": "enabled", "budget_tokens": 40, "display": "omitted"},
                                    extra_headers={"X-Request-ID": "r"})
    thinking, text = whole.content
    assert thinking.type == "thinking" and thinking.thinking == "Two and two." and text.text == "It is 4."
    assert base64.b64decode(thinking.signature).decode().endswith("Two and two.")
    assert [b.model_dump() for b in streamed.content] == [b.model_dump() for b in whole.content]
    assert any(e.type == "content_block_delta" and e.delta.type == "signature_delta" for e in events)
    assert omitted.content[0].thinking == "" and omitted.content[0].signature == thinking.signature
    assert omitted.content[1].text == "It is 4."
    # sent back, shown or omitted, the thinking makes the prompt chat completions makes with it
    turn = [{"role": "user", "content": "What is 2 + 2?"}, None, {"role": "user", "content": "And 3 + 3?"}]

    def count(blocks) -> int:
        msgs = turn[:1] + [{"role": "assistant", "content": blocks}] + turn[2:]
        return c.messages.count_tokens(model="tiny", messages=msgs, thinking={"type": "adaptive"}).input_tokens

    sent = count([b.model_dump() for b in whole.content])
    assert sent == count([b.model_dump() for b in omitted.content])
    ref = chat(srv, turn[:1] + [{"role": "assistant", "content": "It is 4.", "reasoning_content": "Two and two."}]
               + turn[2:], max_tokens=1, chat_template_kwargs={"enable_thinking": True})
    assert sent == ref["usage"]["prompt_tokens"]
    # a signature this server did not write, or a thinking text that is not the signed one: refused
    for block, field in (({**thinking.model_dump(), "signature": "bm90IG91cnM="}, "signature"),
                         ({**thinking.model_dump(), "signature": "\x80"}, "signature"),
                         ({**thinking.model_dump(), "thinking": "Changed."}, "thinking")):
        r = post(srv, messages=turn[:1] + [{"role": "assistant", "content": [block, text.model_dump()]}] + turn[2:])
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"].startswith(f"messages.1.content.0.{field}"), r.text


def test_budget_tokens_ends_the_reasoning(qwen35_server):
    """The random model reasons on and on; with a budget its reasoning ends there, the same tokens up to it
    (greedy), and the reply goes on after it."""
    c = claude(qwen35_server)
    kwargs = dict(model="tiny", max_tokens=16, extra_body={"temperature": 0},
                  messages=[{"role": "user", "content": "Hi"}])
    free = c.messages.create(**kwargs, thinking={"type": "adaptive"})
    assert [b.type for b in free.content] == ["thinking"] and free.stop_reason == "max_tokens"
    capped = c.messages.create(**kwargs, thinking={"type": "enabled", "budget_tokens": 4})
    assert [b.type for b in capped.content] == ["thinking", "text"] and capped.usage.output_tokens == 16
    tok = qwen35_server.state.model.tokenizer
    assert free.content[0].thinking.startswith(capped.content[0].thinking)
    assert len(tok(capped.content[0].thinking, add_special_tokens=False)["input_ids"]) <= 4
    # streamed, the same
    with c.messages.stream(**kwargs, thinking={"type": "enabled", "budget_tokens": 4}) as stream:
        assert [b.model_dump() for b in stream.get_final_message().content] == [b.model_dump() for b in capped.content]
    # with a grammar after the reasoning: a forced tool call
    forced = c.messages.create(**kwargs | {"max_tokens": 200, "extra_body": {"temperature": 1.0}}, tools=CLAUDE_TOOLS,
                               tool_choice={"type": "tool", "name": "get_time"},
                               thinking={"type": "enabled", "budget_tokens": 6})
    assert [b.type for b in forced.content][-1] == "tool_use" and forced.stop_reason == "tool_use"
    r = post(qwen35_server, max_tokens=8, thinking={"type": "enabled", "budget_tokens": 8})
    assert r.status_code == 400 and "budget_tokens must be less than max_tokens" in r.json()["error"]["message"]


def test_errors_in_anthropic_shape(server, tiny_model):
    def error_of(r: httpx.Response, status: int, kind: str) -> str:
        assert r.status_code == status, r.text
        body = r.json()
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
        assert body["error"]["type"] == kind and body["request_id"] == r.headers["x-request-id"]
        return body["error"]["message"]

    url = server.url + "/v1/messages"
    assert "not valid JSON" in error_of(httpx.post(url, content=b"{", headers={"content-type": "application/json"}),
                                        400, "invalid_request_error")
    assert error_of(post(server, max_tokens=0), 400, "invalid_request_error").startswith("max_tokens")
    assert error_of(post(server, model="claude-sonnet-4-6"), 404, "not_found_error").startswith("The model")
    assert error_of(post(server, bogus=1), 400, "invalid_request_error").startswith("bogus")
    assert error_of(httpx.get(url), 405, "api_error")
    big = "x" * (4 * 1024 * 1024 + 1)
    assert error_of(post(server, messages=[{"role": "user", "content": big}]), 413, "request_too_large")
    prefill = [{"role": "user", "content": "a"}, {"role": "assistant", "content": [
        {"type": "text", "text": "b"}, {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]
    assert "may not hold tool_use" in error_of(post(server, messages=prefill), 400, "invalid_request_error")
    assert error_of(post(server, messages=[prefill[0], {"role": "assistant", "content": "b"}], max_tokens=8,
                         thinking={"type": "enabled", "budget_tokens": 4}), 400,
                    "invalid_request_error").startswith("thinking cannot be combined with a prefilled reply")
    image = [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}]
    msg = error_of(post(server, messages=[{"role": "user", "content": image}]), 400, "invalid_request_error")
    assert msg.startswith("messages.0.content.0.source.data: this model reads no images"), msg
    for content, why in (([{"type": "server_tool_use", "id": "s", "name": "web_search", "input": {}}], "client tools"),
                         ([{"type": "redacted_thinking", "data": "x"}], "thinking it wrote itself"),
                         ([{"type": "tool_use", "id": "t", "name": "f", "input": {}}], "may not hold tool_use")):
        msg = error_of(post(server, messages=[{"role": "user", "content": content}]), 400, "invalid_request_error")
        assert msg.startswith("messages.0.content.0.type") and why in msg, msg
    assert "client tools" in error_of(post(server, tools=[{"type": "web_search_20250305", "name": "web_search"}]),
                                      400, "invalid_request_error")
    # the client raises the error classes of its own API
    with pytest.raises(anthropic.NotFoundError):
        claude(server).messages.create(model="claude-opus-4-5", max_tokens=2,
                                       messages=[{"role": "user", "content": "hi"}])
    # a generation that fails: a 500 whole, an error event streamed
    c = claude(server)
    with failing(server):
        with pytest.raises(anthropic.InternalServerError) as err:
            c.messages.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": "hi"}],
                              extra_headers={"X-Request-ID": "poison"})
        assert err.value.body["error"]["type"] == "api_error"
        events = events_of(httpx.post(url, headers={"X-Request-ID": "poison"}, timeout=60, json={
            "model": "tiny", "max_tokens": 4, "stream": True, "messages": [{"role": "user", "content": "hi"}]}).content)
    assert [e["type"] for e in events][:2] == ["message_start", "ping"] and events[-1]["type"] == "error"
    assert events[-1]["error"]["type"] == "api_error" and events[-1]["error"]["message"]
    assert server.state.model.engine.stats()["running"] == 0


def test_an_unhandled_error_is_a_500_in_anthropic_shape(server, monkeypatch):
    def broken(req, request):
        raise RuntimeError("a bug")

    monkeypatch.setattr(server.app.state.messages, "create", broken)
    r = httpx.post(server.url + "/v1/messages", headers={"X-Request-ID": "bug-1"}, timeout=60, json={
        "model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 500 and r.json() == {"type": "error", "request_id": "bug-1", "error": {
        "type": "api_error", "message": "internal server error"}}


async def test_queue_full_and_not_ready_in_anthropic_shape(tiny_model):
    import asyncio

    from ..conftest import running_server

    body = {"model": "tiny", "max_tokens": 300, "temperature": 0, "messages": [{"role": "user", "content": "x"}]}
    with running_server(tiny_model, max_concurrency=1, max_queue=1) as s:
        async with httpx.AsyncClient(base_url=s.url, timeout=120) as c:
            results = await asyncio.gather(*(c.post("/v1/messages", json=body) for _ in range(5)))
        refused = [r for r in results if r.status_code == 429]
        assert refused and all(r.status_code in (200, 429) for r in results), [r.status_code for r in results]
        assert refused[0].json()["type"] == "error" and int(refused[0].headers["retry-after"]) >= 1
        assert set(refused[0].json()["error"]) == {"type", "message"}
        assert refused[0].json()["error"]["type"] == "rate_limit_error"
    with running_server(tiny_model, _load=False) as s:  # the model never loads: 503, overloaded_error
        r = httpx.post(s.url + "/v1/messages", json=body)
        assert r.status_code == 503 and r.json()["type"] == "error" and r.headers["retry-after"]
        assert r.json()["error"]["type"] == "overloaded_error" and "not ready" in r.json()["error"]["message"]


def test_x_api_key(tiny_model):
    from ..conftest import running_server

    with running_server(tiny_model, api_key="key-zero") as s:
        r = httpx.post(s.url + "/v1/messages", json={"model": "tiny", "max_tokens": 1,
                                                     "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url=s.url, api_key="bad", max_retries=0).messages.count_tokens(
                model="tiny", messages=[{"role": "user", "content": "hi"}])
        ok = anthropic.Anthropic(base_url=s.url, api_key="key-zero", max_retries=0).messages.create(
            model="tiny", max_tokens=1, messages=[{"role": "user", "content": "hi"}])
        assert ok.usage.output_tokens == 1
        # the OpenAI routes take the key the same way
        assert httpx.get(s.url + "/v1/models", headers={"x-api-key": "key-zero"}).status_code == 200


def test_metrics_and_access_log_count_it(server, caplog):
    def counts() -> tuple[float, float]:
        text = httpx.get(server.url + "/metrics").text
        return (metric(text, "qwen_request_success_total", '{finish_reason="length"}'),
                metric(text, "http_requests_total", '{endpoint="/v1/messages",method="POST",status_code="200"}'))

    before = counts()
    with caplog.at_level(logging.INFO, logger="qwen_inference.access"):
        r = httpx.post(server.url + "/v1/messages", headers={"X-Request-ID": "who-m"}, timeout=60, json={
            "model": "tiny", "max_tokens": 2, "metadata": {"user_id": "u-1"},
            "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        deadline = time.monotonic() + 10  # the line is written once the response is sent
        while time.monotonic() < deadline and not [x for x in caplog.records
                                                   if getattr(x, "request_id", None) == "who-m"]:
            time.sleep(0.02)
    [line] = [x for x in caplog.records if getattr(x, "request_id", None) == "who-m"]
    assert line.user == "u-1" and line.path == "/v1/messages" and line.output_tokens == 2
    assert counts() == (before[0] + 1, before[1] + 1)


# ---- every field decided --------------------------------------------------------------------------------

# field: (verdict, a value that asks for something, the test that shows its effect)
CREATE = {
    "model": (HONOURED, "tiny", "test_errors_in_anthropic_shape"),
    "max_tokens": (HONOURED, 2, "test_same_reply_as_chat_completions_whole_and_streamed"),
    "messages": (HONOURED, [{"role": "user", "content": "hi"}], "test_conversation_renders_as_chat_messages"),
    "stream": (HONOURED, True, "test_sse_framing"),
    "system": (HONOURED, "Be brief.", "test_conversation_renders_as_chat_messages"),
    "stop_sequences": (HONOURED, ["zz"], "test_same_reply_as_chat_completions_whole_and_streamed"),
    "thinking": (HONOURED, {"type": "enabled", "budget_tokens": 1}, "test_budget_tokens_ends_the_reasoning"),
    "tools": (HONOURED, CLAUDE_TOOLS, "test_tool_use_whole_and_streamed"),
    "tool_choice": (HONOURED, {"type": "any"}, "test_forced_tool_use_follows_the_schema"),
    "output_config": (HONOURED, {"format": {"type": "json_schema", "schema": {"type": "object"}}},
                      "test_output_config_format_is_held_by_a_grammar"),
    "metadata": (HONOURED, {"user_id": "u"}, "test_metrics_and_access_log_count_it"),
    # the prefix cache keeps every prompt's prefix without asking (README)
    "cache_control": (HONOURED, {"type": "ephemeral", "ttl": "1h"}, "test_conversation_renders_as_chat_messages"),
    "container": (REFUSED, "container_1", None),
    "diagnostics": (REFUSED, {"previous_message_id": "msg_1"}, None),
    "inference_geo": (REFUSED, "us", None),
    "service_tier": (REFUSED, "priority", None),
    "speed": (REFUSED, "fast", None),
    "user_profile_id": (REFUSED, "p", None),
    "workspace_id": (REFUSED, "w", None),
}
# sampling fields older clients send (the 2.x client types no longer list them)
SAMPLING = {"temperature": 0.5, "top_p": 0.5, "top_k": 5}
NO_OPS = {"service_tier": "auto", "speed": "standard"}
# the nested types: {field: HONOURED, or a body that uses it and the start of its error message}
NESTED = [
    (text_block_param.TextBlockParam, {"text": HONOURED, "type": HONOURED, "cache_control": HONOURED, "citations": (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "citations": [
            {"type": "char_location", "cited_text": "a", "document_index": 0, "start_char_index": 0,
             "end_char_index": 1}]}]}]}, "messages.0.content.0.citations")}),
    (tool_use_block_param.ToolUseBlockParam, {"id": HONOURED, "input": HONOURED, "name": HONOURED, "type": HONOURED,
                                              "cache_control": HONOURED, "caller": (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [
            {"type": "tool_use", "id": "t", "name": "f", "input": {}, "caller": {"type": "code_execution_20250825",
                                                                                  "tool_id": "x"}}]},
                      {"role": "user", "content": "b"}]}, "messages.1.content.0.caller"), "toolset_name": (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [
            {"type": "tool_use", "id": "t", "name": "f", "input": {}, "toolset_name": "ts"}]},
                      {"role": "user", "content": "b"}]}, "messages.1.content.0.toolset_name")}),
    (tool_result_block_param.ToolResultBlockParam, {
        "tool_use_id": HONOURED, "type": HONOURED, "cache_control": HONOURED, "content": HONOURED,
        "is_error": HONOURED, "toolset_name": (
            {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                        "toolset_name": "ts"}]}]},
            "messages.0.content.0.toolset_name")}),
    (thinking_block_param.ThinkingBlockParam, {"signature": HONOURED, "thinking": HONOURED, "type": HONOURED}),
    (tool_param.ToolParam, {
        "input_schema": HONOURED, "name": HONOURED, "description": HONOURED, "type": HONOURED, "strict": HONOURED,
        "cache_control": HONOURED, "eager_input_streaming": HONOURED,
        "allowed_callers": ({"tools": [{"name": "f", "input_schema": {"type": "object"},
                                        "allowed_callers": ["code_execution_20250825"]}]}, "tools.0.allowed_callers"),
        "defer_loading": ({"tools": [{"name": "f", "input_schema": {"type": "object"}, "defer_loading": True}]},
                          "tools.0.defer_loading"),
        "input_examples": ({"tools": [{"name": "f", "input_schema": {"type": "object"},
                                       "input_examples": [{}]}]}, "tools.0.input_examples")}),
    (tool_choice_auto_param.ToolChoiceAutoParam, {"type": HONOURED, "disable_parallel_tool_use": HONOURED}),
    (tool_choice_any_param.ToolChoiceAnyParam, {"type": HONOURED, "disable_parallel_tool_use": HONOURED}),
    (tool_choice_tool_param.ToolChoiceToolParam, {"type": HONOURED, "name": HONOURED,
                                                  "disable_parallel_tool_use": HONOURED}),
    (tool_choice_none_param.ToolChoiceNoneParam, {"type": HONOURED}),
    (thinking_config_enabled_param.ThinkingConfigEnabledParam, {"type": HONOURED, "budget_tokens": HONOURED,
                                                                "display": (
        {"thinking": {"type": "enabled", "budget_tokens": 1, "display": "summarized"}}, "thinking.display")}),
    (thinking_config_adaptive_param.ThinkingConfigAdaptiveParam, {"type": HONOURED, "display": (
        {"thinking": {"type": "adaptive", "display": "summarized"}}, "thinking.display")}),
    (thinking_config_disabled_param.ThinkingConfigDisabledParam, {"type": HONOURED}),
    (output_config_param.OutputConfigParam, {"format": HONOURED, "effort": (
        {"output_config": {"effort": "high"}}, "output_config.effort")}),
    (metadata_param.MetadataParam, {"user_id": HONOURED}),
    (cache_control_ephemeral_param.CacheControlEphemeralParam, {"type": HONOURED, "ttl": HONOURED}),
]


def test_every_field_of_the_anthropic_schema_is_honoured_or_refused(server):
    assert set(message_create_params.MessageCreateParamsBase.__annotations__) | {"stream"} == set(CREATE), \
        "the anthropic package's fields changed: decide for each new one"
    assert set(message_count_tokens_params.MessageCountTokensParams.__annotations__) <= set(CREATE)
    with httpx.Client(base_url=server.url, timeout=120) as c:
        base = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        for name, (verdict, value, proof) in list(CREATE.items()) + [(k, (HONOURED, v, "test_sampling"))
                                                                     for k, v in SAMPLING.items()]:
            body = {**base, name: value}
            if name == "tool_choice":
                body["tools"] = CLAUDE_TOOLS
            if name == "thinking":
                body["max_tokens"] = 4
            r = c.post("/v1/messages", json=body)
            counted = c.post("/v1/messages/count_tokens", json={k: v for k, v in body.items()
                                                                if k not in ("max_tokens", "stream")})
            in_count = name in message_count_tokens_params.MessageCountTokensParams.__annotations__
            if verdict == HONOURED:
                assert r.status_code == 200, (name, r.text)
                assert name in SAMPLING or proven(f"test_messages_api::{proof}"), (name, proof)
                if in_count:
                    assert counted.status_code == 200 and counted.json()["input_tokens"] > 0, (name, counted.text)
            else:
                assert r.status_code == 400 and r.json()["error"]["message"].startswith(name + ": "), (name, r.text)
                if in_count:
                    assert counted.status_code == 400 and counted.json()["error"]["message"].startswith(name)
        for name, value in NO_OPS.items():
            assert c.post("/v1/messages", json={**base, name: value}).status_code == 200, name
        for kind, verdicts in NESTED:
            assert set(kind.__annotations__) == set(verdicts), f"{kind.__name__} changed: decide for each new field"
            for name, verdict in verdicts.items():
                if verdict == HONOURED:
                    continue
                body, param = verdict
                r = c.post("/v1/messages", json={**base, **body})
                assert r.status_code == 400 and r.json()["error"]["message"].startswith(param + ": "), \
                    (kind.__name__, name, r.text)


def test_sampling(server):
    """temperature, top_p and top_k reach the sampler: greedy (temperature 0) is reproducible, top_k 1 is greedy."""
    greedy = [split(claude(server).messages.create(model="tiny", max_tokens=8, extra_body=sampling,
                                                   messages=[{"role": "user", "content": "hi"}]).content)
              for sampling in ({"temperature": 0}, {"temperature": 1.0, "top_k": 1},
                               {"temperature": 0.7, "top_p": 1e-6})]
    assert greedy[0] == greedy[1] == greedy[2]
    r = post(server, temperature=1.5)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("temperature")

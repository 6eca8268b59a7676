"""The chat-completions API on a real server: the openai client, raw HTTP and SSE framing, every error path."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from ..conftest import running_server
from .scripted import failing


def chat(client: httpx.Client, **body):
    body.setdefault("messages", [{"role": "user", "content": "Hello"}])
    return client.post("/v1/chat/completions", json=body)


def prompt_len(tok, messages) -> int:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tok(text, add_special_tokens=False)["input_ids"])


def sse_events(raw: bytes) -> list[str]:
    """Split an SSE body exactly: every event is `data: ...` followed by a blank line."""
    text = raw.decode()
    assert text.endswith("\n\n"), "the stream must end with a complete event"
    events = text.split("\n\n")[:-1]
    for ev in events:
        assert ev.startswith("data: ") and "\n" not in ev, repr(ev)
    return [ev[len("data: "):] for ev in events]


@pytest.fixture
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_openai_client_non_streaming(oai, tiny_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something"}]
    r = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=7, temperature=0)
    assert r.object == "chat.completion"
    assert r.model == "tiny"
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert choice.message.content
    assert r.usage.prompt_tokens == prompt_len(tiny_tokenizer, messages)
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7


def test_openai_client_streaming_matches_non_streaming(oai):
    messages = [{"role": "user", "content": "Count to ten"}]
    whole = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    stream = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_sse_framing_byte_for_byte(client):
    r = chat(client, max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.content)
    assert events[-1] == "[DONE]"
    bodies = [json.loads(e) for e in events[:-1]]
    ids = {b["id"] for b in bodies}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    first = bodies[0]
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(b["usage"] is None for b in bodies[:-1])
    assert bodies[-2]["choices"][0]["finish_reason"] == "length" and bodies[-2]["choices"][0]["delta"] == {}
    assert bodies[-1]["choices"] == [] and bodies[-1]["usage"]["completion_tokens"] == 4
    # compact JSON, as OpenAI and vLLM send it
    assert r.content.startswith(b'data: {"id":"chatcmpl-')


def test_stream_without_usage_has_no_usage_chunk(client):
    r = chat(client, max_tokens=3, temperature=0, stream=True)
    bodies = [json.loads(e) for e in sse_events(r.content)[:-1]]
    assert all("usage" not in b for b in bodies)
    assert bodies[-1]["choices"][0]["finish_reason"] == "length"


def test_multi_turn_changes_the_prompt(client, tiny_tokenizer):
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me more"},
    ]
    r = chat(client, messages=turns, max_tokens=2, temperature=0).json()
    assert r["usage"]["prompt_tokens"] == prompt_len(tiny_tokenizer, turns)
    single = chat(client, messages=turns[:1], max_tokens=2, temperature=0).json()
    assert single["usage"]["prompt_tokens"] < r["usage"]["prompt_tokens"]


def test_continue_final_message(srv):
    """vLLM's continue_final_message: the prompt ends inside the last (assistant) message, as /tokenize renders
    it, and the reply goes on from there (only the continuation comes back)."""
    from .scripted import Scripted

    msgs = [{"role": "user", "content": "Count to five."}, {"role": "assistant", "content": "One, two,"}]
    flags = {"add_generation_prompt": False, "continue_final_message": True}
    ids = httpx.post(srv.url + "/tokenize", json={"messages": msgs, **flags}).json()["tokens"]
    prompt = httpx.post(srv.url + "/detokenize", json={"tokens": ids}).json()["prompt"]
    assert prompt.endswith("One, two,")
    with Scripted(srv) as script:
        script.say("go-on", " three.")
        r = httpx.post(srv.url + "/v1/chat/completions", headers={"X-Request-ID": "go-on"}, timeout=60,
                       json={"messages": msgs, "max_tokens": 10, **flags}).json()
    assert r["usage"]["prompt_tokens"] == len(ids) and r["choices"][0]["message"]["content"] == " three."
    for body, why in (({"continue_final_message": True}, "needs add_generation_prompt: false"),
                      ({**flags, "messages": msgs[:1]}, "needs a last message from the assistant")):
        bad = httpx.post(srv.url + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 1, **body})
        assert bad.status_code == 400 and why in bad.json()["error"]["message"], bad.text
        assert bad.json()["error"]["param"] == "continue_final_message"


def test_default_system_prompt_is_qwens(client, tiny_tokenizer):
    with_default = chat(client, messages=[{"role": "user", "content": "x"}], max_tokens=1).json()
    explicit = [{"role": "system", "content": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."},
                {"role": "user", "content": "x"}]
    assert with_default["usage"]["prompt_tokens"] == prompt_len(tiny_tokenizer, explicit)


def test_content_parts_and_developer_role(client, tiny_tokenizer):
    parts = [{"role": "developer", "content": "Rules"}, {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                   {"type": "text", "text": "b"}]}]
    r = chat(client, messages=parts, max_tokens=1)
    assert r.status_code == 200
    plain = [{"role": "system", "content": "Rules"}, {"role": "user", "content": "ab"}]
    assert r.json()["usage"]["prompt_tokens"] == prompt_len(tiny_tokenizer, plain)


def test_stop_string_across_token_boundaries(client):
    base = chat(client, max_tokens=24, temperature=0).json()["choices"][0]["message"]["content"]
    assert len(base) > 12
    # a stop string that starts inside one token and ends inside a later one
    stop = base[5:11]
    r = chat(client, max_tokens=24, temperature=0, stop=[stop, "never-seen-stop"]).json()
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["message"]["content"] == base[: base.index(stop)]
    assert r["usage"]["completion_tokens"] < 24
    streamed = chat(client, max_tokens=24, temperature=0, stop=stop, stream=True)
    bodies = [json.loads(e) for e in sse_events(streamed.content)[:-1]]
    text = "".join(b["choices"][0]["delta"].get("content") or "" for b in bodies)
    assert text == base[: base.index(stop)]
    assert bodies[-1]["choices"][0]["finish_reason"] == "stop"


def test_max_completion_tokens_and_length(client):
    r = chat(client, max_completion_tokens=3, temperature=0).json()
    assert r["usage"]["completion_tokens"] == 3 and r["choices"][0]["finish_reason"] == "length"


def test_seeded_sampling_is_reproducible(client):
    a = chat(client, max_tokens=10, temperature=1.0, seed=1234).json()["choices"][0]["message"]["content"]
    b = chat(client, max_tokens=10, temperature=1.0, seed=1234).json()["choices"][0]["message"]["content"]
    c = chat(client, max_tokens=10, temperature=1.0, seed=4321).json()["choices"][0]["message"]["content"]
    assert a == b
    assert a != c


def test_models_route(client, server):
    r = client.get("/v1/models").json()
    assert r["object"] == "list" and r["data"][0]["id"] == "tiny"
    # the official clients of both APIs read the list and the model
    import anthropic

    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in oai.models.list()] == ["tiny"] and oai.models.retrieve("tiny").owned_by == "qwen-operator"
    claude = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    [info] = list(claude.models.list())
    assert info.id == "tiny" and info.type == "model" and info.display_name == "tiny" and info.created_at.year == 1970
    assert claude.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-9")
    with pytest.raises(anthropic.NotFoundError):
        claude.models.retrieve("claude-opus-4-5")


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "stop": [""]}, "stop"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None),
        ({"messages": "hello"}, "messages"),
    ],
)
def test_invalid_requests_get_400_in_openai_shape(client, body, param):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert err["param"] == param


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe{}", b"[1,2]", b"[" * 100000 + b"]" * 100000, b""])
def test_malformed_bodies_get_400(client, raw):
    r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_nan_sampling_value_is_refused(client):
    raw = b'{"messages":[{"role":"user","content":"hi"}],"temperature":NaN}'
    r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400


def test_oversized_body_gets_413(client):
    r = client.post("/v1/chat/completions", content=b" " * (4 * 1024 * 1024 + 1),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("chunked", [False, True])
def test_oversized_body_gets_413_when_the_client_writes_it_all_before_reading(server, chunked):
    """urllib writes the whole body before it reads: the server answers 413, then reads and drops the rest, so
    the client sees the answer and not a connection reset."""
    import urllib.error
    import urllib.request

    body = b" " * (5 * 1024 * 1024)
    headers = {"content-type": "application/json", **({"Transfer-Encoding": "chunked"} if chunked else {})}
    req = urllib.request.Request(server.url + "/v1/chat/completions", data=iter([body]) if chunked else body,
                                 headers=headers)
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=60)
    assert exc.value.code == 413
    assert json.loads(exc.value.read())["error"]["code"] == "request_too_large"
    assert httpx.get(server.url + "/livez").status_code == 200


def test_prompt_longer_than_context(server, client):
    limit = server.state.model.max_model_len
    r = chat(client, messages=[{"role": "user", "content": "word " * (limit * 2)}])
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_max_tokens_over_cap(server, client):
    cap = server.settings.max_tokens_cap
    r = chat(client, max_tokens=cap + 1)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "max_tokens"
    r = chat(client, max_completion_tokens=cap + 1)
    assert r.json()["error"]["param"] == "max_completion_tokens"


def test_prompt_plus_max_tokens_over_context(server, client):
    limit = server.state.model.max_model_len
    r = chat(client, max_tokens=min(limit, server.settings.max_tokens_cap))
    if limit <= server.settings.max_tokens_cap:
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_unknown_model_is_404(client):
    r = chat(client, model="gpt-4")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"


def test_unknown_route_and_method(client):
    assert client.get("/v1/nothing").json()["error"]["code"] == "not_found"
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_request_id_is_echoed_or_made(client):
    r = chat(client, max_tokens=1, temperature=0)
    made = r.headers["x-request-id"]
    assert len(made) == 32 and r.json()["id"] == "chatcmpl-" + made
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
                    headers={"X-Request-ID": "client-id-123"})
    assert r.headers["x-request-id"] == "client-id-123"
    r = client.get("/health", headers={"X-Request-ID": "bad id with spaces"})
    assert r.headers["x-request-id"] != "bad id with spaces"


def test_generation_failure_is_500_and_the_server_keeps_serving(server, client):
    """A request whose generation raises fails alone; the batch it shared and later requests go on."""
    with failing(server, "poison"):
        import concurrent.futures as cf

        def call(rid, stream=False):
            return client.post("/v1/chat/completions", headers={"X-Request-ID": rid},
                               json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 8,
                                     "temperature": 0, "stream": stream})

        with cf.ThreadPoolExecutor(4) as pool:
            bad = pool.submit(call, "poison")
            good = [pool.submit(call, f"good-{i}") for i in range(3)]
            bad_r = bad.result()
            good_r = [g.result() for g in good]
        assert bad_r.status_code == 500
        assert bad_r.json()["error"]["type"] == "server_error"
        assert "injected failure" in bad_r.json()["error"]["message"]
        assert all(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8 for r in good_r)
        # mid-stream failure: an error event, then [DONE]
        streamed = call("poison", stream=True)
        events = sse_events(streamed.content)
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "internal_error"
    assert chat(client, max_tokens=2).status_code == 200
    assert client.get("/health").status_code == 200


def test_api_keys(tiny_model, tmp_path):
    keyfile = tmp_path / "keys"
    keyfile.write_text("# keys\nkey-one\nkey-two\n")
    with running_server(tiny_model, api_key="key-zero", api_key_file=keyfile) as s:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
            missing = c.post("/v1/chat/completions", json=body)
            assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
            wrong = c.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            assert c.get("/v1/models").status_code == 401
            for key in ("key-zero", "key-one", "key-two"):
                ok = c.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
                assert ok.status_code == 200, key
            # probes and scraping stay open
            assert c.get("/health").status_code == 200
            assert c.get("/livez").status_code == 200
            assert c.get("/metrics").status_code == 200
            assert c.get("/").status_code == 200
            oai = openai.OpenAI(base_url=s.url + "/v1", api_key="key-one", max_retries=0)
            assert oai.chat.completions.create(model="tiny", messages=body["messages"], max_tokens=1).choices
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=s.url + "/v1", api_key="bad", max_retries=0).models.list()
            metrics = c.get("/metrics").text
            assert 'qwen_request_errors_total{reason="auth"} 4.0' in metrics


def test_closed_probe_routes_when_configured(tiny_model):
    with running_server(tiny_model, api_key="k", auth_open_routes=False) as s:
        assert httpx.get(s.url + "/metrics").status_code == 401
        assert httpx.get(s.url + "/health").status_code == 401
        assert httpx.get(s.url + "/health", headers={"Authorization": "Bearer k"}).status_code == 200


def test_health_503_while_loading_then_200(tiny_model):
    with running_server(tiny_model, _load=False) as s:
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert httpx.get(s.url + "/livez").status_code == 200
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        assert r.headers["retry-after"]
        assert "qwen_model_loaded 0.0" in httpx.get(s.url + "/metrics").text
        s.state.start_loading()
        s.wait_ready()
        assert httpx.get(s.url + "/health").status_code == 200
        assert "qwen_model_loaded 1.0" in httpx.get(s.url + "/metrics").text


def test_health_503_when_loading_fails(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with running_server(tmp_path / "nothing-here", _load=False) as s:
        s.state.start_loading()
        s.state.load_thread.join(60)
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and "loading the model failed" in r.json()["reason"]


def test_health_503_when_the_engine_loop_dies(tiny_model):
    with running_server(tiny_model) as s:
        engine = s.state.model.engine

        def explode():
            raise SystemError("loop bug")

        engine._schedule = explode  # a bug inside the loop itself, not in one request
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                             "max_tokens": 2}, timeout=60)
        assert r.status_code == 500
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and "engine loop died" in r.json()["reason"]
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503

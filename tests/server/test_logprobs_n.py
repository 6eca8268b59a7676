"""Log-probabilities and several choices in chat completions: OpenAI's shapes, whole and streamed, on a model
with Qwen's real vocabulary (tokens that hold part of a character keep their bytes)."""

from __future__ import annotations

import json

import httpx
import pytest

from ..conftest import running_server
from .scripted import Scripted, client
from .test_chat_api import sse_events

HI = [{"role": "user", "content": "Say something"}]


def post(server, rid: str | None = None, **body) -> httpx.Response:
    body.setdefault("messages", HI)
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120,
                      headers={"X-Request-ID": rid} if rid else {})


def test_logprobs_whole(srv):
    r = client(srv).chat.completions.create(model="tiny", messages=HI, max_tokens=8, temperature=0, logprobs=True,
                                            top_logprobs=3)
    choice = r.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == r.usage.completion_tokens == 8
    assert b"".join(bytes(e.bytes) for e in entries).decode() == choice.message.content
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        # greedy: the chosen token is the most likely one
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert e.token == bytes(e.bytes).decode("utf-8", errors="replace")
    bare = client(srv).chat.completions.create(model="tiny", messages=HI, max_tokens=3, temperature=0, logprobs=True)
    assert all(e.top_logprobs == [] for e in bare.choices[0].logprobs.content)
    assert client(srv).chat.completions.create(model="tiny", messages=HI, max_tokens=3).choices[0].logprobs is None


def test_logprobs_streamed_equal_whole(srv):
    body = dict(max_tokens=10, temperature=1.0, seed=21, logprobs=True, top_logprobs=2)
    whole = post(srv, **body).json()["choices"][0]["logprobs"]["content"]
    events = [json.loads(e) for e in sse_events(post(srv, stream=True, **body).content)[:-1]]
    streamed = []
    for ev in events:
        lp = ev["choices"][0]["logprobs"]
        if lp is not None:
            assert ev["choices"][0]["delta"] or ev["choices"][0]["finish_reason"]  # they ride with text
            streamed += lp["content"]
    assert streamed == whole


def test_logprobs_of_a_token_that_splits_a_character(server):
    """A character spread over two tokens: each token's bytes are its own, the text of each is U+FFFD, and the
    content is the character."""
    tok = server.state.model.tokenizer
    pieces = [i for i in tok("€", add_special_tokens=False)["input_ids"]]
    if len(pieces) < 2:  # find a character the tokenizer splits
        pieces = tok("\U0001f9ec", add_special_tokens=False)["input_ids"]
    assert len(pieces) >= 2
    text = tok.decode(pieces)
    with Scripted(server) as script:
        script.say("split", text)
        r = post(server, "split", max_tokens=10, logprobs=True).json()["choices"][0]
    entries = r["logprobs"]["content"]
    assert r["message"]["content"] == text
    assert b"".join(bytes(e["bytes"]) for e in entries) == text.encode()
    assert "\ufffd" in entries[0]["token"]


def test_n_choices_whole_and_streamed(srv):
    body = dict(max_tokens=6, temperature=1.0, seed=5, n=3)
    whole = post(srv, **body).json()
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2]
    texts = [c["message"]["content"] for c in whole["choices"]]
    assert len(set(texts)) == 3  # each choice draws on its own
    assert whole["usage"]["completion_tokens"] == 18
    events = [json.loads(e) for e in sse_events(post(srv, stream=True, **body).content)[:-1]]
    by_index: dict[int, list] = {0: [], 1: [], 2: []}
    for ev in events:
        [c] = ev["choices"]
        by_index[c["index"]].append(c)
    for i in range(3):
        assert by_index[i][0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in by_index[i]) == texts[i]
        assert [c["finish_reason"] for c in by_index[i]][-1] == "length"


def test_n_with_a_stop_string_on_one_choice(server):
    """One choice reaches a stop string while another runs on: each ends for its own reason."""
    with Scripted(server) as script:
        script.say("stops", "alpha beta STOP gamma delta", index=0, end=False)
        script.say("stops", "one two three four five six seven eight", index=1)
        r = post(server, "stops", max_tokens=12, n=2, stop=["STOP"]).json()
    a, b = r["choices"]
    assert a["message"]["content"] == "alpha beta " and a["finish_reason"] == "stop"
    assert b["message"]["content"] == "one two three four five six seven eight" and b["finish_reason"] == "stop"


def test_logprob_and_n_errors(server):
    for body, param in (({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                        ({"top_logprobs": 1}, "top_logprobs"),
                        ({"n": 17}, "n"),  # more than the server's 16 slots
                        ({"logprobs": 3}, "logprobs")):
        r = post(server, max_tokens=2, **body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)


def test_n_needing_more_kv_cache_than_there_is(tiny_model):
    with running_server(tiny_model, kv_cache_tokens=256, max_concurrency=4) as s:
        r = post(s, max_tokens=100, n=4)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        assert "KV cache" in r.json()["error"]["message"]
        assert post(s, max_tokens=20, n=4).status_code == 200

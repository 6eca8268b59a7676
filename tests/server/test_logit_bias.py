"""OpenAI's `logit_bias` on chat and text completions: a bias added to the named tokens' logits before sampling,
whole and streamed, with each choice of `n`; never past a grammar; bad maps refused by field."""

from __future__ import annotations

import json

import httpx
import pytest

from qwen_inference.protocol import MAX_LOGIT_BIAS

from .scripted import client
from .test_chat_api import sse_events

HI = [{"role": "user", "content": "Say something"}]


def suppressed(server) -> set[int]:
    s = server.state.model.engine._suppress
    return set() if s is None else set(s.tolist())


def word_id(srv, text: str = " hello") -> int:
    ids = srv.state.model.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1 and ids[0] not in suppressed(srv)
    return ids[0]


def test_a_positive_bias_forces_a_token_whole_streamed_and_in_every_choice(srv):
    t = word_id(srv)
    body = {"messages": HI, "max_tokens": 5, "temperature": 1.0, "seed": 4, "n": 2, "logit_bias": {str(t): 100}}
    r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=120).json()
    assert [c["message"]["content"] for c in r["choices"]] == [" hello" * 5] * 2
    streamed = ["", ""]
    for ev in sse_events(httpx.post(srv.url + "/v1/chat/completions", json={**body, "stream": True},
                                    timeout=120).content)[:-1]:
        for c in json.loads(ev)["choices"]:
            streamed[c["index"]] += c["delta"].get("content") or ""
    assert streamed == [" hello" * 5] * 2
    # the same map through the official client, on text completions
    done = client(srv).completions.create(model="tiny", prompt="Once", max_tokens=4, temperature=0.7, seed=1,
                                          logit_bias={str(t): 100})
    assert done.choices[0].text == " hello" * 4
    # without the bias the model writes something else
    assert client(srv).completions.create(model="tiny", prompt="Once", max_tokens=4, temperature=0.7,
                                          seed=1).choices[0].text != " hello" * 4


def test_a_bias_never_lets_past_a_grammar(server):
    brace = word_id(server, " hello")
    r = client(server).chat.completions.create(model="tiny", messages=HI, max_tokens=40, temperature=0,
                                               response_format={"type": "json_object"},
                                               logit_bias={str(brace): 100})
    choice = r.choices[0]
    # unconstrained, the bias makes every token " hello" (above); the grammar still opens an object first
    assert choice.message.content.lstrip().startswith("{"), choice.message.content
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)


@pytest.mark.parametrize("bias, message", [
    ({"abc": 1}, "not a token id"),
    ({"-5": 1}, "not a token id"),
    ({"5": 100.5}, "from -100 to 100"),
    ({"5": -101}, "from -100 to 100"),
    ({"5": "much"}, "number"),
    ({str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}, f"at most {MAX_LOGIT_BIAS}"),
    ({"5": 1, "99999999": 1}, "outside this model's vocabulary"),
])
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_bad_maps_are_400_naming_the_field(server, route, bias, message):
    body = {"messages": HI} if route.endswith("chat/completions") else {"prompt": "x"}
    r = httpx.post(server.url + route, json={**body, "max_tokens": 2, "logit_bias": bias}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"].startswith("logit_bias") and message in err["message"], err


def test_an_empty_map_asks_for_nothing(server):
    for route, body in (("/v1/chat/completions", {"messages": HI}), ("/v1/completions", {"prompt": "x"})):
        plain = httpx.post(server.url + route, json={**body, "max_tokens": 3, "temperature": 0}, timeout=60).json()
        empty = httpx.post(server.url + route, json={**body, "max_tokens": 3, "temperature": 0, "logit_bias": {}},
                           timeout=60).json()
        assert plain["choices"][0] == empty["choices"][0]

"""vLLM's sampling fields on chat and text completions, as its clients send them: `min_p`, `stop_token_ids`,
`min_tokens` (which holds back the end marker, stop tokens and stop strings) and `include_stop_str_in_output`,
whole and streamed; bad values refused by field."""

from __future__ import annotations

import json

import httpx
import pytest

from qwen_inference.protocol import MAX_STOP_TOKEN_IDS

from .scripted import Scripted, client
from .test_chat_api import sse_events

HI = [{"role": "user", "content": "Say something"}]


def test_stop_strings_count_from_min_tokens(server):
    """A stop string that lies within the first min_tokens tokens does not stop the reply; one that ends after
    them does, even when it began before."""
    oai = client(server)
    with Scripted(server) as s:
        s.say("mt", " alpha beta gamma delta")
        assert len(s.ids(" alpha beta gamma delta")) == 4

        def reply(**extra) -> tuple[str, str]:
            r = oai.chat.completions.create(model="tiny", messages=HI, max_tokens=10, temperature=0,
                                            extra_headers={"X-Request-ID": "mt"}, **extra)
            return r.choices[0].message.content, r.choices[0].finish_reason

        assert reply(stop=["beta"]) == (" alpha ", "stop")
        assert reply(stop=["beta"], extra_body={"min_tokens": 3}) == (" alpha beta gamma delta", "stop")
        assert reply(stop=["gamma delta"], extra_body={"min_tokens": 3}) == (" alpha beta ", "stop")
        body = {"messages": HI, "max_tokens": 10, "temperature": 0, "stop": ["beta"], "min_tokens": 3}
        s.say("mt-s", " alpha beta gamma delta")
        r = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60,
                       headers={"X-Request-ID": "mt-s"})
        text = "".join((json.loads(e)["choices"][0]["delta"].get("content") or "")
                       for e in sse_events(r.content)[:-1] if json.loads(e)["choices"])
        assert text == " alpha beta gamma delta"


def token_bytes(choice: dict) -> list[bytes]:
    return [bytes(e["bytes"]) for e in choice["logprobs"]["content"]]


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_stop_token_ids_end_the_reply(server, route):
    body = {"messages": HI} if route.endswith("chat/completions") else {"prompt": "Once"}
    with Scripted(server) as s:
        gamma = s.ids(" alpha beta gamma delta")[2]
        for rid in ("st", "st-s"):
            s.say(rid, " alpha beta gamma delta")
        r = httpx.post(server.url + route, json={**body, "max_tokens": 10, "stop_token_ids": [gamma]}, timeout=60,
                       headers={"X-Request-ID": "st"}).json()
        choice = r["choices"][0]
        assert (choice.get("text") or choice.get("message", {}).get("content")) == " alpha beta"
        assert choice["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 3
        streamed = ""
        for e in sse_events(httpx.post(server.url + route, json={**body, "max_tokens": 10, "stream": True,
                                                                 "stop_token_ids": [gamma]},
                                       timeout=60, headers={"X-Request-ID": "st-s"}).content)[:-1]:
            for c in json.loads(e)["choices"]:
                streamed += c.get("text") or (c.get("delta") or {}).get("content") or ""
        assert streamed == " alpha beta"


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_include_stop_str_in_output_keeps_the_stop_string(server, route):
    body = {"messages": HI} if route.endswith("chat/completions") else {"prompt": "Once"}
    body = {**body, "max_tokens": 10, "stop": ["zz", "ta ga"], "include_stop_str_in_output": True}
    with Scripted(server) as s:
        for rid in ("keep", "keep-s", "drop"):
            s.say(rid, " alpha beta gamma delta")
        r = httpx.post(server.url + route, json=body, timeout=60, headers={"X-Request-ID": "keep"}).json()
        choice = r["choices"][0]
        assert (choice.get("text") or choice.get("message", {}).get("content")) == " alpha beta ga"
        assert choice["finish_reason"] == "stop"
        streamed = ""
        for e in sse_events(httpx.post(server.url + route, json={**body, "stream": True}, timeout=60,
                                       headers={"X-Request-ID": "keep-s"}).content)[:-1]:
            for c in json.loads(e)["choices"]:
                streamed += c.get("text") or (c.get("delta") or {}).get("content") or ""
        assert streamed == " alpha beta ga"
        r = httpx.post(server.url + route, json={**body, "include_stop_str_in_output": False}, timeout=60,
                       headers={"X-Request-ID": "drop"}).json()
        choice = r["choices"][0]
        assert (choice.get("text") or choice.get("message", {}).get("content")) == " alpha be"


def test_min_tokens_holds_back_the_end_marker(server):
    """The end marker forced by a bias: the reply is empty; with min_tokens 3 it is the model's own first three
    tokens (the end marker banned until then), then the end."""
    eos = server.state.model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    chat = {"messages": HI, "max_tokens": 6, "temperature": 0, "logprobs": True}
    plain = httpx.post(server.url + "/v1/chat/completions", json=chat, timeout=60).json()["choices"][0]
    forced = {**chat, "logit_bias": {str(eos): 100}}
    r = httpx.post(server.url + "/v1/chat/completions", json=forced, timeout=60).json()
    assert r["choices"][0]["message"]["content"] == "" and r["usage"]["completion_tokens"] == 1
    r = httpx.post(server.url + "/v1/chat/completions", json={**forced, "min_tokens": 3}, timeout=60).json()
    held = r["choices"][0]
    assert token_bytes(held) == token_bytes(plain)[:3]
    assert held["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 4
    done = client(server).completions.create(model="tiny", prompt="Once", max_tokens=6, temperature=0,
                                             logit_bias={str(eos): 100}, extra_body={"min_tokens": 2})
    assert done.usage.completion_tokens == 3 and done.choices[0].finish_reason == "stop"


def test_min_p_narrows_sampling(server):
    """With min_p 1 only the most likely token may be drawn: sampling at any temperature and seed gives the
    greedy reply; without it the same seeds give other replies."""
    greedy = httpx.post(server.url + "/v1/completions", json={"prompt": "Once", "max_tokens": 8, "temperature": 0},
                        timeout=60).json()["choices"][0]["text"]
    body = {"prompt": "Once", "max_tokens": 8, "temperature": 1.5, "n": 4, "seed": 11}
    narrowed = httpx.post(server.url + "/v1/completions", json={**body, "min_p": 1.0}, timeout=60).json()
    assert [c["text"] for c in narrowed["choices"]] == [greedy] * 4
    free = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    assert any(c["text"] != greedy for c in free["choices"])
    chat = client(server).chat.completions.create(model="tiny", messages=HI, max_tokens=6, temperature=1.5, seed=3,
                                                  extra_body={"min_p": 1.0})
    ref = client(server).chat.completions.create(model="tiny", messages=HI, max_tokens=6, temperature=0)
    assert chat.choices[0].message.content == ref.choices[0].message.content


@pytest.mark.parametrize("extra, param, message", [
    ({"min_p": 1.5}, "min_p", "less than or equal to 1"),
    ({"min_p": -0.1}, "min_p", "greater than or equal to 0"),
    ({"min_tokens": -1}, "min_tokens", "greater than or equal to 0"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens", "more than the reply's max_tokens"),
    ({"stop_token_ids": [5, 99999999]}, "stop_token_ids", "outside this model's vocabulary"),
    ({"stop_token_ids": [-3]}, "stop_token_ids.0", "greater than or equal to 0"),
    ({"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))}, "stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS}"),
])
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_bad_values_are_400_naming_the_field(server, route, extra, param, message):
    body = {"messages": HI} if route.endswith("chat/completions") else {"prompt": "x"}
    r = httpx.post(server.url + route, json={**body, "max_tokens": 4, **extra}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"], err

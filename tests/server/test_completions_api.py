"""POST /v1/completions (prompts as text, lists of text, token ids; streaming; echo; logprobs in the legacy
shape; n; stop; scoring a prompt with max_tokens 0) and vLLM's /tokenize and /detokenize, through the openai
client and raw HTTP, with every error path."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from .scripted import Scripted
from .test_chat_api import sse_events


@pytest.fixture
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def post(server, rid: str | None = None, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", json=body, timeout=120,
                      headers={"X-Request-ID": rid} if rid else {})


def test_openai_client_whole_and_streamed(oai, tiny_tokenizer):
    r = oai.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].finish_reason == "length" and r.choices[0].text
    assert r.usage.prompt_tokens == len(tiny_tokenizer("Once upon a time")["input_ids"])
    assert r.usage.completion_tokens == 6
    chunks = list(oai.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_default_max_tokens_is_openais_16(server):
    r = post(server, prompt="Hello", temperature=0).json()
    assert r["usage"]["completion_tokens"] == 16


def test_prompt_lists_token_ids_and_n(server, tiny_tokenizer):
    ids = tiny_tokenizer("The sky is", add_special_tokens=False)["input_ids"]
    r = post(server, prompt=["The sky is", "Grass is"], max_tokens=4, temperature=0, n=2).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]  # prompt by prompt, n choices each
    assert r["choices"][0]["text"] == r["choices"][1]["text"]  # greedy
    assert r["usage"]["completion_tokens"] == 16
    by_ids = post(server, prompt=ids, max_tokens=4, temperature=0).json()
    assert by_ids["choices"][0]["text"] == r["choices"][0]["text"]
    lists = post(server, prompt=[ids, ids], max_tokens=4, temperature=0).json()
    assert [c["text"] for c in lists["choices"]] == [r["choices"][0]["text"]] * 2
    # streamed, several prompts: each choice's pieces in order, each with its own finish
    events = [json.loads(e) for e in sse_events(post(server, prompt=["The sky is", "Grass is"], max_tokens=4,
                                                     temperature=0, n=2, stream=True).content)[:-1]]
    texts = {i: "" for i in range(4)}
    finished = set()
    for ev in events:
        [c] = ev["choices"]
        texts[c["index"]] += c["text"]
        if c["finish_reason"]:
            finished.add(c["index"])
    assert finished == {0, 1, 2, 3} and [texts[i] for i in range(4)] == [c["text"] for c in r["choices"]]


def test_echo_and_logprobs(server):
    r = post(server, prompt="Hello there", max_tokens=3, temperature=0, echo=True, logprobs=2).json()
    c = r["choices"][0]
    assert c["text"].startswith("Hello there")
    lp = c["logprobs"]
    n = r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts the first token
    assert "".join(lp["tokens"]) == c["text"]
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    for tok, lp1, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert top[tok] == pytest.approx(lp1) and len(top) in (2, 3)  # the top 2, and the chosen one
    # the generated part alone, without echo, is the tail of the echoed one
    plain = post(server, prompt="Hello there", max_tokens=3, temperature=0, logprobs=2).json()["choices"][0]
    assert plain["logprobs"]["token_logprobs"] == lp["token_logprobs"][-3:]
    assert [o + len("Hello there") for o in plain["logprobs"]["text_offset"]] == lp["text_offset"][-3:]
    # streamed: the echo comes first, with the prompt's log-probabilities
    events = [json.loads(e) for e in sse_events(post(server, prompt="Hello there", max_tokens=3, temperature=0,
                                                     echo=True, logprobs=2, stream=True).content)[:-1]]
    assert events[0]["choices"][0]["text"] == "Hello there"
    assert events[0]["choices"][0]["logprobs"]["token_logprobs"][0] is None
    assert "".join(e["choices"][0]["text"] for e in events) == c["text"]
    tokens = sum((e["choices"][0]["logprobs"]["tokens"] for e in events if e["choices"][0]["logprobs"]), [])
    assert tokens == lp["tokens"]


def test_scoring_a_prompt_with_max_tokens_zero(server):
    r = post(server, prompt="The quick brown fox", max_tokens=0, echo=True, logprobs=0).json()
    c = r["choices"][0]
    assert c["text"] == "The quick brown fox" and r["usage"]["completion_tokens"] == 0
    assert c["finish_reason"] == "length"
    assert len(c["logprobs"]["tokens"]) == r["usage"]["prompt_tokens"]
    again = post(server, prompt="The quick brown fox", max_tokens=0, echo=True, logprobs=0).json()
    assert again["choices"][0]["logprobs"] == c["logprobs"]


def test_stop_strings_and_seeds(server):
    with Scripted(server) as script:
        script.say("stop", "red green blue yellow", end=False)
        r = post(server, "stop", prompt="Colours:", max_tokens=10, stop=" blue").json()
    assert r["choices"][0]["text"] == "red green" and r["choices"][0]["finish_reason"] == "stop"
    a = post(server, prompt="x", max_tokens=6, temperature=1.0, seed=8).json()["choices"][0]["text"]
    assert a == post(server, prompt="x", max_tokens=6, temperature=1.0, seed=8).json()["choices"][0]["text"]


def test_structured_outputs_in_completions(server):
    r = post(server, prompt="Pick:", max_tokens=10, structured_outputs={"choice": ["cat", "dog"]}).json()
    assert r["choices"][0]["text"] in ("cat", "dog") and r["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "best_of": 2}, "best_of"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"prompt": [1, 2, 10**7]}, "prompt"),
    ({"prompt": [[1], [2, 10**7]]}, "prompt.1"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["a", [1]]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": "x", "n": 17}, "n"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "echo": "loud"}, "echo"),
    ({"prompt": "x", "frobnicate": 1}, "frobnicate"),
    ({"prompt": "word " * 5000}, "prompt"),
    ({"prompt": "x", "max_tokens": 10**6}, "max_tokens"),
])
def test_bad_requests_are_400_naming_the_field(server, body, param):
    r = post(server, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_best_of_equal_to_n_and_unknown_model(server):
    assert post(server, prompt="x", max_tokens=1, best_of=2, n=2).status_code == 200
    r = post(server, prompt="x", model="gpt-3.5-turbo-instruct")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_tokenize_and_detokenize(server, tiny_tokenizer):
    r = httpx.post(server.url + "/tokenize", json={"prompt": "Hello there", "return_token_strs": True}).json()
    ids = tiny_tokenizer("Hello there")["input_ids"]
    assert r == {"count": len(ids), "max_model_len": server.state.model.max_model_len, "tokens": ids,
                 "token_strs": tiny_tokenizer.convert_ids_to_tokens(ids)}
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}).json() == {"prompt": "Hello there"}
    messages = [{"role": "user", "content": "Hi"}]
    chat = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()
    used = httpx.post(server.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 1}).json()
    assert chat["count"] == used["usage"]["prompt_tokens"] and chat["token_strs"] is None
    open_turn = httpx.post(server.url + "/tokenize", json={
        "messages": messages + [{"role": "assistant", "content": "Sure, "}], "add_generation_prompt": False,
        "continue_final_message": True}).json()
    text = httpx.post(server.url + "/detokenize", json={"tokens": open_turn["tokens"]}).json()["prompt"]
    assert text.endswith("<|im_start|>assistant\nSure, ")


@pytest.mark.parametrize("route, body, param", [
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "prompt"),
    ("/tokenize", {"prompt": "x", "tools": []}, "tools"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "continue_final_message": True},
     "continue_final_message"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"nope": 1}},
     "chat_template_kwargs.nope"),
    ("/tokenize", {"prompt": "x", "model": "other"}, "model"),
    ("/detokenize", {"tokens": [1, 10**7]}, "tokens.1"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
    ("/detokenize", {"tokens": [1], "skip": True}, "skip"),
])
def test_tokenize_errors(server, route, body, param):
    r = httpx.post(server.url + route, json=body)
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["param"] == param

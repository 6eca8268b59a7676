"""Reasoning through the API: `chat_template_kwargs` (enable_thinking, preserve_thinking) reach the template,
`reasoning_effort` and --default-thinking set enable_thinking, and what the model writes between <think> and
</think> comes back as `reasoning` and `reasoning_content`, whole and streamed, whether the template opened
the block (Qwen3.5) or the model did (Qwen3)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from qwen_inference.settings import ServeSettings

from .scripted import Scripted
from .test_chat_api import sse_events

HI = [{"role": "user", "content": "What is 2 + 2?"}]


def post(server, rid: str | None = None, **body) -> httpx.Response:
    body.setdefault("messages", HI)
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120,
                      headers={"X-Request-ID": rid} if rid else {})


def prompt_text(server, **body) -> str:
    ids = httpx.post(server.url + "/tokenize", json={"messages": HI, **body}).json()["tokens"]
    return httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"]


def test_enable_thinking_and_reasoning_effort_reach_the_template(qwen35_server, qwen3_server):
    # Qwen3.5: thinking off unless asked; the generation prompt opens <think> and closes it empty when off
    assert prompt_text(qwen35_server).endswith("<think>\n\n</think>\n\n")
    on = prompt_text(qwen35_server, chat_template_kwargs={"enable_thinking": True})
    assert on.endswith("<|im_start|>assistant\n<think>\n")
    # Qwen3: thinking on unless switched off
    assert prompt_text(qwen3_server).endswith("<|im_start|>assistant\n")
    off = prompt_text(qwen3_server, chat_template_kwargs={"enable_thinking": False})
    assert off.endswith("<think>\n\n</think>\n\n")
    # reasoning_effort: none and minimal switch thinking off, every other effort on (Qwen has no budget)
    for effort, think in (("none", False), ("minimal", False), ("low", True), ("high", True), ("max", True)):
        usage = post(qwen35_server, reasoning_effort=effort, max_tokens=1).json()["usage"]
        ref = post(qwen35_server, chat_template_kwargs={"enable_thinking": think}, max_tokens=1).json()["usage"]
        assert usage["prompt_tokens"] == ref["prompt_tokens"], effort


def test_the_server_default(qwen35_server, monkeypatch):
    """--default-thinking on: requests that say nothing think; a request still decides for itself."""
    monkeypatch.setattr(qwen35_server.settings, "default_thinking", "on")
    r = post(qwen35_server, max_tokens=6).json()["choices"][0]["message"]
    assert r["reasoning"] and r["content"] == ""  # the random model never closes its thinking block
    r = post(qwen35_server, max_tokens=6, reasoning_effort="none").json()["choices"][0]["message"]
    assert r["reasoning"] is None and r["content"]
    monkeypatch.setattr(qwen35_server.settings, "default_thinking", "off")
    assert post(qwen35_server, max_tokens=6).json()["choices"][0]["message"]["reasoning"] is None


def test_thinking_token_budget(qwen35_server):
    """vLLM's thinking_token_budget: the reasoning ends after that many tokens (greedy: the same tokens up to
    there) and the answer follows, whole and streamed; 0 ends it at once."""
    think = {"chat_template_kwargs": {"enable_thinking": True}, "max_tokens": 16, "temperature": 0}
    free = post(qwen35_server, **think).json()["choices"][0]["message"]
    assert free["reasoning"] and free["content"] == ""  # the random model never closes its thinking block
    for budget in (4, 0):
        capped = post(qwen35_server, **think, thinking_token_budget=budget).json()
        msg = capped["choices"][0]["message"]
        assert msg["content"] and capped["usage"]["completion_tokens"] == 16
        assert free["reasoning"].startswith(msg["reasoning"] or "") and len(msg["reasoning"] or "") < len(
            free["reasoning"])
        if budget == 0:
            assert not msg["reasoning"]
    chunks = [json.loads(ev) for ev in sse_events(post(qwen35_server, **think, thinking_token_budget=4,
                                                      stream=True).content) if ev != "[DONE]"]
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == post(qwen35_server, **think, thinking_token_budget=4).json()["choices"][0]["message"]["content"]
    r = post(qwen35_server, thinking_token_budget=-1)
    assert r.status_code == 400 and r.json()["error"]["param"] == "thinking_token_budget"


def test_default_thinking_flag_and_env(monkeypatch):
    assert ServeSettings().default_thinking == "template"
    monkeypatch.setenv("QWEN_DEFAULT_THINKING", "off")
    assert ServeSettings().default_thinking == "off"
    with pytest.raises(ValueError):
        ServeSettings(default_thinking="sometimes")


@pytest.mark.parametrize("which, reply", [
    ("qwen35_server", "Two and two.\n</think>\n\nIt is 4."),  # the template opened the block
    ("qwen3_server", "<think>\nTwo and two.\n</think>\n\nIt is 4."),  # the model opens it
])
def test_reasoning_and_answer_whole_and_streamed(request, which, reply):
    srv = request.getfixturevalue(which)
    oai = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    with Scripted(srv) as script:
        script.say("r", reply)
        whole = oai.chat.completions.create(model="tiny", messages=HI, max_tokens=50,
                                            extra_headers={"X-Request-ID": "r"},
                                            extra_body={"chat_template_kwargs": {"enable_thinking": True}})
        raw = post(srv, "r", stream=True, max_tokens=50, chat_template_kwargs={"enable_thinking": True})
    msg = whole.choices[0].message
    assert msg.content == "It is 4." and whole.choices[0].finish_reason == "stop"
    assert msg.model_extra["reasoning"] == msg.model_extra["reasoning_content"] == "Two and two."
    deltas = [json.loads(e)["choices"][0]["delta"] for e in sse_events(raw.content)[:-1]]
    reasoning = [d for d in deltas if "reasoning" in d]
    assert all(d["reasoning"] == d["reasoning_content"] and "content" not in d for d in reasoning)
    assert "".join(d["reasoning"] for d in reasoning) == "Two and two."
    assert "".join(d.get("content", "") for d in deltas) == "It is 4."
    first_content = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert deltas.index(reasoning[-1]) < first_content  # the reasoning comes first


def test_a_reply_cut_inside_its_thinking_is_all_reasoning(qwen35_server):
    r = post(qwen35_server, max_tokens=5, chat_template_kwargs={"enable_thinking": True}).json()
    msg = r["choices"][0]["message"]
    assert r["choices"][0]["finish_reason"] == "length" and msg["content"] == "" and msg["reasoning"]


def test_no_reasoning_from_models_that_do_not_think(server):
    msg = post(server, max_tokens=3, chat_template_kwargs={"enable_thinking": True}).json()["choices"][0]["message"]
    assert msg["reasoning"] is None and msg["reasoning_content"] is None and msg["content"]


def test_past_reasoning_and_preserve_thinking(qwen35_server):
    turns = [{"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello!", "reasoning": "Greet back."},
             {"role": "user", "content": "More?"}]
    same = [dict(turns[0]), {"role": "assistant", "content": "Hello!", "reasoning_content": "Greet back."},
            dict(turns[2])]
    count = lambda msgs, **kw: httpx.post(qwen35_server.url + "/tokenize",  # noqa: E731
                                          json={"messages": msgs, **kw}).json()["count"]
    # an earlier turn keeps its reasoning only with preserve_thinking; `reasoning` and `reasoning_content` alike
    kept = count(turns, chat_template_kwargs={"preserve_thinking": True})
    assert kept == count(same, chat_template_kwargs={"preserve_thinking": True}) > count(turns)
    assert post(qwen35_server, messages=turns, max_tokens=1,
                chat_template_kwargs={"preserve_thinking": True}).json()["usage"]["prompt_tokens"] == kept


@pytest.mark.parametrize("which, body, param, words", [
    ("qwen35_server", {"chat_template_kwargs": {"no_such_switch": True}}, "chat_template_kwargs.no_such_switch",
     "does not read"),
    ("qwen3_server", {"chat_template_kwargs": {"preserve_thinking": True}}, "chat_template_kwargs.preserve_thinking",
     "does not read"),
    ("qwen35_server", {"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs.tools", "sets tools itself"),
    ("qwen35_server", {"chat_template_kwargs": {"enable_thinking": "yes"}}, "chat_template_kwargs.enable_thinking",
     "true or false"),
    ("qwen35_server", {"reasoning_effort": "none", "chat_template_kwargs": {"enable_thinking": True}},
     "reasoning_effort", "send one of them"),
    ("qwen35_server", {"reasoning_effort": "extreme"}, "reasoning_effort", "Input should be"),
    ("qwen35_server", {"messages": [{"role": "user", "content": "x", "reasoning": "no"}]}, "messages.0.reasoning",
     "assistant messages only"),
    ("qwen35_server", {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y",
                                                                       "reasoning": "a", "reasoning_content": "b"}]},
     "messages.1.reasoning_content", "differ"),
])
def test_bad_reasoning_switches_are_400(request, which, body, param, words):
    r = post(request.getfixturevalue(which), max_tokens=1, **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


def test_the_load_generator_times_a_reply_that_is_all_reasoning(qwen35_server):
    """qwen-bench counts reasoning deltas as generated tokens: a reply cut inside its thinking still has a time
    to first token (llama-server streams a Qwen3.5 reply as reasoning_content, qwen-serve as reasoning)."""
    import asyncio

    from qwen_inference.bench.load import one_request

    async def go():
        async with httpx.AsyncClient(timeout=120) as c:
            return await one_request(c, qwen35_server.url + "/v1/chat/completions", None, "Say something", 5, None,
                                     extra={"chat_template_kwargs": {"enable_thinking": True}})

    r = asyncio.run(go())
    assert r.ok and r.finish_reason == "length" and r.text == ""  # no answer, only reasoning
    assert r.ttft is not None and r.ttft > 0 and r.tokens == 5 and len(r.itl) >= 1

"""Nothing silently ignored: every field of the OpenAI request schemas, as the installed `openai` package types
them, is either honoured or refused with a 400 that names it, and each honoured one names the test that shows
its effect. A new openai release that adds a field fails here until the server decides what to do with it."""

from __future__ import annotations

import importlib
import logging
import time

import httpx
import pytest
from openai.types import completion_create_params
from openai.types.chat import (ChatCompletionAssistantMessageParam, ChatCompletionDeveloperMessageParam,
                               ChatCompletionStreamOptionsParam, ChatCompletionSystemMessageParam,
                               ChatCompletionToolMessageParam, ChatCompletionUserMessageParam, completion_create_params
                               as chat_params)

HONOURED, REFUSED = "honoured", "refused"
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}

# field: (verdict, a value that asks for something, extra fields the value needs, the test that shows the effect)
CHAT = {
    "messages": (HONOURED, [{"role": "user", "content": "hi"}], {},
                 "test_chat_api::test_multi_turn_changes_the_prompt"),
    "model": (HONOURED, "tiny", {}, "test_chat_api::test_unknown_model_is_404"),
    "audio": (REFUSED, {"voice": "alloy", "format": "mp3"}, {}, None),
    "frequency_penalty": (HONOURED, 0.5, {}, "test_engine::test_penalties"),
    "function_call": (REFUSED, "auto", {}, None),
    "functions": (REFUSED, [{"name": "f"}], {}, None),
    "logit_bias": (REFUSED, {"50": 5}, {}, None),
    "logprobs": (HONOURED, True, {}, "test_logprobs_n::test_logprobs_whole"),
    "max_completion_tokens": (HONOURED, 2, {}, "test_chat_api::test_max_completion_tokens_and_length"),
    "max_tokens": (HONOURED, 2, {}, "test_chat_api::test_openai_client_non_streaming"),
    "metadata": (REFUSED, {"k": "v"}, {}, None),
    "modalities": (REFUSED, ["text", "audio"], {}, None),
    "moderation": (REFUSED, {"model": "omni-moderation-latest"}, {}, None),
    "n": (HONOURED, 2, {}, "test_logprobs_n::test_n_choices_whole_and_streamed"),
    "parallel_tool_calls": (HONOURED, False, {"tools": [TOOL]}, "test_tools_api::test_auto_parses_whole_replies_too"),
    "prediction": (REFUSED, {"type": "content", "content": "x"}, {}, None),
    "presence_penalty": (HONOURED, 0.5, {}, "test_engine::test_penalties"),
    # a routing hint for OpenAI's cache; here every request's prompt blocks are cached alike (README)
    "prompt_cache_key": (HONOURED, "k", {}, "test_engine::test_prefix_cache_hits_give_the_same_tokens"),
    "prompt_cache_options": (REFUSED, {"mode": "explicit"}, {}, None),
    "prompt_cache_retention": (REFUSED, "24h", {}, None),
    "reasoning_effort": (HONOURED, "low", {},
                         "test_reasoning_api::test_enable_thinking_and_reasoning_effort_reach_the_template"),
    "response_format": (HONOURED, {"type": "json_object"}, {},
                        "test_structured_api::test_json_schema_strict_validates_whole_and_streamed"),
    "safety_identifier": (HONOURED, "someone", {}, "test_request_fields::test_user_fields_reach_the_access_log"),
    "seed": (HONOURED, 3, {}, "test_chat_api::test_seeded_sampling_is_reproducible"),
    "service_tier": (REFUSED, "priority", {}, None),
    "stop": (HONOURED, ["zz"], {}, "test_chat_api::test_stop_string_across_token_boundaries"),
    "store": (REFUSED, True, {}, None),
    "stream": (HONOURED, True, {}, "test_chat_api::test_sse_framing_byte_for_byte"),
    "stream_options": (HONOURED, {"include_usage": True}, {"stream": True},
                       "test_chat_api::test_sse_framing_byte_for_byte"),
    "temperature": (HONOURED, 0.5, {}, "test_engine::test_sampling_rules"),
    "tool_choice": (HONOURED, "required", {"tools": [TOOL]},
                    "test_tools_api::test_forced_calls_are_valid_even_from_random_weights"),
    "tools": (HONOURED, [TOOL], {}, "test_tools_api::test_tool_calls_and_results_reach_the_template_as_qwen_wants"),
    "top_logprobs": (HONOURED, 2, {"logprobs": True}, "test_logprobs_n::test_logprobs_whole"),
    "top_p": (HONOURED, 0.5, {}, "test_engine::test_sampling_rules"),
    "user": (HONOURED, "someone", {}, "test_request_fields::test_user_fields_reach_the_access_log"),
    "verbosity": (REFUSED, "low", {}, None),
    "web_search_options": (REFUSED, {}, {}, None),
}
# values of refused fields that ask for nothing this server does not do: accepted
CHAT_NO_OPS = {"store": False, "service_tier": "auto", "modalities": ["text"], "metadata": {}, "logit_bias": {},
               "prompt_cache_retention": "in_memory"}

COMPLETIONS = {
    "model": (HONOURED, "tiny", {}, "test_completions_api::test_best_of_equal_to_n_and_unknown_model"),
    "prompt": (HONOURED, ["a", "b"], {}, "test_completions_api::test_prompt_lists_token_ids_and_n"),
    "best_of": (REFUSED, 3, {}, None),  # only best_of == n, which returns every sequence (checked below)
    "echo": (HONOURED, True, {}, "test_completions_api::test_echo_and_logprobs"),
    "frequency_penalty": (HONOURED, 0.5, {}, "test_engine::test_penalties"),
    "logit_bias": (REFUSED, {"50": 5}, {}, None),
    "logprobs": (HONOURED, 2, {}, "test_completions_api::test_echo_and_logprobs"),
    "max_tokens": (HONOURED, 2, {}, "test_completions_api::test_openai_client_whole_and_streamed"),
    "n": (HONOURED, 2, {}, "test_completions_api::test_prompt_lists_token_ids_and_n"),
    "presence_penalty": (HONOURED, 0.5, {}, "test_engine::test_penalties"),
    "seed": (HONOURED, 3, {}, "test_completions_api::test_stop_strings_and_seeds"),
    "stop": (HONOURED, "zz", {}, "test_completions_api::test_stop_strings_and_seeds"),
    "stream_options": (HONOURED, {"include_usage": True}, {"stream": True},
                       "test_completions_api::test_openai_client_whole_and_streamed"),
    "suffix": (REFUSED, "the end", {}, None),
    "temperature": (HONOURED, 0.5, {}, "test_engine::test_sampling_rules"),
    "top_p": (HONOURED, 0.5, {}, "test_engine::test_sampling_rules"),
    "user": (HONOURED, "someone", {}, "test_request_fields::test_user_fields_reach_the_access_log"),
    "stream": (HONOURED, True, {}, "test_completions_api::test_openai_client_whole_and_streamed"),
}

# the message types of the chat schema: field -> verdict, with a message that uses it
MESSAGES = {
    ChatCompletionSystemMessageParam: {"role": HONOURED, "content": HONOURED, "name": HONOURED},
    ChatCompletionDeveloperMessageParam: {"role": HONOURED, "content": HONOURED, "name": HONOURED},
    ChatCompletionUserMessageParam: {"role": HONOURED, "content": HONOURED, "name": HONOURED},
    ChatCompletionToolMessageParam: {"role": HONOURED, "content": HONOURED, "tool_call_id": HONOURED},
    ChatCompletionAssistantMessageParam: {"role": HONOURED, "content": HONOURED, "name": HONOURED,
                                          "tool_calls": HONOURED, "audio": REFUSED, "function_call": REFUSED,
                                          "refusal": REFUSED},
}
# (annotations is no field of the request's assistant message, but of the reply a client may send back whole)
ASSISTANT_REFUSED = {"audio": {"id": "a1"}, "function_call": {"name": "f", "arguments": "{}"}, "refusal": "No.",
                     "annotations": [{"type": "url_citation"}]}
STREAM_OPTIONS = {"include_usage": HONOURED, "include_obfuscation": REFUSED}


def typed_fields(params) -> set[str]:
    return set(params.__annotations__) | {"stream"}


def proven(ref: str) -> bool:
    module, name = ref.split("::")
    for package in ("tests.server", "tests.unit"):
        try:
            mod = importlib.import_module(f"{package}.{module}")
        except ModuleNotFoundError:
            continue
        return hasattr(mod, name)
    return False


@pytest.mark.parametrize("route, table, params", [
    ("/v1/chat/completions", CHAT, chat_params.CompletionCreateParamsBase),
    ("/v1/completions", COMPLETIONS, completion_create_params.CompletionCreateParamsBase),
])
def test_every_field_of_the_openai_schema_is_honoured_or_refused(server, route, table, params):
    assert typed_fields(params) == set(table), "the openai package's fields changed: decide for each new one"
    base = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in route else {"prompt": "hi"}
    base["max_tokens"] = 2
    with httpx.Client(base_url=server.url, timeout=120) as c:
        for name, (verdict, value, extra, proof) in table.items():
            r = c.post(route, json={**base, **extra, name: value})
            if verdict == HONOURED:
                assert r.status_code == 200, (name, r.text)
                assert proof and proven(proof), f"{name}: no test shows what it does ({proof})"
            else:
                assert r.status_code == 400, (name, r.text)
                err = r.json()["error"]
                assert err["param"] == name and err["message"].startswith(f"{name}: "), err
        if "chat" in route:
            for name, value in CHAT_NO_OPS.items():
                assert c.post(route, json={**base, name: value}).status_code == 200, name
        else:
            assert c.post(route, json={**base, "best_of": 2, "n": 2}).status_code == 200


def test_every_field_of_every_message_type_is_honoured_or_refused(server):
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    samples = {
        ChatCompletionSystemMessageParam: {"role": "system", "content": "s", "name": "n"},
        ChatCompletionDeveloperMessageParam: {"role": "developer", "content": "s", "name": "n"},
        ChatCompletionUserMessageParam: {"role": "user", "content": [{"type": "text", "text": "u"}], "name": "n"},
        ChatCompletionToolMessageParam: {"role": "tool", "content": "r", "tool_call_id": "c1"},
        ChatCompletionAssistantMessageParam: {"role": "assistant", "content": "a", "name": "n", "tool_calls": [call]},
    }
    for kind, verdicts in MESSAGES.items():
        assert set(kind.__annotations__) == set(verdicts), f"{kind.__name__} changed: decide for each new field"
    assert set(ChatCompletionStreamOptionsParam.__annotations__) == set(STREAM_OPTIONS)
    with httpx.Client(base_url=server.url, timeout=120) as c:
        conversation = [{"role": "user", "content": "hi"}] + [samples[k] for k in MESSAGES if k not in (
            ChatCompletionSystemMessageParam, ChatCompletionDeveloperMessageParam)]
        for first in (samples[ChatCompletionSystemMessageParam], samples[ChatCompletionDeveloperMessageParam]):
            msgs = [first] + conversation[:1] + [samples[ChatCompletionAssistantMessageParam],
                                                 samples[ChatCompletionToolMessageParam]]
            r = c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 1, "tools": [TOOL]})
            assert r.status_code == 200, r.text
        for name, value in ASSISTANT_REFUSED.items():
            msg = {"role": "assistant", "content": "a", name: value}
            r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}, msg],
                                                     "max_tokens": 1})
            assert r.status_code == 400 and r.json()["error"]["param"] == f"messages.1.{name}", r.text
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stream": True,
                                                 "stream_options": {"include_obfuscation": True}, "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options.include_obfuscation"
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stream": True,
                                                 "stream_options": {"include_obfuscation": False}, "max_tokens": 1})
        assert r.status_code == 200


def test_unknown_fields_are_refused_by_name(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for route, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi",
                                                                    "mood": "happy"}]}),
                            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                      "guided_json": {}}),
                            ("/v1/completions", {"prompt": "hi", "min_p": 0.1})):
            r = c.post(route, json=body)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] in ("messages.0.mood", "guided_json", "min_p")
            assert "does not support this field" in err["message"]


def test_user_fields_reach_the_access_log(server, caplog):
    with caplog.at_level(logging.INFO, logger="qwen_inference.access"):
        httpx.post(server.url + "/v1/chat/completions", headers={"X-Request-ID": "who"}, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "user": "u-42",
            "safety_identifier": "s-42"})
        httpx.post(server.url + "/v1/completions", headers={"X-Request-ID": "who2"}, json={
            "prompt": "hi", "max_tokens": 1, "user": "u-43"})
        deadline = time.monotonic() + 10  # the line is written once the response is sent
        while time.monotonic() < deadline:
            lines = {r.request_id: r for r in caplog.records if getattr(r, "request_id", None) in ("who", "who2")}
            if len(lines) == 2:
                break
            time.sleep(0.02)
    assert lines["who"].user == "u-42" and lines["who"].safety_identifier == "s-42"
    assert lines["who2"].user == "u-43"

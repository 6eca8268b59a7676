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
from openai.types.responses import (easy_input_message_param, function_tool_param, input_token_count_params,
                                    response_create_params,
                                    response_format_text_json_schema_config_param, response_function_tool_call_param,
                                    response_input_param, response_input_text_param, response_output_text_param,
                                    response_reasoning_item_param, response_text_config_param,
                                    tool_choice_function_param)
from openai.types.shared_params import reasoning as reasoning_param
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
    "logit_bias": (HONOURED, {"50": 5}, {},
                   "test_logit_bias::test_a_positive_bias_forces_a_token_whole_streamed_and_in_every_choice"),
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
CHAT_NO_OPS = {"store": False, "service_tier": "auto", "modalities": ["text"], "metadata": {},
               "prompt_cache_retention": "in_memory"}

COMPLETIONS = {
    "model": (HONOURED, "tiny", {}, "test_completions_api::test_best_of_equal_to_n_and_unknown_model"),
    "prompt": (HONOURED, ["a", "b"], {}, "test_completions_api::test_prompt_lists_token_ids_and_n"),
    "best_of": (REFUSED, 3, {}, None),  # only best_of == n, which returns every sequence (checked below)
    "echo": (HONOURED, True, {}, "test_completions_api::test_echo_and_logprobs"),
    "frequency_penalty": (HONOURED, 0.5, {}, "test_engine::test_penalties"),
    "logit_bias": (HONOURED, {"50": 5}, {},
                   "test_logit_bias::test_a_positive_bias_forces_a_token_whole_streamed_and_in_every_choice"),
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

R = "test_responses_api::"
RESPONSES = {
    "input": (HONOURED, [{"role": "user", "content": "hi"}], {}, R + "test_conversation_items_render_as_chat_messages"),
    "model": (HONOURED, "tiny", {}, R + "test_unknown_model_and_route"),
    "instructions": (HONOURED, "Be brief.", {}, R + "test_same_reply_as_chat_completions_whole_and_streamed"),
    "max_output_tokens": (HONOURED, 2, {}, R + "test_same_reply_as_chat_completions_whole_and_streamed"),
    "metadata": (HONOURED, {"k": "v"}, {}, R + "test_previous_response_id_get_and_delete"),
    "parallel_tool_calls": (HONOURED, False, {"tools": [{"type": "function", "name": "f"}]},
                            R + "test_forced_function_calls_follow_the_schema"),
    "previous_response_id": (HONOURED, "<an earlier response>", {}, R + "test_previous_response_id_get_and_delete"),
    "prompt_cache_key": (HONOURED, "k", {}, "test_engine::test_prefix_cache_hits_give_the_same_tokens"),
    "reasoning": (HONOURED, {"effort": "low"}, {}, R + "test_reasoning_item_then_message"),
    "include": (HONOURED, ["reasoning.encrypted_content"], {}, R + "test_reasoning_item_then_message"),
    "safety_identifier": (HONOURED, "someone", {}, "test_request_fields::test_user_fields_reach_the_access_log"),
    "user": (HONOURED, "someone", {}, "test_request_fields::test_user_fields_reach_the_access_log"),
    "store": (HONOURED, True, {}, R + "test_previous_response_id_get_and_delete"),
    "stream": (HONOURED, True, {}, R + "test_sse_framing"),
    "temperature": (HONOURED, 0.5, {}, "test_engine::test_sampling_rules"),
    "top_p": (HONOURED, 0.5, {}, "test_engine::test_sampling_rules"),
    "text": (HONOURED, {"format": {"type": "json_object"}}, {}, R + "test_text_format_json_schema"),
    "tool_choice": (HONOURED, "required", {"tools": [{"type": "function", "name": "f"}]},
                    R + "test_forced_function_calls_follow_the_schema"),
    "tools": (HONOURED, [{"type": "function", "name": "f"}], {}, R + "test_function_call_item_whole_and_streamed"),
    "access_programs": (REFUSED, {"x": 1}, {}, None),
    "background": (HONOURED, True, {}, "test_responses_background::"
                   "test_a_background_response_is_polled_to_the_reply_a_foreground_one_gives"),
    "background_options": (HONOURED, {"completion_window": "soonest"}, {"background": True},
                           "test_responses_background::test_only_background_responses_stream_again_or_cancel"),
    "context_management": (REFUSED, [{"type": "compaction"}], {}, None),
    "conversation": (REFUSED, "conv_1", {}, None),
    "image": (REFUSED, {"size": "auto"}, {}, None),
    "max_tool_calls": (REFUSED, 3, {}, None),
    "moderation": (REFUSED, {"model": "omni-moderation-latest"}, {}, None),
    "prompt": (REFUSED, {"id": "pmpt_1"}, {}, None),
    "prompt_cache_options": (REFUSED, {"mode": "explicit"}, {}, None),
    "prompt_cache_retention": (REFUSED, "24h", {}, None),
    "service_tier": (REFUSED, "priority", {}, None),
    "stream_options": (REFUSED, {"include_obfuscation": True}, {"stream": True}, None),
    "top_logprobs": (HONOURED, 3, {"include": ["message.output_text.logprobs"]},
                     R + "test_log_probabilities_of_the_text"),
    "truncation": (HONOURED, "auto", {}, R + "test_truncation_auto_drops_the_first_turns_until_the_conversation_fits"),
}
RESPONSES_NO_OPS = {"store": False, "service_tier": "auto", "truncation": "disabled", "background": False,
                    "prompt_cache_retention": "in_memory"}

# the nested types of the Responses schema: field -> verdict; each refused field with a request that sends it
FN = {"type": "function", "name": "f"}
CALL = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
OUT = {"type": "function_call_output", "call_id": "c1", "output": "ok"}
RS = {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "r"}]}
USER = {"role": "user", "content": "hi"}
RESPONSE_TYPES = [
    (easy_input_message_param.EasyInputMessageParam, {"content": HONOURED, "role": HONOURED, "type": HONOURED,
                                                      "phase": HONOURED}),
    (response_input_param.Message, {"content": HONOURED, "role": HONOURED, "status": HONOURED, "type": HONOURED}),
    (response_function_tool_call_param.ResponseFunctionToolCallParam, {
        "arguments": HONOURED, "call_id": HONOURED, "id": HONOURED, "name": HONOURED, "status": HONOURED,
        "type": HONOURED, "async": ({"input": [USER, {**CALL, "async": True}]}, "input.1.async"),
        "caller": ({"input": [USER, {**CALL, "caller": {"type": "program", "caller_id": "p"}}]}, "input.1.caller"),
        "namespace": ({"input": [USER, {**CALL, "namespace": "ns"}]}, "input.1.namespace")}),
    (response_input_param.FunctionCallOutput, {
        "call_id": HONOURED, "id": HONOURED, "name": HONOURED, "output": HONOURED, "status": HONOURED,
        "type": HONOURED,
        "caller": ({"input": [USER, CALL, {**OUT, "caller": {"type": "program", "caller_id": "p"}}]},
                   "input.2.caller"),
        "namespace": ({"input": [USER, CALL, {**OUT, "namespace": "ns"}]}, "input.2.namespace")}),
    (response_reasoning_item_param.ResponseReasoningItemParam, {
        "content": HONOURED, "encrypted_content": HONOURED, "id": HONOURED, "status": HONOURED, "summary": HONOURED,
        "type": HONOURED}),
    # completion_window "soonest" (the default) and continuation_id (a hint) ask for what every request gets
    (response_create_params.BackgroundOptions, {
        "completion_window": ({"background": True, "background_options": {"completion_window": "8h"}},
                              "background_options.completion_window"),
        "continuation_id": HONOURED}),
    (response_input_text_param.ResponseInputTextParam, {"text": HONOURED, "type": HONOURED,
                                                        "prompt_cache_breakpoint": HONOURED}),
    (response_output_text_param.ResponseOutputTextParam, {
        "text": HONOURED, "type": HONOURED, "logprobs": HONOURED,
        "annotations": ({"input": [USER, {"role": "assistant", "content": [
            {"type": "output_text", "text": "a", "annotations": [{"type": "url_citation"}]}]}]},
            "input.1.content.0.annotations")}),
    (function_tool_param.FunctionToolParam, {
        "description": HONOURED, "name": HONOURED, "parameters": HONOURED, "strict": HONOURED, "type": HONOURED,
        "allowed_callers": ({"tools": [{**FN, "allowed_callers": ["program"]}]}, "tools.0.allowed_callers"),
        "async": ({"tools": [{**FN, "async": True}]}, "tools.0.async"),
        "defer_loading": ({"tools": [{**FN, "defer_loading": True}]}, "tools.0.defer_loading"),
        "output_schema": ({"tools": [{**FN, "output_schema": {"type": "object"}}]}, "tools.0.output_schema")}),
    (tool_choice_function_param.ToolChoiceFunctionParam, {"name": HONOURED, "type": HONOURED}),
    (response_text_config_param.ResponseTextConfigParam, {
        "format": HONOURED, "verbosity": ({"text": {"verbosity": "low"}}, "text.verbosity")}),
    (response_format_text_json_schema_config_param.ResponseFormatTextJSONSchemaConfigParam, {
        "description": HONOURED, "name": HONOURED, "schema": HONOURED, "strict": HONOURED, "type": HONOURED}),
    (reasoning_param.Reasoning, {
        "effort": HONOURED, "context": ({"reasoning": {"context": "auto"}}, "reasoning.context"),
        "mode": ({"reasoning": {"mode": "auto"}}, "reasoning.mode"),
        "generate_summary": ({"reasoning": {"generate_summary": "auto"}}, "reasoning.generate_summary"),
        "summary": ({"reasoning": {"summary": "auto"}}, "reasoning.summary")}),
    (response_create_params.StreamOptions, {
        "include_obfuscation": ({"stream": True, "stream_options": {"include_obfuscation": True}},
                                "stream_options.include_obfuscation")}),
]

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
    ("/v1/responses", RESPONSES, response_create_params.ResponseCreateParamsBase),
])
def test_every_field_of_the_openai_schema_is_honoured_or_refused(server, route, table, params):
    assert typed_fields(params) == set(table), "the openai package's fields changed: decide for each new one"
    if route == "/v1/responses":
        base = {"input": "hi", "max_output_tokens": 2}
    else:
        base = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in route else {"prompt": "hi"}
        base["max_tokens"] = 2
    with httpx.Client(base_url=server.url, timeout=120) as c:
        for name, (verdict, value, extra, proof) in table.items():
            if name == "previous_response_id":
                value = c.post(route, json=base).json()["id"]
            r = c.post(route, json={**base, **extra, name: value})
            if verdict == HONOURED:
                assert r.status_code == 200, (name, r.text)
                assert proof and proven(proof), f"{name}: no test shows what it does ({proof})"
            else:
                assert r.status_code == 400, (name, r.text)
                err = r.json()["error"]
                assert err["param"].split(".")[0] == name and err["message"].startswith(err["param"] + ": "), err
        if "chat" in route:
            for name, value in CHAT_NO_OPS.items():
                assert c.post(route, json={**base, name: value}).status_code == 200, name
        elif route == "/v1/responses":
            for name, value in RESPONSES_NO_OPS.items():
                assert c.post(route, json={**base, name: value}).status_code == 200, name
        else:
            assert c.post(route, json={**base, "best_of": 2, "n": 2}).status_code == 200


INPUT_TOKENS = {name: RESPONSES[name] for name in (
    "input", "instructions", "model", "parallel_tool_calls", "previous_response_id", "reasoning", "text",
    "tool_choice", "tools", "conversation", "truncation")} | {"personality": (REFUSED, "friendly", {}, None)}


def test_every_field_of_the_input_token_count_is_honoured_or_refused(server):
    assert typed_fields(input_token_count_params.InputTokenCountParams) - {"stream"} == set(INPUT_TOKENS)
    with httpx.Client(base_url=server.url, timeout=120) as c:
        for name, (verdict, value, extra, _) in INPUT_TOKENS.items():
            if name == "previous_response_id":
                value = c.post("/v1/responses", json={"input": "hi", "max_output_tokens": 1}).json()["id"]
            r = c.post("/v1/responses/input_tokens", json={"input": "hi", **extra, name: value})
            if verdict == HONOURED:
                assert r.status_code == 200 and r.json()["input_tokens"] > 0, (name, r.text)
            else:
                assert r.status_code == 400 and r.json()["error"]["param"] == name, (name, r.text)


def test_every_field_of_the_responses_types_is_honoured_or_refused(server):
    """The items, tools and settings a Responses request nests: each field honoured (a request that uses them all
    is answered) or refused naming it."""
    everything = [
        {"type": "message", "role": "developer", "content": [
            {"type": "input_text", "text": "Be brief.", "prompt_cache_breakpoint": True}], "status": "completed"},
        {"role": "user", "content": "hi", "phase": "final_answer"},
        {**RS, "id": "rs_1", "status": "completed", "encrypted_content": None},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "a", "annotations": [], "logprobs": []}]},
        {**CALL, "id": "fc_1", "status": "completed"}, {**OUT, "id": "fco_1", "status": "completed", "name": "f"}]
    tool = {**FN, "description": "d", "parameters": {"type": "object", "properties": {}}, "strict": True}
    schema = {"type": "json_schema", "name": "s", "description": "d", "schema": {"type": "object"}, "strict": False}
    with httpx.Client(base_url=server.url, timeout=120) as c:
        r = c.post("/v1/responses", json={"input": everything, "tools": [tool], "max_output_tokens": 2,
                                          "tool_choice": {"type": "function", "name": "f"}, "store": False})
        assert r.status_code == 200, r.text
        r = c.post("/v1/responses", json={"input": "hi", "text": {"format": schema}, "max_output_tokens": 2,
                                          "reasoning": {"effort": "none"}, "store": False})
        assert r.status_code == 200, r.text
        for kind, verdicts in RESPONSE_TYPES:
            assert set(kind.__annotations__) | {a for a in verdicts if a == "async"} == set(verdicts), \
                f"{kind.__name__} changed: decide for each new field"
            for name, verdict in verdicts.items():
                if verdict == HONOURED:
                    continue
                body, param = verdict
                r = c.post("/v1/responses", json={"input": "hi", "max_output_tokens": 2, **body})
                assert r.status_code == 400 and r.json()["error"]["param"] == param, (kind.__name__, name, r.text)


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
                            ("/v1/completions", {"prompt": "hi", "skip_special_tokens": False})):
            r = c.post(route, json=body)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] in ("messages.0.mood", "guided_json", "skip_special_tokens")
            assert "does not support this field" in err["message"]


def test_user_fields_reach_the_access_log(server, caplog):
    with caplog.at_level(logging.INFO, logger="qwen_inference.access"):
        httpx.post(server.url + "/v1/chat/completions", headers={"X-Request-ID": "who"}, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "user": "u-42",
            "safety_identifier": "s-42"})
        httpx.post(server.url + "/v1/completions", headers={"X-Request-ID": "who2"}, json={
            "prompt": "hi", "max_tokens": 1, "user": "u-43"})
        httpx.post(server.url + "/v1/responses", headers={"X-Request-ID": "who3"}, json={
            "input": "hi", "max_output_tokens": 1, "user": "u-44", "safety_identifier": "s-44"})
        deadline = time.monotonic() + 10  # the line is written once the response is sent
        while time.monotonic() < deadline:
            lines = {r.request_id: r for r in caplog.records
                     if getattr(r, "request_id", None) in ("who", "who2", "who3")}
            if len(lines) == 3:
                break
            time.sleep(0.02)
    assert lines["who"].user == "u-42" and lines["who"].safety_identifier == "s-42"
    assert lines["who2"].user == "u-43"
    assert lines["who3"].user == "u-44" and lines["who3"].safety_identifier == "s-44"

"""Tools through the API: the chat template gets `tools`, past tool calls and tool results the way Qwen's
templates want them; `tool_choice` "required" and a named function are held by a grammar (so even random
weights call a tool with valid arguments), "auto" parses what the model writes (Hermes JSON for Qwen2.5 and
Qwen3, XML for Qwen3.5), "none" leaves tools out; calls are streamed as OpenAI tool_calls deltas, checked byte
for byte; every malformed tools request is a 400 naming the field."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest

from .scripted import Scripted, client

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["zone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME, "strict": True}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
XML_CALL = ('<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n'
            '</parameter>\n</function>\n</tool_call>')


def post(server, rid: str | None = None, **body) -> httpx.Response:
    body.setdefault("messages", [{"role": "user", "content": "What is the weather in Paris?"}])
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120,
                      headers={"X-Request-ID": rid} if rid else {})


def call_of(server) -> str:
    return XML_CALL if server.state.model.tokenizer.vocab_size > 200000 else HERMES_CALL


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_calls_are_valid_even_from_random_weights(srv, tool_choice):
    for seed in (1, 2):
        r = client(srv).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS, tool_choice=tool_choice,
            parallel_tool_calls=False, max_tokens=200, temperature=1.0, seed=seed)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.type == "function" and re.fullmatch(r"call_[0-9a-f]{24}", call.id)
        if isinstance(tool_choice, dict):
            assert call.function.name == "get_time"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_forced_calls_stream_name_first_then_arguments(srv):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS, max_tokens=200,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=1.0, seed=9)
    whole = client(srv).chat.completions.create(**kwargs)
    chunks = list(client(srv).chat.completions.create(stream=True, **kwargs))
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    head = deltas[0][0]
    assert head.index == 0 and head.id.startswith("call_") and head.type == "function"
    assert head.function.name == "get_weather" and head.function.arguments == ""
    assert all(d[0].id is None and d[0].function.name is None for d in deltas[1:])
    assert len(deltas) > 3  # the arguments come in fragments, as the model writes them
    args = "".join(d[0].function.arguments for d in deltas)
    assert args == whole.choices[0].message.tool_calls[0].function.arguments
    jsonschema.validate(json.loads(args), WEATHER)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_parallel_calls_with_required(server):
    """parallel_tool_calls (the default) lets the grammar go on with more calls; each one is valid."""
    r = post(server, tools=TOOLS, tool_choice="required", max_tokens=400, temperature=1.0, seed=4).json()
    calls = r["choices"][0]["message"]["tool_calls"]
    assert calls and len({c["id"] for c in calls}) == len(calls)
    complete = calls if r["choices"][0]["finish_reason"] == "tool_calls" else calls[:-1]
    for c in complete:
        jsonschema.validate(json.loads(c["function"]["arguments"]), SCHEMAS[c["function"]["name"]])


def normalized(raw: bytes) -> str:
    text = raw.decode()
    text = re.sub(r'"created":\d+', '"created":0', text)
    return re.sub(r'"call_[0-9a-f]{24}"', '"call_X"', text)


def event(delta: str, finish: str = "null") -> str:
    return ('data: {"id":"chatcmpl-frame","object":"chat.completion.chunk","created":0,"model":"tiny","choices":'
            f'[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{finish}}}]}}\n\n')


def call_delta(args: str) -> str:
    return '{"tool_calls":[{"index":0,"function":{"arguments":' + json.dumps(args) + '}}]}'


HEAD = '{"tool_calls":[{"index":0,"id":"call_X","type":"function","function":{"name":"get_weather","arguments":""}}]}'


def test_auto_tool_call_sse_framing_byte_for_byte(srv):
    """"auto": the model writes text and a call; the call goes out once its block closes and parses: one delta
    with its id and name, one with the arguments, then finish_reason tool_calls."""
    with Scripted(srv) as script:
        script.say("frame", "Sure.\n" + ("\n" if call_of(srv) == XML_CALL else "") + call_of(srv))
        r = post(srv, "frame", tools=TOOLS, stream=True, max_tokens=100)
    want = (event('{"role":"assistant","content":""}') + event('{"content":"Sure"}') + event('{"content":"."}')
            + event(HEAD) + event(call_delta('{"city": "Paris", "days": 3}')) + event("{}", '"tool_calls"')
            + "data: [DONE]\n\n")
    assert normalized(r.content) == want


def test_named_tool_call_sse_framing_byte_for_byte(srv):
    """A forced call streams as the model writes it: id and name first, then the arguments fragment by
    fragment (the model's own tokens, through the grammar)."""
    xml = call_of(srv) == XML_CALL
    with Scripted(srv) as script:
        script.say("frame", call_of(srv))
        r = post(srv, "frame", tools=TOOLS, stream=True, max_tokens=100,
                 tool_choice={"type": "function", "function": {"name": "get_weather"}})
    fragments = (['{"city": ', '"Paris"', ', "days": ', "3", "}"] if xml else  # an enum: sent whole
                 ['{"', "city", '":', ' "', "Paris", '",', ' "', "days", '":', " ", "3", "}"])
    want = (event('{"role":"assistant","content":""}') + event(HEAD) + "".join(event(call_delta(f)) for f in fragments)
            + event("{}", '"tool_calls"') + "data: [DONE]\n\n")
    assert normalized(r.content) == want


def test_auto_parses_whole_replies_too(srv):
    with Scripted(srv) as script:
        script.say("whole", "Let me look.\n\n" + call_of(srv) + "\n" + call_of(srv).replace("Paris", "Oslo"))
        r = client(srv).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather?"}],
                                                tools=TOOLS, max_tokens=200, extra_headers={"X-Request-ID": "whole"})
        one = post(srv, "whole", tools=TOOLS, max_tokens=200, parallel_tool_calls=False).json()
    msg = r.choices[0].message
    assert msg.content == "Let me look." and r.choices[0].finish_reason == "tool_calls"
    assert [json.loads(c.function.arguments) for c in msg.tool_calls] == [{"city": "Paris", "days": 3},
                                                                          {"city": "Oslo", "days": 3}]
    # parallel_tool_calls false with "auto": no grammar holds the model to one call, so the first one is kept
    assert [c["function"]["name"] for c in one["choices"][0]["message"]["tool_calls"]] == ["get_weather"]
    assert json.loads(one["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])["city"] == "Paris"


def test_a_tool_loop_with_the_openai_client(srv):
    """The usual loop: the model calls a tool, the client sends the reply back (as the SDK's object, or as its
    model_dump(), every field included) with the tool's result, and the model answers."""
    oai = client(srv)
    for dump in (False, True):
        with Scripted(srv) as script:
            script.say("call", call_of(srv))
            script.say("answer", "It is sunny in Paris.")
            messages: list = [{"role": "user", "content": "Weather in Paris?"}]
            first = oai.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=100,
                                                extra_headers={"X-Request-ID": "call"})
            reply = first.choices[0].message
            messages.append(reply.model_dump() if dump else reply)
            messages.append({"role": "tool", "tool_call_id": reply.tool_calls[0].id, "content": "Sunny, 24 C"})
            final = oai.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=100,
                                                extra_headers={"X-Request-ID": "answer"})
        assert final.choices[0].message.content == "It is sunny in Paris."
        assert final.choices[0].finish_reason == "stop"


def test_malformed_call_stays_content(server):
    with Scripted(server) as script:
        script.say("bad", '<tool_call>\n{"name": "get_weather", "arguments": [1, 2]}\n</tool_call>')
        r = post(server, "bad", tools=TOOLS, max_tokens=100).json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
    assert choice["message"]["content"].startswith("<tool_call>")


def test_a_call_inside_the_thinking_block_is_found(qwen3_server):
    with Scripted(qwen3_server) as script:
        script.say("think", "<think>\nI need the weather.\n" + HERMES_CALL + "\n</think>\n\n")
        msg = client(qwen3_server).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS, max_tokens=200,
            extra_headers={"X-Request-ID": "think"}).choices[0]
    assert msg.finish_reason == "tool_calls"
    assert msg.message.model_extra["reasoning"] == "I need the weather."
    assert json.loads(msg.message.tool_calls[0].function.arguments) == {"city": "Paris", "days": 3}


def test_tool_choice_none_leaves_tools_out(server, tiny_tokenizer):
    with Scripted(server) as script:
        script.say("none", HERMES_CALL)
        r = post(server, "none", tools=TOOLS, tool_choice="none", max_tokens=100).json()
    msg = r["choices"][0]["message"]
    assert msg["content"] == HERMES_CALL and "tool_calls" not in msg  # not parsed: the model may not call
    plain = post(server, max_tokens=1).json()
    assert r["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]  # no tools in the prompt


def conversation(arguments: str = '{"city": "Paris", "days": 3}') -> list[dict]:
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "Sunny, 24 C"}]},
    ]


def test_tool_calls_and_results_reach_the_template_as_qwen_wants(srv):
    """Past calls reach the template with their arguments as an object (Qwen3.5's template iterates over them),
    tool results as text; what the prompt holds is checked through /tokenize and /detokenize."""
    tok = srv.state.model.tokenizer
    r = httpx.post(srv.url + "/tokenize", json={"messages": conversation(), "tools": TOOLS}).json()
    text = httpx.post(srv.url + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"]
    if call_of(srv) == XML_CALL:
        assert XML_CALL in text
    else:
        assert HERMES_CALL in text
    assert "<tool_response>\nSunny, 24 C\n</tool_response>" in text
    assert '"name": "get_weather"' in text  # the tools' signatures
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
             "name": "get_weather", "arguments": {"city": "Paris", "days": 3}}}]},
         {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 C"}],
        tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert r["tokens"] == tok(rendered, add_special_tokens=False)["input_ids"]
    done = post(srv, messages=conversation(), tools=TOOLS, max_tokens=2).json()
    assert done["usage"]["prompt_tokens"] == r["count"]


@pytest.mark.parametrize("change, param, words", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "not among the tools"),
    ({"tool_choice": "sometimes"}, "tool_choice", "'none', 'auto', 'required'"),
    ({"tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}}, "tool_choice",
     "'allowed_tools' is not supported"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0]", "'type': 'function'"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name", "letters"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1].function.name", "defined twice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters", "of an object"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 3}}}]},
     "tools[0].function.parameters", "not a valid JSON schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}}}], "tool_choice": "required"},
     "tools[0].function.parameters", "uniqueItems"),
    ({"tools": [], "tool_choice": "required"}, "tool_choice", "at least one tool"),
    ({"tools": TOOLS, "parallel_tool_calls": "maybe"}, "parallel_tool_calls", "boolean"),
    ({"messages": conversation("not json")}, "messages.1.tool_calls.0.function.arguments", "JSON object"),
    ({"messages": conversation("[1]")}, "messages.1.tool_calls.0.function.arguments", "JSON object"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id", "needs tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages.0.tool_calls", "assistant"),
    ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages.0.role", "'tool'"),
])
def test_bad_tools_are_400_naming_the_field(server, change, param, words):
    body = {"tools": TOOLS, **change}
    r = post(server, max_tokens=2, **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err

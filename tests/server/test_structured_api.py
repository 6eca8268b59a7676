"""Structured output through the API: `response_format` (json_object, json_schema with strict) and vLLM's
`structured_outputs` (json, regex, choice, grammar) held by a grammar, so that even the random-weight models
answer text that validates; every way to ask wrongly gets a 400 naming the field; a stream cut off with a
grammar active frees its slot, its blocks and its grammar state."""

from __future__ import annotations

import gc
import json
import logging
import re
import time

from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from qwen_inference.structured import TokenConstraint

from .scripted import Scripted, client as oai
from .test_chat_api import sse_events

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


def post(server, **body):
    body.setdefault("messages", [{"role": "user", "content": "Describe someone."}])
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)


def test_json_schema_strict_validates_whole_and_streamed(srv):
    client = oai(srv)
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Who?"}],
                                       response_format=JSON_SCHEMA, max_tokens=400, seed=7, temperature=1.0)
    choice = r.choices[0]
    assert choice.finish_reason == "stop"  # the grammar is complete: the reply ends there
    value = json.loads(choice.message.content)
    jsonschema.validate(value, PERSON)
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Who?"}],
                                            response_format=JSON_SCHEMA, max_tokens=400, seed=7, temperature=1.0,
                                            stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == "stop"


class Visitor(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)
    kind: Literal["guest", "member"]
    badges: list[Literal["gold", "silver"]] = Field(max_length=2)


def test_the_openai_clients_parse_helpers(srv):
    """`chat.completions.parse` turns a pydantic model into a strict json_schema (and `pydantic_function_tool`
    into a strict tool) and reads the reply back into the model."""
    client = oai(srv)
    r = client.chat.completions.parse(model="tiny", messages=[{"role": "user", "content": "Who came?"}],
                                      response_format=Visitor, max_tokens=300, seed=2, temperature=1.0)
    assert isinstance(r.choices[0].message.parsed, Visitor)
    r = client.chat.completions.parse(model="tiny", messages=[{"role": "user", "content": "Log a visitor"}],
                                      tools=[openai.pydantic_function_tool(Visitor, name="log_visitor")],
                                      tool_choice="required", parallel_tool_calls=False, max_tokens=300, seed=2)
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "log_visitor" and isinstance(call.function.parsed_arguments, Visitor)


def test_json_object_and_several_choices(server):
    r = oai(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "JSON please"}],
                                            response_format={"type": "json_object"}, max_tokens=300, n=3,
                                            temperature=1.0, seed=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    replies = []
    for c in r.choices:
        if c.finish_reason == "stop":  # an object may be cut by max_tokens; a finished one must parse
            assert isinstance(json.loads(c.message.content), dict)
        else:
            assert c.message.content.lstrip().startswith("{")
        replies.append(c.message.content)
    assert len(set(replies)) > 1  # every choice has its own grammar state and its own draws


def grammar_seconds(server) -> float:
    text = httpx.get(server.url + "/metrics").text
    return float(next(line.split()[1] for line in text.splitlines()
                      if line.startswith("qwen_structured_output_seconds_total ")))


def test_grammar_work_is_counted(server):
    before = grammar_seconds(server)
    assert post(server, max_tokens=8, temperature=0).status_code == 200
    assert grammar_seconds(server) == before  # free text costs the grammar nothing
    assert post(server, max_tokens=8, response_format={"type": "json_object"}).status_code == 200
    assert grammar_seconds(server) > before


def test_response_format_text_is_free_text(server):
    r = post(server, response_format={"type": "text"}, max_tokens=4, temperature=0)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("spec, check", [
    ({"regex": "(yes|no), [0-9]{3}"}, lambda t: re.fullmatch(r"(yes|no), [0-9]{3}", t)),
    ({"choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
    ({"grammar": 'root ::= "The answer is " [0-9] [0-9]? "."'}, lambda t: re.fullmatch(r"The answer is \d\d?\.", t)),
    ({"json": json.dumps({"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 2})},
     lambda t: len(json.loads(t)) == 2 and all(isinstance(x, bool) for x in json.loads(t))),
    ({"json": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
               "additionalProperties": False}}, lambda t: isinstance(json.loads(t)["ok"], bool)),
])
def test_structured_outputs(server, spec, check):
    for stream in (False, True):
        r = post(server, structured_outputs=spec, max_tokens=200, temperature=1.0, seed=5, stream=stream)
        assert r.status_code == 200, r.text
        if stream:
            bodies = [json.loads(e) for e in sse_events(r.content)[:-1]]
            text = "".join(b["choices"][0]["delta"].get("content") or "" for b in bodies)
            finish = bodies[-1]["choices"][0]["finish_reason"]
        else:
            text, finish = r.json()["choices"][0]["message"]["content"], r.json()["choices"][0]["finish_reason"]
        assert finish == "stop" and check(text), text


def test_thinking_is_free_and_the_answer_follows_the_schema(qwen35_server):
    """Qwen3.5 with thinking on: the reasoning is not constrained; after </think> the grammar holds."""
    with Scripted(qwen35_server) as script:
        script.say("think-json", "Let me fill in a person.\n</think>\n\n", end=False)
        r = httpx.post(qwen35_server.url + "/v1/chat/completions", headers={"X-Request-ID": "think-json"}, json={
            "messages": [{"role": "user", "content": "Who?"}], "response_format": JSON_SCHEMA, "max_tokens": 400,
            "seed": 1, "chat_template_kwargs": {"enable_thinking": True}}, timeout=120)
    msg = r.json()["choices"][0]["message"]
    assert msg["reasoning"] == "Let me fill in a person."
    jsonschema.validate(json.loads(msg["content"]), PERSON)


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema", "not a valid JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
        "type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}},
     "response_format.json_schema.schema", "'not' is not enforced"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
        "type": "array", "uniqueItems": True}}}}, "response_format.json_schema.schema", "uniqueItems"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}},
     "response_format.json_schema.name", "letters"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}}},
     "response_format.json_schema.strict", "boolean"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
    ({"response_format": {"type": "json_object", "schema": {}}}, "response_format.schema", "not supported"),
    ({"response_format": "json"}, "response_format", "object"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "non-empty"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex", "cannot compile"),
    ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs.grammar", "cannot compile"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json", "not valid JSON"),
    ({"structured_outputs": {"whitespace": "none"}}, "structured_outputs.whitespace", "not supported"),
    ({"structured_outputs": {"json_object": True}, "response_format": {"type": "json_object"}},
     "structured_outputs", "cannot be combined"),
    ({"response_format": {"type": "json_object"}, "tool_choice": "required", "tools": [
        {"type": "function", "function": {"name": "f"}}]}, "response_format", "cannot be combined"),
])
def test_bad_constraints_are_400_naming_the_field(server, body, param, words):
    r = post(server, max_tokens=4, **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


def test_not_strict_leaves_unenforceable_keywords_and_answers(server, caplog):
    schema = {"type": "object", "properties": {"a": {"type": "integer", "not": {"const": 3}}}, "required": ["a"]}
    with caplog.at_level(logging.WARNING, logger="qwen_inference.serving"):
        r = httpx.post(server.url + "/v1/chat/completions", headers={"X-Request-ID": "lenient"}, timeout=120, json={
            "messages": [{"role": "user", "content": "x"}], "max_tokens": 100, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    assert r.status_code == 200
    assert isinstance(json.loads(r.json()["choices"][0]["message"]["content"])["a"], int)
    [note] = [rec for rec in caplog.records if getattr(rec, "request_id", None) == "lenient"]
    assert note.not_enforced == ["/properties/a: 'not' is not enforced"]


def live_constraints() -> int:
    gc.collect()
    return sum(type(o) is TokenConstraint for o in gc.get_objects())


@pytest.mark.parametrize("n", [1, 2])
def test_a_stream_cut_off_with_a_grammar_frees_its_slot_and_grammar_state(srv, n):
    engine = srv.state.model.engine
    before = live_constraints()
    endless = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
    body = {"messages": [{"role": "user", "content": "Tell a long story"}], "max_tokens": 1500, "n": n,
            "stream": True, "temperature": 1.0, "response_format": {"type": "json_schema", "json_schema": {
                "name": "story", "schema": endless}}}
    with httpx.Client(timeout=120) as c:
        with c.stream("POST", srv.url + "/v1/chat/completions", json=body) as r:
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                    seen += 1
                if seen >= 5:
                    assert engine.stats()["running"] == n and live_constraints() >= before + n
                    break  # the client goes away mid-reply
    deadline = time.monotonic() + 30
    while engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = engine.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert engine.allocator.used_blocks == 0 and engine.allocator.reserved == 0
    assert stats["state_usage"] == 0.0
    assert live_constraints() == before

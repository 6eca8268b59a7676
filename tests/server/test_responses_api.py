"""The Responses API (/v1/responses) through the official client: the same prompt and reply as chat completions
for the same conversation (instructions, messages, function calls and their outputs, reasoning sent back,
previous_response_id); output items in the order the model writes them, whole and streamed (the client's own
stream helper checks the events' order and identities); tools and text formats held by a grammar; stored
responses read, chained and deleted; every refused field a 400 naming it."""

from __future__ import annotations

import base64
import json

import httpx
import jsonschema
import openai
import pytest

from qwen_inference.protocol import ResponsesRequest
from qwen_inference.serving_responses import ResponseStore, Stored, encrypt_reasoning, to_messages

from .scripted import Scripted, client, failing
from .test_soak import metric
from .test_tools_api import SCHEMAS, TOOLS, WEATHER, call_of

FUNCTIONS = [{"type": "function", **t["function"]} for t in TOOLS]  # the Responses shape: flat
QUESTION = "What is the weather in Paris?"


def post(server, rid: str | None = None, **body) -> httpx.Response:
    body.setdefault("input", QUESTION)
    return httpx.post(server.url + "/v1/responses", json=body, timeout=120,
                      headers={"X-Request-ID": rid} if rid else {})


def chat(server, messages, **body) -> dict:
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": messages, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def events_of(raw: bytes) -> list[dict]:
    """The SSE events of a streamed response: each an `event:` line naming its type and a `data:` line."""
    out = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        ev = json.loads(data[len("data: "):])
        assert ev["type"] == name[len("event: "):]
        out.append(ev)
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    return out


def test_same_reply_as_chat_completions_whole_and_streamed(srv):
    oai = client(srv)
    r = oai.responses.create(model="tiny", input=QUESTION, instructions="Answer briefly.", max_output_tokens=12,
                             temperature=0)
    ref = chat(srv, [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}],
               max_tokens=12, temperature=0)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "tiny"
    assert r.output_text == ref["choices"][0]["message"]["content"]
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.input_tokens == ref["usage"]["prompt_tokens"] and r.usage.output_tokens == 12
    assert r.usage.total_tokens == r.usage.input_tokens + 12 and r.usage.output_tokens_details.reasoning_tokens == 0
    [msg] = r.output
    assert msg.type == "message" and msg.role == "assistant" and msg.status == "incomplete"
    assert msg.id.startswith("msg_") and msg.content[0].type == "output_text"
    with oai.responses.stream(model="tiny", input=QUESTION, instructions="Answer briefly.", max_output_tokens=12,
                              temperature=0) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    final = events[-1].response
    assert final.output_text == r.output_text and final.usage.output_tokens == 12
    # a reply that ends by itself: completed
    with Scripted(srv) as script:
        script.say("ends", "Hello.")
        done = oai.responses.create(model="tiny", input="Hi", max_output_tokens=30,
                                    extra_headers={"X-Request-ID": "ends"})
    assert done.output_text == "Hello." and done.status == "completed" and done.incomplete_details is None
    assert done.output[0].status == "completed"


def test_sse_framing(server):
    raw = post(server, stream=True, max_output_tokens=3, temperature=0).content
    events = events_of(raw)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.incomplete"]
    created = events[0]["response"]
    assert created["status"] == "in_progress" and created["output"] == [] and created["usage"] is None
    item = events[2]["item"]
    assert item["status"] == "in_progress" and item["content"] == [] and events[2]["output_index"] == 0
    assert all(e["item_id"] == item["id"] for e in events[3:9])
    last = events[-1]["response"]
    assert last["id"] == created["id"] and last["output"][0] == events[-2]["item"]


def test_conversation_items_render_as_chat_messages(srv):
    """Earlier turns sent as items — an assistant message, a function call and its output, with reasoning —
    make the very prompt the same conversation makes in chat completions."""
    args = json.dumps({"city": "Paris", "days": 3})
    items = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
             {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "Look it up."}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking.",
                                                                    "annotations": []}]},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": args},
             {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 21 C"}]
    r = post(srv, input=items, tools=FUNCTIONS, max_output_tokens=8, temperature=0, store=False).json()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION},
                {"role": "assistant", "content": "Checking.", "reasoning_content": "Look it up.", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": args}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}]
    ref = chat(srv, messages, tools=TOOLS, max_tokens=8, temperature=0)
    assert r["usage"]["input_tokens"] == ref["usage"]["prompt_tokens"]
    assert r["output"][0]["content"][0]["text"] == ref["choices"][0]["message"]["content"]
    # the same without the reasoning item: a different prompt (the reasoning was read)
    plain = post(srv, input=items[:2] + items[3:], tools=FUNCTIONS, max_output_tokens=1, store=False).json()
    if srv.state.model.tokenizer.vocab_size > 200000:  # Qwen3.5 keeps reasoning after the last user message
        assert plain["usage"]["input_tokens"] < r["usage"]["input_tokens"]


def test_to_messages_groups_an_assistant_turn():
    req = ResponsesRequest.model_validate({"input": [
        {"role": "user", "content": "a"},
        {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "r1"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{\"x\": 1}"},
        {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": "o1"}]},
        {"type": "function_call_output", "call_id": "c2", "output": "o2"},
        {"role": "assistant", "content": "one"}, {"role": "assistant", "content": "two"},
        {"type": "reasoning", "summary": [], "encrypted_content": encrypt_reasoning("r2")},
        {"role": "assistant", "content": "three"}]})
    msgs = [m.model_dump(exclude_none=True) for m in to_messages(req.items, "sys")]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "tool", "assistant", "assistant",
                                         "assistant"]
    assert msgs[2]["reasoning"] == "r1" and [c["id"] for c in msgs[2]["tool_calls"]] == ["c1", "c2"]
    assert "content" not in msgs[2]
    assert msgs[3] == {"role": "tool", "content": "o1", "tool_call_id": "c1"}
    assert msgs[5]["content"] == "one" and msgs[6]["content"] == "two"
    assert msgs[7] == {"role": "assistant", "content": "three", "reasoning": "r2"}


@pytest.mark.parametrize("which, reply", [
    ("qwen35_server", "Two and two.\n</think>\n\nIt is 4."),  # the template opened the block
    ("qwen3_server", "<think>\nTwo and two.\n</think>\n\nIt is 4."),  # the model opens it
])
def test_reasoning_item_then_message(request, which, reply):
    srv = request.getfixturevalue(which)
    oai = client(srv)
    kwargs = dict(model="tiny", input="What is 2 + 2?", max_output_tokens=50, reasoning={"effort": "high"},
                  include=["reasoning.encrypted_content"])
    with Scripted(srv) as script:
        script.say("r", reply)
        whole = oai.responses.create(**kwargs, extra_headers={"X-Request-ID": "r"})
        with oai.responses.stream(**kwargs, extra_headers={"X-Request-ID": "r"}) as stream:
            events = list(stream)
    rs, msg = whole.output
    assert rs.type == "reasoning" and rs.id.startswith("rs_") and rs.summary == []
    assert [c.text for c in rs.content] == ["Two and two."] and rs.status == "completed"
    assert base64.b64decode(rs.encrypted_content).decode().endswith("Two and two.")
    assert msg.type == "message" and whole.output_text == "It is 4."
    assert whole.status == "completed" and whole.reasoning.effort == "high"
    assert 0 < whole.usage.output_tokens_details.reasoning_tokens < whole.usage.output_tokens
    streamed = events[-1].response
    assert events[-1].type == "response.completed"
    assert [i.type for i in streamed.output] == ["reasoning", "message"]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "Two and two."
    assert streamed.output[0].content == rs.content and streamed.output_text == "It is 4."
    assert streamed.output[0].encrypted_content == rs.encrypted_content
    # sent back as encrypted_content alone, the reasoning makes the same prompt as sent as text (after the last
    # user message, where the templates keep reasoning), and another than without it
    back = [{"role": "user", "content": "What is 2 + 2?"},
            {"type": "reasoning", "summary": [], "encrypted_content": rs.encrypted_content},
            {"role": "assistant", "content": "It is 4."}]
    as_text = back[:1] + [rs.model_dump(exclude_none=True, include={"type", "summary", "content"})] + back[2:]
    a, b, none = (post(srv, input=x, max_output_tokens=1, store=False).json()["usage"]["input_tokens"]
                  for x in (back, as_text, back[:1] + back[2:]))
    assert a == b > none
    # not ours: base64 of other text, not base64, text outside ASCII, base64 of bytes that are not UTF-8
    for content in ("bm90IG91cnM=", "not base64!", "\x80", "\U0007ed2e", base64.b64encode(b"\xff\xfe").decode()):
        forged = post(srv, input=[back[0], {"type": "reasoning", "summary": [], "encrypted_content": content}])
        assert forged.status_code == 400 and forged.json()["error"]["param"] == "input.1.encrypted_content", content
        counted = httpx.post(srv.url + "/v1/responses/input_tokens",
                             json={"input": [back[0], {"type": "reasoning", "encrypted_content": content}]})
        assert counted.status_code == 400 and counted.json()["error"]["param"] == "input.1.encrypted_content"


def test_function_call_item_whole_and_streamed(srv):
    oai = client(srv)
    kwargs = dict(model="tiny", input=QUESTION, tools=FUNCTIONS, max_output_tokens=120)
    with Scripted(srv) as script:
        script.say("call", "Sure.\n" + ("\n" if "<function=" in call_of(srv) else "") + call_of(srv))
        whole = oai.responses.create(**kwargs, extra_headers={"X-Request-ID": "call"})
        with oai.responses.stream(**kwargs, extra_headers={"X-Request-ID": "call"}) as stream:
            events = list(stream)
    msg, call = whole.output
    assert msg.type == "message" and whole.output_text == "Sure."
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    assert json.loads(call.arguments) == {"city": "Paris", "days": 3} and call.id.startswith("fc_")
    assert whole.status == "completed" and whole.tool_choice == "auto"
    assert [t.name for t in whole.tools] == ["get_weather", "get_time"]
    final = events[-1].response
    assert [i.type for i in final.output] == ["message", "function_call"]
    assert final.output[1].arguments == call.arguments and final.output[1].name == "get_weather"
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and done[0].arguments == call.arguments
    # the tool's result goes back with the call: the next turn
    nxt = oai.responses.create(model="tiny", tools=FUNCTIONS, max_output_tokens=4, store=False, input=[
        {"role": "user", "content": QUESTION}, *[i.model_dump(exclude_none=True) for i in whole.output],
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"}])
    assert nxt.status in ("completed", "incomplete") and nxt.usage.input_tokens > whole.usage.input_tokens


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "name": "get_time"}])
def test_forced_function_calls_follow_the_schema(srv, tool_choice):
    r = client(srv).responses.create(model="tiny", input="Weather?", tools=FUNCTIONS, tool_choice=tool_choice,
                                     parallel_tool_calls=False, max_output_tokens=200, temperature=1.0)
    calls = [i for i in r.output if i.type == "function_call"]
    assert len(calls) == 1 and r.status == "completed"
    if isinstance(tool_choice, dict):
        assert calls[0].name == "get_time" and r.tool_choice.name == "get_time"
    jsonschema.validate(json.loads(calls[0].arguments), SCHEMAS[calls[0].name])


def test_streamed_forced_call_arguments_come_in_fragments(server):
    with client(server).responses.stream(model="tiny", input="Weather?", tools=FUNCTIONS, max_output_tokens=200,
                                         tool_choice={"type": "function", "name": "get_weather"},
                                         temperature=1.0) as stream:
        events = list(stream)
    call = events[-1].response.output[0]  # parallel calls allowed: the grammar may go on with more
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta" and e.item_id == call.id]
    assert len(deltas) > 3 and "".join(deltas) == call.arguments
    jsonschema.validate(json.loads(call.arguments), WEATHER)


def test_text_format_json_schema(srv):
    """The format's grammar holds what the model writes: random weights write valid JSON (cut short, at most, by
    max_output_tokens), and a scripted answer passes the grammar token by token (Scripted checks each)."""
    schema = {"type": "object", "properties": {"answer": {"enum": [3, 4, 5]}}, "required": ["answer"],
              "additionalProperties": False}
    fmt = {"format": {"type": "json_schema", "name": "sum", "schema": schema, "strict": True}}
    oai = client(srv)
    r = oai.responses.create(model="tiny", input="2 + 2?", text=fmt, max_output_tokens=400, temperature=1.0)
    assert r.text.format.name == "sum" and r.output_text.startswith("{")
    if r.status == "completed":
        jsonschema.validate(json.loads(r.output_text), schema)
    with Scripted(srv) as script:
        script.say("json", '{"answer": 4}')
        r = oai.responses.create(model="tiny", input="2 + 2?", text=fmt, max_output_tokens=40,
                                 extra_headers={"X-Request-ID": "json"})
    assert r.status == "completed" and json.loads(r.output_text) == {"answer": 4}
    obj = post(srv, text={"format": {"type": "json_object"}}, max_output_tokens=400, temperature=1.0).json()
    text = obj["output"][0]["content"][0]["text"]
    assert text.lstrip().startswith("{")
    if obj["status"] == "completed":
        assert isinstance(json.loads(text), dict)


def test_previous_response_id_get_and_delete(srv):
    oai = client(srv)
    story = "Tell me a story about " + ", ".join(f"a fox number {i}" for i in range(20)) + "."
    first = oai.responses.create(model="tiny", input=story, instructions="Be kind.", max_output_tokens=20,
                                 temperature=0, metadata={"ticket": "42"})
    assert first.store and first.metadata == {"ticket": "42"} and first.instructions == "Be kind."
    got = oai.responses.retrieve(first.id)
    assert got.model_dump() == first.model_dump()
    second = oai.responses.create(model="tiny", input="And then?", previous_response_id=first.id,
                                  instructions="Be kind.", max_output_tokens=6, temperature=0)
    assert second.previous_response_id == first.id
    # the same as sending the whole conversation
    ref = oai.responses.create(model="tiny", store=False, max_output_tokens=6, temperature=0, input=[
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": story},
        {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "And then?"}])
    assert second.usage.input_tokens == ref.usage.input_tokens and second.output_text == ref.output_text
    # the second turn started past the first one's prompt, found in the prefix cache
    assert second.usage.input_tokens_details.cached_tokens >= (first.usage.input_tokens - 8) // 16 * 16 > 64
    # instructions are not carried over, as OpenAI's API has it: without them the system message is gone
    third = oai.responses.create(model="tiny", input="The end?", previous_response_id=second.id,
                                 max_output_tokens=2)
    ref = oai.responses.create(model="tiny", store=False, max_output_tokens=2, input=[
        {"role": "user", "content": story}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And then?"}, {"role": "assistant", "content": second.output_text},
        {"role": "user", "content": "The end?"}])
    assert third.usage.input_tokens == ref.usage.input_tokens
    # store: false keeps nothing; deleted is gone
    gone = oai.responses.create(model="tiny", input="x", max_output_tokens=1, store=False)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(gone.id)
    deleted = oai.responses.delete(first.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    for call in (lambda: oai.responses.retrieve(first.id), lambda: oai.responses.delete(first.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    r = post(srv, previous_response_id=first.id)
    assert r.status_code == 404 and r.json()["error"]["param"] == "previous_response_id"
    assert r.json()["error"]["code"] == "response_not_found"


def test_the_store_keeps_the_latest():
    store = ResponseStore(2)
    for rid in ("a", "b"):
        store.put(rid, Stored({"output": []}, []))
    store.get("a")  # used: b is now the oldest
    store.put("c", Stored({"output": []}, []))
    assert len(store) == 2 and store.get("a") and store.get("c")
    with pytest.raises(Exception, match="No response"):
        store.get("b")
    none = ResponseStore(0)
    none.put("a", Stored({"output": []}, []))
    assert len(none) == 0


def test_no_store_refuses_store_true(server, monkeypatch):
    monkeypatch.setattr(server.app.state.responses.store, "capacity", 0)
    r = post(server, max_output_tokens=1)
    assert r.status_code == 400 and r.json()["error"]["param"] == "store"
    assert post(server, max_output_tokens=1, store=False).status_code == 200


@pytest.mark.parametrize("body, param", [
    ({"input": []}, "input"),
    ({"input": 5}, "input"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type"),
    ({"input": [{"type": "web_search_call", "id": "x"}]}, "input.0.type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input.0.content.0.image_url"),  # the shared server's model has no vision tower
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input.0.content.0.type"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input.0.role"),
    ({"input": [{"role": "user", "content": "x"}, {"type": "function_call", "call_id": "c", "name": "f",
                                                   "arguments": "[1]"}]}, "input.1.arguments"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input.0.call_id"),
    ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"tools": [{"type": "function", "name": "bad name"}]}, "tools.0.name"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "string"}}]}, "tools[0].parameters"),
    ({"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function", "name": "g"}}, "tool_choice"),
    ({"tool_choice": {"type": "mcp", "server_label": "x"}}, "tool_choice.type"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"text": {"format": {"type": "json_schema", "name": "bad name", "schema": {}}}}, "text.format.name"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object", "minProperties": "a"}}}},
     "text.format.schema"),
    ({"text": {"format": {"type": "text"}, "verbosity": "low"}}, "text.verbosity"),
    ({"reasoning": {"effort": "high", "summary": "auto"}}, "reasoning.summary"),
    ({"reasoning": {"effort": "extreme"}}, "reasoning.effort"),
    ({"include": ["file_search_call.results"]}, "include.0"),
    ({"include": ["message.output_text.logprobs"], "top_logprobs": 21}, "top_logprobs"),
    ({"background": True, "store": False}, "background"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"truncation": "none"}, "truncation"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"stream_options": {"include_obfuscation": False}}, "stream_options"),
    ({"metadata": {"k": 1}}, "metadata.k"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"max_output_tokens": 100000}, "max_output_tokens"),
    ({"input": "x" * 40000}, "input"),
    ({"seed": 3}, "seed"),
])
def test_invalid_requests_get_400_naming_the_field(server, body, param):
    r = post(server, **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert "function." not in err["message"] and "messages" not in err["message"], err


def test_unknown_model_and_route(server):
    r = post(server, model="gpt-9")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.get(server.url + "/v1/responses/resp_nope").status_code == 404


def test_generation_failure(server):
    with failing(server, "poison"):
        whole = post(server, "poison", max_output_tokens=4)
        streamed = post(server, "poison", max_output_tokens=4, stream=True)
    assert whole.status_code == 500 and "injected failure" in whole.json()["error"]["message"]
    events = events_of(streamed.content)
    assert events[-1]["type"] == "response.failed"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "internal_error"
    assert "injected failure" in failed["error"]["message"]
    kept = httpx.get(server.url + f"/v1/responses/{failed['id']}").json()  # kept, as failed
    assert kept["status"] == "failed"
    assert post(server, max_output_tokens=2).status_code == 200


def test_metrics_by_route(server):
    def count(method: str, endpoint: str, code: str) -> float:
        labels = f'{{endpoint="{endpoint}",method="{method}",status_code="{code}"}}'
        return metric(httpx.get(server.url + "/metrics").text, "http_requests_total", labels)

    before = count("POST", "/v1/responses", "200"), count("GET", "/v1/responses/{response_id}", "404")
    assert post(server, max_output_tokens=2, store=False).status_code == 200
    assert httpx.get(server.url + "/v1/responses/resp_none").status_code == 404
    after = count("POST", "/v1/responses", "200"), count("GET", "/v1/responses/{response_id}", "404")
    assert after == (before[0] + 1, before[1] + 1)


def test_an_agent_step_starts_past_the_previous_reply(qwen35_server):
    """An agent loop on Qwen3.5 with thinking on: the next step's prompt repeats the reasoning and the call token
    for token, and starts past them (the reply's state was kept at its last block boundary), not only past the
    previous prompt."""
    srv = qwen35_server
    oai = client(srv)
    reply = "The weather needs the tool: Paris, three days.\n</think>\n\n" + call_of(srv)
    kwargs = dict(model="tiny", tools=FUNCTIONS, reasoning={"effort": "high"}, max_output_tokens=200)
    with Scripted(srv) as script:
        script.say("step1", reply)
        first = oai.responses.create(input=QUESTION, extra_headers={"X-Request-ID": "step1"}, **kwargs)
    assert [i.type for i in first.output] == ["reasoning", "function_call"]
    call = first.output[1]
    second = oai.responses.create(previous_response_id=first.id, input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}], **kwargs)
    computed = first.usage.input_tokens + first.usage.output_tokens - 1  # the end marker is sampled, not computed
    prompt_checkpoint = (first.usage.input_tokens - 8) // 16 * 16
    assert second.usage.input_tokens_details.cached_tokens == computed // 16 * 16 > prompt_checkpoint


def test_input_tokens_are_counted_as_a_response_would_have_them(srv):
    oai = client(srv)
    kwargs = dict(model="tiny", instructions="Be brief.", tools=FUNCTIONS, reasoning={"effort": "none"}, input=[
        {"role": "user", "content": QUESTION},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'},
        {"type": "function_call_output", "call_id": "c1", "output": "Rain"}])
    first = oai.responses.create(max_output_tokens=3, **kwargs)
    counted = oai.responses.input_tokens.count(**kwargs)
    assert counted.object == "response.input_tokens" and counted.input_tokens == first.usage.input_tokens
    nxt = oai.responses.input_tokens.count(model="tiny", previous_response_id=first.id, input="And Lima?")
    ref = oai.responses.create(model="tiny", previous_response_id=first.id, input="And Lima?", max_output_tokens=1)
    assert nxt.input_tokens == ref.usage.input_tokens
    for body, param in (({"input": "x", "conversation": "conv_1"}, "conversation"),
                        ({"input": "x", "personality": "friendly"}, "personality"),
                        ({"input": "x", "truncation": "none"}, "truncation"), ({}, "input"),
                        ({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": {"type": "array"}}]},
                         "tools[0].parameters")):
        r = httpx.post(srv.url + "/v1/responses/input_tokens", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = httpx.post(srv.url + "/v1/responses/input_tokens", json={"input": "x", "model": "gpt-9"})
    assert r.status_code == 404


def test_truncation_auto_drops_the_first_turns_until_the_conversation_fits(srv):
    """A conversation longer than the context: refused as it is, answered with `truncation: "auto"` from the
    latest turns that fit (the first start, at a message not the assistant's, whose prompt and reply fit), the
    instructions kept; counted alike by input_tokens; through previous_response_id too."""
    oai = client(srv)
    model = srv.state.model
    room = min(model.max_model_len, model.engine.kv_capacity_tokens)

    def chunk(share: float) -> str:  # about that share of the room, in tokens (" hello" is one)
        return "hello " * int(room * share)

    items = [{"role": "user", "content": "one " + chunk(0.3)}, {"role": "assistant", "content": "two " + chunk(0.3)},
             {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c1", "output": "three " + chunk(0.3)},
             {"role": "user", "content": "four " + chunk(0.45)}, {"role": "assistant", "content": "five"},
             {"role": "user", "content": "six " + chunk(0.6)}, {"role": "user", "content": "Last question?"}]
    body = {"model": "tiny", "instructions": "Be brief.", "tools": [{"type": "function", "name": "f"}]}

    def counted(kept: list) -> int:
        return oai.responses.input_tokens.count(input=kept, **body).input_tokens

    assert counted(items) + 4 > room
    r = httpx.post(srv.url + "/v1/responses", json={**body, "input": items, "max_output_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    starts = [k for k, item in enumerate(items) if k and item.get("role") in ("user", "system", "developer")]
    expected = next(k for k in starts if counted(items[k:]) + 4 <= room)
    assert expected > starts[0]  # more than the first turn had to go
    done = oai.responses.create(input=items, max_output_tokens=4, truncation="auto", temperature=0, **body)
    same = oai.responses.create(input=items[expected:], max_output_tokens=4, temperature=0, **body)
    assert done.truncation == "auto" and same.truncation == "disabled"
    assert done.usage.input_tokens == same.usage.input_tokens == counted(items[expected:])
    assert done.output_text == same.output_text
    assert oai.responses.input_tokens.count(input=items, truncation="auto", **body).input_tokens == \
        counted(items[expected:])
    # the stored conversation is the whole one: a follow-up truncates it again
    first = oai.responses.create(input=items[:2], max_output_tokens=2, **body)
    nxt = oai.responses.create(input=items[2:], previous_response_id=first.id, max_output_tokens=4,
                               truncation="auto", **body)
    assert nxt.usage.input_tokens + 4 <= room and nxt.truncation == "auto"
    # a last message that alone does not fit fails as it would without truncation
    r = httpx.post(srv.url + "/v1/responses", json={**body, "input": [{"role": "user", "content": chunk(1.2)}],
                                                    "truncation": "auto", "max_output_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text


def test_input_items_of_a_stored_response(srv):
    oai = client(srv)
    first = oai.responses.create(model="tiny", input="Hi", max_output_tokens=2)
    items = [{"role": "user", "content": "Weather?"},
             {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}", "id": "fc_mine"},
             {"type": "function_call_output", "call_id": "c1", "output": "Sunny"}]
    second = oai.responses.create(model="tiny", input=items, previous_response_id=first.id, tools=FUNCTIONS,
                                  max_output_tokens=2)
    listed = oai.responses.input_items.list(second.id)  # newest first; the previous response's items not among them
    assert [i.type for i in listed.data] == ["function_call_output", "function_call", "message"]
    assert listed.data[1].id == "fc_mine" and listed.data[2].content[0].text == "Weather?"
    assert listed.data[2].content[0].type == "input_text" and not listed.has_more
    again = oai.responses.input_items.list(second.id)
    assert [i.id for i in again.data] == [i.id for i in listed.data]  # ids made once, when stored
    page = oai.responses.input_items.list(second.id, order="asc", limit=2)
    assert [i.type for i in page.data] == ["message", "function_call"] and page.has_more
    rest = oai.responses.input_items.list(second.id, order="asc", limit=2, after=page.last_id)
    assert [i.type for i in rest.data] == ["function_call_output"] and not rest.has_more
    assert [i.type for i in oai.responses.input_items.list(first.id).data] == ["message"]
    r = httpx.get(srv.url + f"/v1/responses/{second.id}/input_items", params={"after": "nope"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "after"
    r = httpx.get(srv.url + f"/v1/responses/{second.id}/input_items", params={"limit": 0})
    assert r.status_code == 400
    assert httpx.get(srv.url + "/v1/responses/resp_none/input_items").status_code == 404


def test_the_clients_parse_helper(srv):
    """`responses.parse` sends a pydantic model as a strict json_schema format and reads the reply back into it;
    the scripted reply passes the format's grammar token by token."""
    from typing import Literal

    from pydantic import BaseModel

    class Forecast(BaseModel):
        city: Literal["Paris", "Oslo"]
        days: int

    with Scripted(srv) as script:
        script.say("parse", '{"city": "Oslo", "days": 2}')
        r = client(srv).responses.parse(model="tiny", input=QUESTION, text_format=Forecast, max_output_tokens=60,
                                        extra_headers={"X-Request-ID": "parse"})
    assert r.output_parsed == Forecast(city="Oslo", days=2) and r.text.format.strict is True


def test_log_probabilities_of_the_text(srv):
    """include message.output_text.logprobs: each token of the text with its log-probability and top_logprobs
    alternatives, as chat completions report them for the same greedy reply; streamed with each delta."""
    oai = client(srv)
    kwargs = dict(model="tiny", input=QUESTION, max_output_tokens=6, temperature=0, top_logprobs=2,
                  include=["message.output_text.logprobs"])
    r = oai.responses.create(**kwargs)
    ref = chat(srv, [{"role": "user", "content": QUESTION}], max_tokens=6, temperature=0, logprobs=True,
               top_logprobs=2)
    want = ref["choices"][0]["logprobs"]["content"]
    got = [lp.model_dump() for lp in r.output[0].content[0].logprobs]
    assert len(got) == 6 and [g["token"] for g in got] == [w["token"] for w in want]
    assert [g["logprob"] for g in got] == pytest.approx([w["logprob"] for w in want])
    assert all(len(g["top_logprobs"]) == 2 for g in got) and r.top_logprobs == 2
    with oai.responses.stream(**kwargs) as stream:
        events = list(stream)
    streamed = [lp.model_dump() for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    done = next(e for e in events if e.type == "response.output_text.done")
    assert streamed == [lp.model_dump() for lp in done.logprobs] == got
    plain = oai.responses.create(model="tiny", input=QUESTION, max_output_tokens=2)
    assert plain.output[0].content[0].logprobs == []


def test_reasoning_tokens_have_no_log_probabilities(qwen35_server):
    srv = qwen35_server
    with Scripted(srv) as script:
        script.say("lp", "Two and two.\n</think>\n\nIt is 4.")
        r = client(srv).responses.create(model="tiny", input="2 + 2?", reasoning={"effort": "high"},
                                         include=["message.output_text.logprobs"], max_output_tokens=40,
                                         extra_headers={"X-Request-ID": "lp"})
    rs, msg = r.output
    lps = msg.content[0].logprobs
    assert "".join(lp.token for lp in lps).endswith("It is 4.") and len(lps) < r.usage.output_tokens - 4

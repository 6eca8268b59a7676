"""The Responses API: a request's input items become chat messages and run as a chat completion does (the chat
template, tools, reasoning, grammars, the prefix cache); what the model writes comes back as output items —
reasoning, message and function_call, in the order written — whole, or streamed as Responses events.

Responses are kept in this process's memory (`--responses-store` of them, least recently used dropped first)
for `previous_response_id` and `GET /v1/responses/{id}`; with several replicas behind one Service, a replica
reads those another one made through `peers.Peers` (their ids name it). A response made with `background: true`
runs on in a task of its own whatever the client does: it is kept from the start (queued, then in progress),
its events are kept with it, so `GET /v1/responses/{id}?stream=true&starting_after=N` streams them again from any
point and on to the end, and `POST /v1/responses/{id}/cancel` stops it. Reasoning sent back with
`include: ["reasoning.encrypted_content"]` is the reasoning text itself, base64-encoded, not encrypted: the
server keeps no key, and the text is the client's to read anyway."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError

from .errors import APIError, bad_request, renaming
from .protocol import (ENCRYPTED_REASONING, ChatCompletionRequest, ChatMessage, FunctionCallItem,
                       FunctionCallOutputItem, ImagePart, IncompleteDetails, InputItemList, InputMessage, InputText,
                       InputTokens,
                       InputTokensDetails, InputTokensRequest, OutputTokensDetails, ReasoningItem, ResponseDeleted,
                       ResponseError, ResponseInput, ResponseObject, ResponsesRequest, ResponseUsage,
                       TextPart, ToolCallFunction, ToolCallParam, first_error, now, parse_item)
from .peers import Peers
from .serving import event_stream, named_event
from .serving_chat import ChatChoice, ChatPlan, ChatService
from .toolcalls import OutputDelta, ToolCallDelta

log = logging.getLogger("qwen_inference.serving")
access_log = logging.getLogger("qwen_inference.access")

_REASONING_PREFIX = "qwen-reasoning:"


def encrypt_reasoning(text: str) -> str:
    """`encrypted_content` as this server writes it: the reasoning text, base64-encoded (see the module's
    docstring)."""
    return base64.b64encode((_REASONING_PREFIX + text).encode()).decode()


def reasoning_from(encrypted: str) -> str | None:
    """The reasoning text `encrypt_reasoning` wrote into `encrypted`; None when this server did not write it."""
    try:
        raw = base64.b64decode(encrypted, validate=True).decode()
    except ValueError:  # not base64 (binascii.Error), not ASCII, or not UTF-8 (UnicodeDecodeError)
        return None
    return raw[len(_REASONING_PREFIX):] if raw.startswith(_REASONING_PREFIX) else None


def reasoning_of(index: int, item: ReasoningItem) -> str | None:
    """The text of a reasoning item sent back: its reasoning_text content, else its encrypted_content."""
    if item.content:
        return "".join(p.text for p in item.content)
    if item.encrypted_content is None:
        return None
    text = reasoning_from(item.encrypted_content)
    if text is None:
        raise bad_request(f"input[{index}].encrypted_content was not written by this server",
                          f"input.{index}.encrypted_content")
    return text


# the names chat completions give the fields of a request, as this API names them
_RENAMES = [(re.compile(r"tools\[(\d+)\]\.function\."), r"tools[\1]."),
            (re.compile(r"\bresponse_format\.json_schema\b"), "text.format"),
            (re.compile(r"\bresponse_format\b"), "text.format"),
            (re.compile(r"\bmax_completion_tokens\b"), "max_output_tokens"),
            (re.compile(r"\breasoning_effort\b"), "reasoning.effort"),
            (re.compile(r"\bmessages\b"), "input")]


renamed = renaming(_RENAMES)  # an error of the chat-completions path, naming the fields as this API does


def to_messages(items: list[Any], instructions: str | None, offset: int = 0) -> list[ChatMessage]:
    """Input items as chat messages: a reasoning item, an assistant message and the function calls after it make
    one assistant turn; a function_call_output is a tool message. `offset`: how many of `items` came from the
    previous response (errors name the request's own items)."""
    messages: list[ChatMessage] = []
    if instructions:
        messages.append(ChatMessage(role="system", content=instructions))
    turn: dict[str, Any] | None = None

    def flush() -> None:
        nonlocal turn
        if turn is not None and (turn["content"] is not None or turn["calls"] or turn["reasoning"] is not None):
            messages.append(ChatMessage(role="assistant", content=turn["content"], tool_calls=turn["calls"] or None,
                                        reasoning=turn["reasoning"]))
        turn = None

    def new_turn() -> dict[str, Any]:
        return {"content": None, "calls": [], "reasoning": None}

    for k, item in enumerate(items):
        i = k - offset
        if isinstance(item, ReasoningItem):
            flush()
            turn = new_turn()
            turn["reasoning"] = reasoning_of(i, item)
        elif isinstance(item, InputMessage) and item.role == "assistant":
            if turn is not None and (turn["content"] is not None or turn["calls"]):
                flush()
            turn = turn or new_turn()
            turn["content"] = item.text()
        elif isinstance(item, FunctionCallItem):
            try:
                args = json.loads(item.arguments)
            except ValueError:
                args = None
            if not isinstance(args, dict):
                raise bad_request(f"input[{i}].arguments must be a JSON object, as text", f"input.{i}.arguments")
            turn = turn or new_turn()
            turn["calls"].append(ToolCallParam(id=item.call_id,
                                               function=ToolCallFunction(name=item.name, arguments=item.arguments)))
        else:
            flush()
            if isinstance(item, FunctionCallOutputItem):
                messages.append(ChatMessage(role="tool", content=item.text(), tool_call_id=item.call_id))
            elif item.has_images:  # text and images in order, as chat completions reads them
                messages.append(ChatMessage(role=item.role, content=[
                    TextPart(type="text", text=part.text) if isinstance(part, InputText)
                    else ImagePart.of(part.image_url, f"input.{i}.content.{j}.image_url")
                    for j, part in enumerate(item.content)]))
            else:
                messages.append(ChatMessage(role=item.role, content=item.text()))
    flush()
    if not messages:
        raise bad_request("input has no message to answer", "input")
    return messages


def _hex() -> str:
    return uuid.uuid4().hex


_ID_PREFIX = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_", "reasoning": "rs_"}


def _new_id(kind: str) -> str:
    """An id for an item of this kind, output or input, prefixed as OpenAI's are."""
    return _ID_PREFIX[kind] + _hex()


class Output:
    """A response's output items, built from what the model writes, with the stream's events for each step: an
    item is opened when the kind of text changes (reasoning, content, a new call) and closed when the next one
    opens or the reply ends."""

    def __init__(self, encrypted: bool) -> None:
        self.items: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None
        self.encrypted = encrypted
        self.calls: dict[int, dict[str, Any]] = {}  # a call's index in the reply -> its item
        self.seq = 0

    def event(self, type_: str, **fields: Any) -> dict[str, Any]:
        ev = {"type": type_, "sequence_number": self.seq, **fields}
        self.seq += 1
        return ev

    def add(self, d: OutputDelta, logprobs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """`logprobs`: of the tokens that wrote this delta, reported with its content (reasoning and calls have
        none)."""
        events: list[dict[str, Any]] = []
        if d.reasoning:
            events += self._text("reasoning", d.reasoning)
        if d.content:
            events += self._text("message", d.content, logprobs or [])
        for call in d.tool_calls:
            events += self._call(call)
        return events

    def _text(self, kind: str, text: str, logprobs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if self.open is None or self.open["type"] != kind:
            events += self.close("completed")
            if kind == "message":
                item = {"id": _new_id("message"), "type": "message", "status": "in_progress", "role": "assistant",
                        "content": []}
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            else:
                item = {"id": _new_id("reasoning"), "type": "reasoning", "summary": [], "content": [],
                        "status": "in_progress"}
                part = {"type": "reasoning_text", "text": ""}
            events += self._opened(item)
            item["content"].append(part)
            events.append(self.event("response.content_part.added", item_id=item["id"],
                                     output_index=len(self.items) - 1, content_index=0, part=dict(part)))
        item = self.open
        assert item is not None
        item["content"][0]["text"] += text
        at = dict(item_id=item["id"], output_index=len(self.items) - 1, content_index=0, delta=text)
        if kind == "message":
            item["content"][0]["logprobs"] += logprobs or []
            events.append(self.event("response.output_text.delta", **at, logprobs=logprobs or []))
        else:
            events.append(self.event("response.reasoning_text.delta", **at))
        return events

    def _opened(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        self.items.append(item)
        self.open = item
        return [self.event("response.output_item.added", output_index=len(self.items) - 1,
                           item=json.loads(json.dumps(item)))]

    def _call(self, call: ToolCallDelta) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        item = self.calls.get(call.index)
        if item is None:
            events += self.close("completed")
            item = {"id": _new_id("function_call"), "type": "function_call", "status": "in_progress",
                    "call_id": call.id or "call_" + _hex()[:24], "name": call.name or "", "arguments": ""}
            self.calls[call.index] = item
            events += self._opened(item)
        if call.arguments:
            item["arguments"] += call.arguments
            events.append(self.event("response.function_call_arguments.delta", item_id=item["id"],
                                     output_index=self.items.index(item), delta=call.arguments))
        return events

    def close(self, status: str) -> list[dict[str, Any]]:
        """Close the open item (`status`: completed, or incomplete when the reply was cut short)."""
        item, self.open = self.open, None
        if item is None:
            return []
        item["status"] = status
        at = dict(item_id=item["id"], output_index=self.items.index(item))
        events = []
        if item["type"] == "function_call":
            events.append(self.event("response.function_call_arguments.done", **at, name=item["name"],
                                     arguments=item["arguments"]))
        else:
            part = item["content"][0]
            if item["type"] == "message":
                events.append(self.event("response.output_text.done", **at, content_index=0, text=part["text"],
                                         logprobs=part["logprobs"]))
            else:
                events.append(self.event("response.reasoning_text.done", **at, content_index=0, text=part["text"]))
                if self.encrypted:
                    item["encrypted_content"] = encrypt_reasoning(part["text"])
            events.append(self.event("response.content_part.done", **at, content_index=0, part=dict(part)))
        events.append(self.event("response.output_item.done", output_index=at["output_index"],
                                 item=json.loads(json.dumps(item))))
        return events

    def reasoning_text(self) -> str:
        return "".join(i["content"][0]["text"] for i in self.items if i["type"] == "reasoning")


def listed(items: list[Any]) -> list[dict[str, Any]]:
    """Input items as GET .../input_items lists them: each with an id (its own, or one made here), message text
    as parts."""
    out = []
    for item in items:
        d = item.model_dump(by_alias=True, exclude_none=True)
        d["id"] = d.get("id") or _new_id(d["type"])
        if isinstance(item, InputMessage):
            if isinstance(item.content, str):
                kind = "output_text" if item.role == "assistant" else "input_text"
                d["content"] = [{"type": kind, "text": item.content}]
            d.setdefault("status", "completed")
        out.append(d)
    return out


@dataclass
class Stored:
    body: dict[str, Any]  # the response as returned (a background one is read from its run instead)
    items: list[Any]  # the input items it answered, the previous responses' included (without instructions)
    own: list[dict[str, Any]] = field(default_factory=list)  # this request's input items, as listed
    run: "_Run | None" = None  # a background response's run, live or ended: its state and its events

    def current(self) -> dict[str, Any]:
        """The response as it is now: a background response's state and output so far."""
        return self.run.body() if self.run is not None else self.body

    def history(self) -> list[Any]:
        """The conversation so far, as input items: what it answered, then its output."""
        return self.items + [parse_item(item) for item in self.current()["output"]]


def not_kept(rid: str, param: str | None) -> APIError:
    return APIError(404, f"No response with id {rid!r} is kept here (responses are kept in the memory of the "
                    "replica that made them, the latest --responses-store of them).",
                    "invalid_request_error", param, "response_not_found", reason="not_found")


class ResponseStore:
    """Responses kept for previous_response_id and GET, least recently used dropped first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._kept: OrderedDict[str, Stored] = OrderedDict()

    def put(self, rid: str, stored: Stored) -> None:
        if self.capacity <= 0:
            return
        self._kept[rid] = stored
        self._kept.move_to_end(rid)
        while len(self._kept) > self.capacity:
            self._kept.popitem(last=False)

    def get(self, rid: str, param: str | None = None) -> Stored:
        stored = self.find(rid)
        if stored is None:
            raise not_kept(rid, param)
        return stored

    def find(self, rid: str) -> Stored | None:
        stored = self._kept.get(rid)
        if stored is not None:
            self._kept.move_to_end(rid)
        return stored

    def delete(self, rid: str) -> None:
        self.get(rid)
        del self._kept[rid]

    def __len__(self) -> int:
        return len(self._kept)


class ResponsesService:
    def __init__(self, state, chat: ChatService) -> None:
        self.state = state
        self.chat = chat
        self.store = ResponseStore(state.settings.responses_store)
        self.running: set[asyncio.Task] = set()  # background responses' tasks (held, so that none is collected)
        self.peers = Peers.of(state.settings)  # the other replicas, when responses are shared with them

    # ---- the request -----------------------------------------------------------------------------------
    def chat_request(self, req: ResponseInput, items: list[Any], offset: int) -> ChatCompletionRequest:
        messages = to_messages(items, req.instructions, offset)
        choice = req.tool_choice
        if choice is not None and not isinstance(choice, str):
            choice = {"type": "function", "function": {"name": choice.name}}
        fmt = req.text.format if req.text is not None else None
        try:
            return ChatCompletionRequest(
                messages=messages, model=req.model, max_completion_tokens=getattr(req, "max_output_tokens", None),
                temperature=getattr(req, "temperature", None), top_p=getattr(req, "top_p", None),
                tools=[t.to_chat() for t in req.tools] if req.tools else None, tool_choice=choice,
                parallel_tool_calls=req.parallel_tool_calls,
                logprobs=getattr(req, "logprobs", None) or None, top_logprobs=getattr(req, "top_logprobs", None),
                reasoning_effort=req.reasoning.effort if req.reasoning is not None else None,
                response_format=fmt.to_chat() if fmt is not None else None)
        except ValidationError as exc:  # what the chat request checks across messages
            loc, msg = first_error(exc.errors())
            raise renamed(bad_request(msg, ".".join(loc) or None)) from None

    def _shell(self, req: ResponsesRequest, plan: ChatPlan) -> ResponseObject:
        """The response before any output: the request's settings as they apply."""
        params = plan.submission.params
        choice = req.tool_choice
        return ResponseObject(
            id=self.peers.new_id() if self.peers else "resp_" + _hex(), created_at=now(), status="in_progress",
            instructions=req.instructions,
            max_output_tokens=req.max_output_tokens, model=self.state.settings.model_name,
            parallel_tool_calls=plan.tools.parallel, previous_response_id=req.previous_response_id,
            reasoning={"effort": req.reasoning.effort if req.reasoning else None, "summary": None},
            store=bool(req.store), temperature=params.temperature, top_p=params.top_p, top_logprobs=req.top_logprobs,
            text={"format": req.text.format.model_dump(by_alias=True, exclude_none=True)
                  if req.text is not None and req.text.format is not None else {"type": "text"}},
            tool_choice=(choice.model_dump() if choice is not None and not isinstance(choice, str)
                         else choice or ("auto" if req.tools else "none")),
            tools=[t.model_dump(by_alias=True, exclude_none=True) for t in req.tools or ()], user=req.user,
            metadata=req.metadata or {}, truncation=req.truncation or "disabled")

    async def conversation(self, req: ResponseInput) -> tuple[list[Any], int]:
        """The items the prompt is made of: the stored conversation of previous_response_id (kept here, or by the
        replica that made it), then the input; and how many came from the store."""
        history: list[Any] = []
        rid = req.previous_response_id
        if rid is not None:
            stored = await self.lookup(rid, "previous_response_id")
            status = stored.current()["status"]
            if status in ("queued", "in_progress"):
                raise bad_request(f"response {rid!r} is still {status}: wait for it to end, or cancel it",
                                  "previous_response_id", "response_not_ended")
            history = stored.history()
        return history + req.items, len(history)

    async def lookup(self, rid: str, param: str | None) -> Stored:
        """Response `rid`, kept here or, when its id names another replica, fetched from that one."""
        stored = self.store.find(rid)
        if stored is not None:
            return stored
        origin = self.peers.origin(rid) if self.peers else None
        got = await self.peers.fetch(origin, rid, param) if origin else None
        if got is None:
            raise not_kept(rid, param)
        return Stored(got["body"], [parse_item(i) for i in got["items"]], got["own"])

    async def forwarded(self, rid: str, request: Request) -> Response | None:
        """The answer of the replica that made response `rid` to this request, when that is another replica and
        this one does not keep it; else None (the request is answered here)."""
        if self.peers is None or self.store.find(rid) is not None:
            return None
        origin = self.peers.origin(rid)
        return await self.peers.forward(origin, rid, request) if origin else None

    def internal(self, rid: str, request: Request) -> Response:
        """A kept response as another replica fetches it: its body now, the items it answered and its own."""
        if self.peers is None:
            raise not_kept(rid, None)
        self.peers.check(rid, request)
        stored = self.store.get(rid)
        items = [i.model_dump(mode="json", by_alias=True, exclude_none=True) for i in stored.items]
        return Response(json.dumps({"body": stored.current(), "items": items, "own": stored.own}),
                        media_type="application/json")

    def fitted(self, req: ResponseInput, items: list[Any], offset: int) -> ChatCompletionRequest:
        """The chat request for the conversation `items`. With `truncation: "auto"`, when its prompt and reply do
        not fit the context (or the KV cache), the conversation's first items are dropped, whole turns (it then
        starts at a message that is not the assistant's; the instructions always stay), as few as make it fit;
        when none does, the whole conversation's request, which fails as it would without truncation."""
        whole = self.chat_request(req, items, offset)
        if req.truncation != "auto" or self._fits(whole):
            return whole
        starts = [k for k in range(1, len(items))
                  if isinstance(items[k], InputMessage) and items[k].role != "assistant"]
        best, lo, hi = whole, 0, len(starts) - 1
        while lo <= hi:  # fewer items never make a longer prompt: the first start that fits, by bisection
            mid = (lo + hi) // 2
            k = starts[mid]
            candidate = self.chat_request(req, items[k:], offset - k)
            if self._fits(candidate):
                best, hi = candidate, mid - 1
            else:
                lo = mid + 1
        return best

    def _fits(self, chat_req: ChatCompletionRequest) -> bool:
        ids = self.chat.prompt(chat_req)[4]
        try:
            self.chat.limits(len(ids), chat_req.requested_max_tokens, "max_output_tokens",
                             self.state.settings.default_max_tokens)
        except APIError as exc:
            if exc.code == "context_length_exceeded":
                return False
            raise
        return True

    async def count(self, req: InputTokensRequest) -> Response:
        items, offset = await self.conversation(req)
        try:
            ids = self.chat.prompt(self.fitted(req, items, offset))[4]
        except APIError as exc:
            raise renamed(exc) from None
        return Response(InputTokens(input_tokens=len(ids)).model_dump_json(), media_type="application/json")

    async def create(self, req: ResponsesRequest, request: Request) -> Response:
        chat = self.chat
        chat.log_fields(request, user=req.user, safety_identifier=req.safety_identifier)
        if req.store and self.store.capacity <= 0:
            raise bad_request("this server keeps no responses (--responses-store 0): send store: false", "store")
        items, offset = await self.conversation(req)
        try:
            plan = await chat.prepare(self.fitted(req, items, offset), request.state.request_id)
        except APIError as exc:
            raise renamed(exc) from None
        run = _Run(self, req, plan, chat.start(plan, request), items, request, listed(req.items))
        if req.background:
            run.start_background()
            return event_stream(run.replay(-1)) if req.stream else Response(json.dumps(run.body()),
                                                                            media_type="application/json")
        return event_stream(run.stream()) if req.stream else await run.whole()

    def get(self, rid: str, stream: bool = False, starting_after: int | None = None) -> Response:
        """A kept response as it is now; with `stream`, a background response's events after `starting_after`
        (all of them without it), then those still to come."""
        stored = self.store.get(rid)
        if not stream:
            if starting_after is not None:
                raise bad_request("starting_after is only allowed with stream=true", "starting_after")
            return Response(json.dumps(stored.current()), media_type="application/json")
        if stored.run is None:
            raise bad_request(f"response {rid!r} was not made with background: true, and only background responses "
                              "can be streamed again", "stream", "not_background")
        return event_stream(stored.run.replay(-1 if starting_after is None else starting_after))

    def cancel(self, rid: str) -> Response:
        """Stop a background response that is queued or in progress; one that has ended is returned as it is."""
        stored = self.store.get(rid)
        if stored.run is None:
            raise bad_request(f"response {rid!r} was not made with background: true: only background responses can "
                              "be cancelled", None, "not_background")
        stored.run.cancel()
        return Response(json.dumps(stored.current()), media_type="application/json")

    def input_items(self, rid: str, after: str | None, limit: int, order: str) -> Response:
        """A stored response's own input items (not those of the responses before it), a page at a time."""
        items = self.store.get(rid).own
        if order == "desc":
            items = items[::-1]
        if after is not None:
            at = next((i for i, item in enumerate(items) if item["id"] == after), None)
            if at is None:
                raise bad_request(f"after: no input item {after!r} in response {rid!r}", "after")
            items = items[at + 1:]
        page = items[:limit]
        body = InputItemList(data=page, first_id=page[0]["id"] if page else None,
                             last_id=page[-1]["id"] if page else None, has_more=len(items) > limit)
        return Response(body.model_dump_json(), media_type="application/json")

    def delete(self, rid: str) -> Response:
        stored = self.store.get(rid)
        if stored.run is not None:
            stored.run.cancel()  # a background response still running stops first
        self.store.delete(rid)
        return Response(ResponseDeleted(id=rid).model_dump_json(), media_type="application/json")


class _Run:
    """One response being generated: the choice's text through the chat parser into output items."""

    def __init__(self, service: ResponsesService, req: ResponsesRequest, plan: ChatPlan, handle, items: list[Any],
                 request: Request, own: list[dict[str, Any]]) -> None:
        self.service, self.req, self.plan, self.handle = service, req, plan, handle
        self.items, self.request, self.own = items, request, own
        self.chat = service.chat
        self.choice: ChatChoice = self.chat.new_choice(0, plan)
        self.output = Output(encrypted=ENCRYPTED_REASONING in (req.include or ()))
        self.response = service._shell(req, plan)
        self.response.output = self.output.items  # the output so far, whenever the response is read
        # background: the task that runs the response, its events so far, and a wake-up for their readers
        self.task: asyncio.Task | None = None
        self.log: list[dict[str, Any]] = []
        self.done = False
        self._more = asyncio.Event()

    def _events(self) -> AsyncIterator[tuple]:
        return self.chat.choice_events(self.handle, [self.choice])

    def _logprobs(self, pending: list) -> list[dict[str, Any]] | None:
        if not self.req.logprobs:
            return None
        return [self.chat.traits.chat_logprob(p.event).model_dump() for p in pending]

    def body(self) -> dict[str, Any]:
        return self.response.model_dump(mode="json")

    def _finish(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Close the output and fill in the response's status and usage: the closing events and the body."""
        c = self.choice
        cut = c.finish_reason == "length"
        events = self.output.close("incomplete" if cut else "completed")
        completion_tokens = self.chat.finished(self.request, [c], self.chat.reply_text([c]))
        r = self.response
        r.status = "incomplete" if cut else "completed"
        r.incomplete_details = IncompleteDetails(reason="max_output_tokens") if cut else None
        reasoning = self.output.reasoning_text()
        tok = self.service.state.model.tokenizer
        r.usage = ResponseUsage(
            input_tokens=self.handle.prompt_tokens,
            input_tokens_details=InputTokensDetails(cached_tokens=self.handle.cached_tokens),
            output_tokens=completion_tokens,
            output_tokens_details=OutputTokensDetails(reasoning_tokens=min(completion_tokens, len(
                tok(reasoning, add_special_tokens=False)["input_ids"]) if reasoning else 0)),
            total_tokens=self.handle.prompt_tokens + completion_tokens)
        return events, self._keep()

    def _failed(self, code: str, message: str) -> dict[str, Any]:
        r = self.response
        r.status, r.error = "failed", ResponseError(code=code, message=message)
        return self._keep()

    def _keep(self) -> dict[str, Any]:
        """The finished response's body, stored when the request asked for it."""
        body = self.body()
        if self.req.store:
            self.service.store.put(self.response.id, Stored(body, self.items, self.own,
                                                            self if self.req.background else None))
        return body

    async def whole(self) -> Response:
        stopped = await self.chat.collect(self.handle, [self.choice], self.request,
                                          lambda item: self.output.add(item[2], self._logprobs(item[3])))
        if stopped is not None:
            return stopped
        return Response(json.dumps(self._finish()[1]), media_type="application/json")

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The response's events, from `response.created` to the one that ends it (completed, incomplete or
        failed)."""
        out, r = self.output, self.response
        yield out.event("response.created", response=self.body())
        r.status = "in_progress"
        yield out.event("response.in_progress", response=self.body())
        async for item in self._events():
            if item[0] == "error":
                _, code, message = self.chat.stream_failed(self.request, item[1], self.chat.reply_text([self.choice]))
                yield out.event("response.failed", response=self._failed(code, message))
                return
            for ev in out.add(item[2], self._logprobs(item[3])):
                yield ev
        events, body = self._finish()
        for ev in events:
            yield ev
        yield out.event("response.completed" if r.status == "completed" else "response.incomplete", response=body)

    async def stream(self) -> AsyncIterator[bytes]:
        completed = False
        try:
            async for ev in self.events():
                yield named_event(ev)
            completed = True
        finally:
            self.chat.stream_closed(self.request, self.handle, [self.choice], completed)

    # ---- background ----------------------------------------------------------------------------------
    def start_background(self) -> None:
        """Keep the response from now on (queued) and run it in a task of its own, which no client holds."""
        self.response.status, self.response.background = "queued", True
        self.service.store.put(self.response.id, Stored(self.body(), self.items, self.own, self))
        self.task = asyncio.get_running_loop().create_task(self._background())
        self.service.running.add(self.task)
        self.task.add_done_callback(self._ended)

    async def _background(self) -> None:
        try:
            async for ev in self.events():
                self._emit(ev)
        except asyncio.CancelledError:
            pass  # cancel() ended it

    def _ended(self, task: asyncio.Task) -> None:
        """The task is over (it ran to the end, or was cancelled, perhaps before it started): the generation stops
        if it still runs, the readers of the events stop waiting, and the access log gets the response's line."""
        self.service.running.discard(task)
        if not self.handle.finished:
            self.handle.cancel()
        self.done = True
        self._more.set()
        st = self.request.state
        access_log.info("background response", extra={
            "request_id": st.request_id, "response_id": self.response.id, "status": self.response.status,
            "input_tokens": getattr(st, "input_tokens", None), "cached_tokens": getattr(st, "cached_tokens", None),
            "output_tokens": getattr(st, "output_tokens", None),
            **({"error": st.stream_error} if getattr(st, "stream_error", None) else {}),
            **getattr(st, "log_fields", {})})

    def _emit(self, ev: dict[str, Any]) -> None:
        self.log.append(ev)
        self._more.set()
        self._more = asyncio.Event()

    async def replay(self, after: int) -> AsyncIterator[bytes]:
        """The events whose sequence number is above `after`, those kept and then those to come, to the end. The
        client leaving stops only this stream, not the response."""
        i = max(after + 1, 0)  # an event's sequence number is its place in the log
        while True:
            more = self._more
            while i < len(self.log):
                yield named_event(self.log[i])
                i += 1
            if self.done:
                return
            await more.wait()

    def cancel(self) -> None:
        """Stop the response if it has not ended: its status becomes cancelled, with the output written so far."""
        if self.done or self.task is None or self.task.done():  # done: ended, its `_ended` about to run
            return
        self.response.status = "cancelled"
        for ev in self.output.close("incomplete"):
            self._emit(ev)
        self.chat.stream_left(self.request, self.chat.reply_text([self.choice]))
        self.task.cancel()  # its end (`_ended`) stops the generation
        self.done = True  # no reader waits for more
        self._more.set()

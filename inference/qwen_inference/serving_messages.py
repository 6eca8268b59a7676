"""Anthropic's Messages API: a request's messages become chat messages and run as a chat completion does (the
chat template, tools, reasoning, grammars, the prefix cache); what the model writes comes back as content
blocks — thinking, text and tool_use, in the order written — whole, or streamed as Messages events.

Thinking blocks carry a `signature` that is the thinking text, base64-encoded (as Responses'
`encrypted_content`): a thinking block sent back must carry a signature this server wrote, and its text, when
not left out, must be the signed text. `budget_tokens` is enforced: after that many tokens of reasoning only the
end of reasoning may follow. Errors on these routes are answered in Anthropic's shape (`AnthropicErrors`)."""

from __future__ import annotations

import json
import logging
import re
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError

from .errors import APIError, bad_request, renaming
from .protocol import (ChatCompletionRequest, ChatMessage, ImagePart, MessageObject, MessagesInput, MessagesRequest,
                       MessageTokens, MToolResult, MUsage, TextPart, ToolCallFunction, ToolCallParam,
                       first_error)
from .serving import event_stream, named_event
from .serving_chat import ChatChoice, ChatPlan, ChatService
from .serving_responses import encrypt_reasoning, reasoning_from
from .toolcalls import OutputDelta, ToolCallDelta

log = logging.getLogger("qwen_inference.serving")

# the names chat completions give the fields of a request, as this API names them
_RENAMES = [(re.compile(r"tools\[(\d+)\]\.function\.parameters"), r"tools[\1].input_schema"),
            (re.compile(r"tools\.(\d+)\.function\.parameters"), r"tools.\1.input_schema"),
            (re.compile(r"tools\[(\d+)\]\.function\."), r"tools[\1]."),
            (re.compile(r"tools\.(\d+)\.function\."), r"tools.\1."),
            (re.compile(r"\bresponse_format\.json_schema\.schema\b"), "output_config.format.schema"),
            (re.compile(r"\bresponse_format(\.json_schema)?"), "output_config.format"),
            (re.compile(r"\bmax_completion_tokens\b"), "max_tokens"),
            (re.compile(r"tool_choice 'required'"), "tool_choice 'any'")]

_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                    503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}


def anthropic_error(status: int, message: str, request_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"),
                                                       "message": message}}
    if request_id:
        body["request_id"] = request_id
    return body


class AnthropicErrors:
    """ASGI middleware: on /v1/messages routes, an error answered in OpenAI's shape is rewritten in
    Anthropic's (`{"type": "error", "error": {"type", "message"}}`), whoever raised it."""

    PREFIX = "/v1/messages"  # the routes whose errors are in Anthropic's shape

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.PREFIX):
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] | None = None

        async def send_(message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held = message
                return
            if held is not None and message["type"] == "http.response.body":
                start, held = held, None
                body = message.get("body", b"")
                try:
                    data = json.loads(body)
                    error = data["error"]
                    new = json.dumps(anthropic_error(start["status"], error["message"],
                                                     scope.get("state", {}).get("request_id"))).encode()
                except (ValueError, KeyError, TypeError):
                    new = body
                headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                await send({**start, "headers": headers + [(b"content-length", str(len(new)).encode())]})
                await send({**message, "body": new})
                return
            await send(message)

        await self.app(scope, receive, send_)


renamed = renaming(_RENAMES)  # an error of the chat-completions path, naming the fields as this API does


def tool_result_text(block: MToolResult) -> str:
    """A tool result as the tool message's content; one marked is_error says so first."""
    text = block.text()
    return f"Error: {text}" if block.is_error else text


def to_messages(req: MessagesInput) -> list[ChatMessage]:
    """The request's system prompt and messages as chat messages: a user message's tool_result blocks become
    tool messages (its text blocks a user message, in the order written); an assistant message's thinking,
    text and tool_use blocks one assistant message."""
    out: list[ChatMessage] = []
    if req.system:
        system = req.system if isinstance(req.system, str) else "\n\n".join(b.text for b in req.system)
        out.append(ChatMessage(role="system", content=system))
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            out.append(ChatMessage(role=m.role, content=m.content))
            continue
        if m.role != "assistant":
            parts: list[TextPart | ImagePart] | None = None

            def flush(parts: list[TextPart | ImagePart]) -> None:
                images = any(isinstance(p, ImagePart) for p in parts)
                out.append(ChatMessage(role=m.role, content=parts if images else "".join(p.text for p in parts)))

            for j, block in enumerate(m.content):
                if block.type == "tool_result":
                    if parts is not None:
                        flush(parts)
                        parts = None
                    out.append(ChatMessage(role="tool", content=tool_result_text(block),
                                           tool_call_id=block.tool_use_id))
                elif block.type == "image":
                    parts = (parts or []) + [ImagePart.of(block.source.data_url(),
                                                          f"messages.{i}.content.{j}.source.data")]
                else:
                    parts = (parts or []) + [TextPart(type="text", text=block.text)]
            if parts is not None or not m.content:
                flush(parts or [])
            continue
        reasoning, content, calls = [], [], []
        for j, block in enumerate(m.content):
            if block.type == "thinking":
                reasoning.append(signed_thinking(i, j, block.thinking, block.signature))
            elif block.type == "text":
                content.append(block.text)
            else:
                calls.append(ToolCallParam(id=block.id, function=ToolCallFunction(
                    name=block.name, arguments=json.dumps(block.input, ensure_ascii=False))))
        out.append(ChatMessage(role="assistant", content="".join(content) if content or not calls else None,
                               tool_calls=calls or None, reasoning="".join(reasoning) if reasoning else None))
    return out


def prefilled(req: MessagesInput) -> bool:
    """Whether the request ends with the start of the reply (a last message from the assistant), which the reply
    goes on from; such a message may hold text (and thinking) but no tool_use, and the reply does not think."""
    last = req.messages[-1]
    if last.role != "assistant":
        return False
    at = f"messages.{len(req.messages) - 1}"
    if not isinstance(last.content, str) and any(b.type == "tool_use" for b in last.content):
        raise bad_request(f"{at}: a prefilled reply (a last message from the assistant) may not hold tool_use "
                          "blocks", at)
    if req.thinking is not None and req.thinking.type != "disabled":
        raise bad_request("thinking cannot be combined with a prefilled reply (a last message from the assistant)",
                          "thinking")
    return True


def signed_thinking(i: int, j: int, thinking: str, signature: str) -> str:
    """The text of a thinking block sent back: the one its signature carries."""
    param = f"messages.{i}.content.{j}"
    signed = reasoning_from(signature)
    if signed is None:
        raise bad_request(f"{param}.signature was not written by this server", f"{param}.signature")
    if thinking and thinking != signed:
        raise bad_request(f"{param}.thinking is not the text its signature carries: thinking blocks must be sent "
                          "back unchanged", f"{param}.thinking")
    return signed


_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


class MessagesService:
    def __init__(self, state, chat: ChatService) -> None:
        self.state = state
        self.chat = chat

    def chat_request(self, req: MessagesInput, *, max_tokens: int | None = None) -> ChatCompletionRequest:
        messages = to_messages(req)
        choice: Any = None
        if req.tool_choice is not None:
            c = req.tool_choice
            choice = ({"type": "function", "function": {"name": c.name}} if c.type == "tool"
                      else {"any": "required"}.get(c.type, c.type))
        fmt = req.output_config.format if req.output_config is not None else None
        thinking = req.thinking
        if thinking is not None and thinking.budget_tokens is not None and max_tokens is not None \
                and thinking.budget_tokens >= max_tokens:
            raise bad_request("thinking.budget_tokens must be less than max_tokens", "thinking.budget_tokens")
        prefill = prefilled(req)
        sampling: dict[str, Any] = {}
        if isinstance(req, MessagesRequest):
            sampling = dict(max_completion_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                            top_k=req.top_k, stop=req.stop_sequences,
                            user=req.metadata.user_id if req.metadata is not None else None)
        try:
            return ChatCompletionRequest(
                messages=messages, model=req.model, **sampling, add_generation_prompt=not prefill,
                continue_final_message=prefill,
                tools=[t.to_chat() for t in req.tools] if req.tools else None, tool_choice=choice,
                parallel_tool_calls=(False if req.tool_choice is not None
                                     and req.tool_choice.disable_parallel_tool_use else None),
                chat_template_kwargs=({"enable_thinking": thinking.type != "disabled"} if thinking is not None
                                      else None),
                response_format=({"type": "json_schema", "json_schema": {"name": "output", "schema": fmt.schema_,
                                                                         "strict": True}}
                                 if fmt is not None else None))
        except ValidationError as exc:  # what the chat request checks across messages
            loc, msg = first_error(exc.errors())
            raise renamed(bad_request(msg, ".".join(loc) or None)) from None

    def count(self, req: MessagesInput) -> Response:
        try:
            ids = self.chat.prompt(self.chat_request(req))[4]
        except APIError as exc:
            raise renamed(exc) from None
        return Response(MessageTokens(input_tokens=len(ids)).model_dump_json(), media_type="application/json")

    async def create(self, req: MessagesRequest, request: Request) -> Response:
        chat = self.chat
        try:
            creq = self.chat_request(req, max_tokens=req.max_tokens)
            chat.log_fields(request, user=creq.user)
            budget = req.thinking.budget_tokens if req.thinking is not None else None
            plan = await chat.prepare(creq, request.state.request_id, reasoning_budget=budget)
        except APIError as exc:
            raise renamed(exc) from None
        run = _Run(self, req, plan, chat.start(plan, request), request)
        return event_stream(run.stream()) if req.stream else await run.whole()


class Blocks:
    """A message's content blocks, built from what the model writes, with the stream's events for each step:
    a block is opened when the kind of text changes (thinking, text, a new tool call) and closed when the next
    one opens or the reply ends."""

    def __init__(self, show_thinking: bool) -> None:
        self.blocks: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None
        self.show_thinking = show_thinking
        self.calls: dict[int, dict[str, Any]] = {}  # a call's index in the reply -> its block
        self.thought: dict[int, list[str]] = {}  # a thinking block's index -> its text (shown or not)
        self.arguments: dict[int, list[str]] = {}  # a tool_use block's index -> its input, as written

    def add(self, d: OutputDelta) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if d.reasoning:
            events += self._text("thinking", d.reasoning)
        if d.content:
            events += self._text("text", d.content)
        for call in d.tool_calls:
            events += self._call(call)
        return events

    def _start(self, block: dict[str, Any]) -> list[dict[str, Any]]:
        events = self.close()
        self.blocks.append(block)
        self.open = block
        return events + [{"type": "content_block_start", "index": len(self.blocks) - 1,
                          "content_block": json.loads(json.dumps(block))}]

    def _text(self, kind: str, text: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if self.open is None or self.open["type"] != kind:
            events += self._start({"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking"
                                  else {"type": "text", "text": ""})
        index = len(self.blocks) - 1
        if kind == "thinking":
            self.thought.setdefault(index, []).append(text)
            if not self.show_thinking:
                return events
            self.blocks[index]["thinking"] += text
            return events + [{"type": "content_block_delta", "index": index,
                              "delta": {"type": "thinking_delta", "thinking": text}}]
        self.blocks[index]["text"] += text
        return events + [{"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}]

    def _call(self, call: ToolCallDelta) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        block = self.calls.get(call.index)
        if block is None:
            block = {"type": "tool_use", "id": call.id or "toolu_" + uuid.uuid4().hex[:24], "name": call.name or "",
                     "input": {}}
            self.calls[call.index] = block
            events += self._start(block)
            self.arguments[len(self.blocks) - 1] = []
        index = self.blocks.index(block)
        if call.arguments:
            self.arguments[index].append(call.arguments)
            events.append({"type": "content_block_delta", "index": index,
                           "delta": {"type": "input_json_delta", "partial_json": call.arguments}})
        return events

    def close(self) -> list[dict[str, Any]]:
        block, self.open = self.open, None
        if block is None:
            return []
        index = self.blocks.index(block)
        events = []
        if block["type"] == "thinking":
            block["signature"] = encrypt_reasoning("".join(self.thought[index]))
            events.append({"type": "content_block_delta", "index": index,
                           "delta": {"type": "signature_delta", "signature": block["signature"]}})
        elif block["type"] == "tool_use":
            try:
                block["input"] = json.loads("".join(self.arguments[index]) or "{}")
            except ValueError:  # cut short (max_tokens): what was written, as Anthropic's clients read it
                block["input"] = {}
        return events + [{"type": "content_block_stop", "index": index}]


class _Run:
    """One message being generated: the choice's text through the chat parser into content blocks."""

    def __init__(self, service: MessagesService, req: MessagesRequest, plan: ChatPlan, handle,
                 request: Request) -> None:
        self.service, self.req, self.plan, self.handle, self.request = service, req, plan, handle, request
        self.chat = service.chat
        self.choice: ChatChoice = self.chat.new_choice(0, plan)
        show = req.thinking is None or req.thinking.display is None
        self.blocks = Blocks(show_thinking=show)
        self.id = "msg_" + uuid.uuid4().hex

    def _events(self) -> AsyncIterator[tuple]:
        return self.chat.choice_events(self.handle, [self.choice])

    def _usage(self, output_tokens: int) -> MUsage:
        h = self.handle
        return MUsage(input_tokens=h.prompt_tokens - h.cached_tokens, output_tokens=output_tokens,
                      cache_read_input_tokens=h.cached_tokens)

    def _message(self, output_tokens: int, final: bool) -> MessageObject:
        c = self.choice
        stop_reason = stop_sequence = None
        if final:
            stop_sequence = c.text.stop.matched
            stop_reason = "stop_sequence" if stop_sequence is not None else _STOP_REASONS[c.finish_reason]
        return MessageObject(id=self.id, model=self.service.state.settings.model_name,
                             content=self.blocks.blocks if final else [], stop_reason=stop_reason,
                             stop_sequence=stop_sequence, usage=self._usage(output_tokens))

    async def whole(self) -> Response:
        stopped = await self.chat.collect(self.handle, [self.choice], self.request,
                                          lambda item: self.blocks.add(item[2]))
        if stopped is not None:
            return stopped
        self.blocks.close()
        completion_tokens = self.chat.finished(self.request, [self.choice], self.chat.reply_text([self.choice]))
        return Response(self._message(completion_tokens, True).model_dump_json(), media_type="application/json")

    async def stream(self) -> AsyncIterator[bytes]:
        completed = False
        try:
            yield named_event({"type": "message_start", "message": self._message(0, False).model_dump(mode="json")})
            yield named_event({"type": "ping"})
            async for item in self._events():
                if item[0] == "error":
                    status, _, message = self.chat.stream_failed(self.request, item[1],
                                                                 self.chat.reply_text([self.choice]))
                    yield named_event(anthropic_error(status, message, self.request.state.request_id))
                    completed = True
                    return
                for ev in self.blocks.add(item[2]):
                    yield named_event(ev)
            for ev in self.blocks.close():
                yield named_event(ev)
            completion_tokens = self.chat.finished(self.request, [self.choice], self.chat.reply_text([self.choice]))
            final = self._message(completion_tokens, True)
            yield named_event({"type": "message_delta",
                        "delta": {"stop_reason": final.stop_reason, "stop_sequence": final.stop_sequence},
                        "usage": final.usage.model_dump()})
            yield named_event({"type": "message_stop"})
            completed = True
        finally:
            self.chat.stream_closed(self.request, self.handle, [self.choice], completed)

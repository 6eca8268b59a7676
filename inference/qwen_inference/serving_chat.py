"""Chat completions: from a validated request to a prompt (the chat template, with tools and reasoning
switches), to the engine (with a grammar when the request asks for structured output or forces a tool call),
and back as JSON or SSE: reasoning, content and tool calls parsed out of what the model writes, per choice."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import Response

from .engine import FinishEvent, Request as EngineRequest, TokenEvent
from .errors import bad_request
from .protocol import (THINKING_BY_EFFORT, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatMessage,
                       Choice, ChoiceLogprobs, ChunkChoice, Delta, FunctionOut, ImagePart, ResponseMessage, TextPart,
                       ToolCallOut, error_body, now)
from .reasoning import Thinking, thinking_mode
from .serving import (_TEMPLATE_RESERVED, THINKING_KWARGS, ChoiceText, GenerationService, Pending, Submission,
                      event_stream, sse, sse_event, until_disconnect, usage)
from .toolcalls import OutputDelta, OutputParser

log = logging.getLogger("qwen_inference.serving")


@dataclass
class ToolPlan:
    tools: list[dict] | None  # given to the chat template (None: no tools, or tool_choice "none")
    choice: str  # "none", "auto", "required" or the forced function's name
    parallel: bool

    @property
    def forced(self) -> bool:
        return self.choice not in ("none", "auto")


@dataclass
class ChatPlan:
    submission: Submission
    stops: list[str] | None
    n: int
    thinking: Thinking
    tool_style: str | None  # None: tool calls are not parsed
    tools: ToolPlan
    logprobs: bool
    messages: list[dict]
    keep_stop: bool = False  # vLLM's include_stop_str_in_output: the stop string met stays in the reply


class ChatChoice:
    """One choice of a chat reply: its text, split into reasoning, content and tool calls as it comes."""

    def __init__(self, index: int, text: ChoiceText, parser: OutputParser, one_call: bool) -> None:
        self.index = index
        self.text = text
        self.parser = parser
        self.one_call = one_call  # parallel_tool_calls false without a grammar: the first call only
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.raw: list[str] = []
        self.logprobs: list[Pending] = []
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.event: FinishEvent | None = None  # the engine's, when it ended the choice

    def _keep(self, d: OutputDelta) -> OutputDelta:
        if self.one_call:
            d.tool_calls = [c for c in d.tool_calls if c.index == 0]
        self.reasoning.append(d.reasoning)
        self.content.append(d.content)
        return d

    def feed(self, text: str) -> OutputDelta:
        if not text:
            return OutputDelta()
        self.raw.append(text)
        return self._keep(self.parser.feed(text))

    def end(self, reason: str, completion_tokens: int, tail: str) -> OutputDelta:
        d = self.feed(tail)
        last = self._keep(self.parser.flush())
        d.reasoning += last.reasoning
        d.content += last.content
        d.tool_calls += last.tool_calls
        self.completion_tokens = completion_tokens
        self.finish_reason = "tool_calls" if reason == "stop" and self.calls else reason
        return d

    def take_logprobs(self) -> list[Pending]:
        got = self.text.take()
        self.logprobs += got
        return got

    @property
    def calls(self):
        calls = self.parser.tool_calls
        return calls[:1] if self.one_call else calls

    def message(self) -> ResponseMessage:
        reasoning = "".join(self.reasoning) if self.parser.reasoning.had_reasoning else None
        content = "".join(self.content)
        calls = [ToolCallOut(id=c.id, function=FunctionOut(name=c.name, arguments=c.arguments)) for c in self.calls]
        return ResponseMessage(content=None if calls and not content else content, reasoning=reasoning,
                               reasoning_content=reasoning, tool_calls=calls or None)


def _template_message(i: int, m: ChatMessage) -> dict[str, Any]:
    """A message as Qwen's chat templates read it: tool-call arguments as an object, reasoning as
    `reasoning_content`, content always a string."""
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.images:  # the parts in order, each image as the template's image part
        out["content"] = [{"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"}
                          for p in m.content]
    if m.name is not None:
        out["name"] = m.name
    if m.tool_calls:
        calls = []
        for j, call in enumerate(m.tool_calls):
            try:
                args = json.loads(call.function.arguments)
            except ValueError:
                args = None
            if not isinstance(args, dict):
                raise bad_request(f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object, as text",
                                  f"messages.{i}.tool_calls.{j}.function.arguments")
            calls.append({"id": call.id, "type": "function",
                          "function": {"name": call.function.name, "arguments": args}})
        out["tool_calls"] = calls
    if m.thought is not None:
        out["reasoning_content"] = m.thought
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


class ChatService(GenerationService):
    # ---- the prompt -------------------------------------------------------------------------------
    def template_kwargs(self, kwargs: dict[str, Any] | None, effort: str | None = None) -> dict[str, Any]:
        """chat_template_kwargs, checked against what the template reads, with reasoning_effort and the server's
        --default-thinking folded into enable_thinking."""
        out = dict(kwargs or {})
        readable = self.traits.template_variables | {"enable_thinking"}
        for key, value in out.items():
            param = f"chat_template_kwargs.{key}"
            if key in _TEMPLATE_RESERVED:
                raise bad_request(f"{param}: the server sets {key} itself", param)
            if key not in readable:
                raise bad_request(f"{param}: this model's chat template does not read {key}"
                                  + (f" (it reads: {', '.join(sorted(readable))})" if readable else ""), param)
            if key in THINKING_KWARGS and not isinstance(value, bool):
                raise bad_request(f"{param} must be true or false", param)
        if effort is not None:
            think = THINKING_BY_EFFORT[effort]
            if "enable_thinking" in out and out["enable_thinking"] != think:
                raise bad_request(f"reasoning_effort {effort!r} turns thinking {'on' if think else 'off'}, "
                                  "chat_template_kwargs.enable_thinking the other way: send one of them",
                                  "reasoning_effort")
            out["enable_thinking"] = think
        elif "enable_thinking" not in out and self.state.settings.default_thinking != "template":
            out["enable_thinking"] = self.state.settings.default_thinking == "on"
        return out

    def tool_plan(self, tools: list[dict] | None, tool_choice: Any, parallel: bool | None) -> ToolPlan:
        from .structured import StructuredOutputError, _check_tool_choice, _check_tools, check_json_schema

        if isinstance(tool_choice, dict) and tool_choice.get("type") in ("allowed_tools", "custom"):
            raise bad_request(f"tool_choice of type {tool_choice['type']!r} is not supported: use 'none', 'auto', "
                              "'required' or a named function", "tool_choice", "invalid_tools")
        try:
            functions = _check_tools(tools)
            choice = _check_tool_choice(tool_choice, functions)
            for name, fn in functions.items():
                params = fn.get("parameters")
                param = f"tools[{fn['_index']}].function.parameters"
                if params is not None:
                    if not isinstance(params, dict) or params.get("type", "object") != "object":
                        raise StructuredOutputError(f"{param} must be a JSON schema of an object", param)
                    # with a grammar, strict is checked when it compiles; without one the schema is only checked
                    check_json_schema(params, strict=False, param=param)
        except StructuredOutputError as exc:
            raise bad_request(str(exc), exc.param, "invalid_tools") from None
        return ToolPlan(tools if functions and choice != "none" else None, choice,
                        True if parallel is None else parallel)

    def render(self, messages: list[dict], tools: list[dict] | None, kwargs: dict[str, Any], *,
               add_generation_prompt: bool = True, continue_final_message: bool = False) -> str:
        tok = self.state.model.tokenizer
        try:
            return tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                           add_generation_prompt=add_generation_prompt,
                                           continue_final_message=continue_final_message, **kwargs)
        except Exception as exc:  # noqa: BLE001: a template that rejects these messages
            raise bad_request(f"the messages cannot be rendered with the chat template: {exc}", "messages") from None

    def messages(self, messages: list[ChatMessage]) -> list[dict[str, Any]]:
        return [_template_message(i, m) for i, m in enumerate(messages)]

    def prompt(self, req: ChatCompletionRequest) -> tuple[ToolPlan, dict[str, Any], list[dict], str, list[int], Any]:
        """The request's prompt: its tool plan, template variables, messages as the template reads them, the
        rendered text with its token ids (each image's placeholder as wide as the image), and its images
        (`engine.media.Media`, or None)."""
        self.check_model(req.model)
        urls = self.image_urls(req.messages)
        tools = self.tool_plan(req.tools, req.tool_choice, req.parallel_tool_calls)
        kwargs = self.template_kwargs(req.chat_template_kwargs, req.reasoning_effort)
        messages = self.messages(req.messages)
        text = self.render(messages, tools.tools, kwargs, add_generation_prompt=req.add_generation_prompt,
                           continue_final_message=req.continue_final_message)
        ids = self.state.model.tokenizer(text, add_special_tokens=False)["input_ids"]
        media = None
        if urls:
            from .multimodal import BadImage

            try:
                ids, media = self.state.model.images.prepare(ids, urls)
            except BadImage as exc:
                raise bad_request(f"{exc.param}: {exc}", exc.param) from None
        return tools, kwargs, messages, text, ids, media

    def image_urls(self, messages: list[ChatMessage]) -> list[tuple[str, str]]:
        """(request field, URL) of every image in the messages, in order; a model that reads no images refuses."""
        urls = []
        for i, m in enumerate(messages):
            if isinstance(m.content, list):
                urls += [(p._param or f"messages.{i}.content.{j}.image_url.url", p.image_url.url)
                         for j, p in enumerate(m.content) if isinstance(p, ImagePart)]
        if urls and self.state.model.images is None:
            raise bad_request(f"{urls[0][0]}: this model reads no images (it has no vision tower, or the server runs "
                              "with --max-images 0): send text parts", urls[0][0])
        return urls

    async def prepare(self, req: ChatCompletionRequest, request_id: str | None = None,
                      reasoning_budget: int | None = None) -> ChatPlan:
        """`reasoning_budget`: the most tokens the reply may reason for, after which its reasoning is ended (the
        Messages API's `budget_tokens`; chat's `thinking_token_budget` otherwise)."""
        if reasoning_budget is None:
            reasoning_budget = req.thinking_token_budget
        n = req.choices
        self.check_n(n)
        if any(m.images for m in req.messages):  # decoding and resizing images: off the event loop
            tools, kwargs, messages, text, prompt_ids, media = await asyncio.to_thread(self.prompt, req)
        else:
            tools, kwargs, messages, text, prompt_ids, media = self.prompt(req)
        structured = req.structured_outputs is not None or (
            isinstance(req.response_format, dict) and req.response_format.get("type") != "text")
        if tools.forced and structured:
            which = "structured_outputs" if req.structured_outputs is not None else "response_format"
            raise bad_request(f"{which} cannot be combined with tool_choice {req.tool_choice!r}: the reply is a "
                              "tool call", which)
        field_name = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        max_tokens = self.limits(len(prompt_ids), req.requested_max_tokens, field_name,
                                 self.state.settings.default_max_tokens, n)
        thinking = thinking_mode(text, has_think_tokens=self.traits.has_think_tokens)
        if tools.forced:
            style = self.traits.tool_style
            constraint = await self.grammar.run(lambda g: g.for_tools(
                req.tools, req.tool_choice, tools.parallel, style, thinking=thinking))
        else:
            constraint = await self.structured(req, thinking)
        if reasoning_budget is not None:
            grammar = constraint
            constraint = await self.grammar.run(lambda g: g.with_budget(grammar, thinking, reasoning_budget))
        self.note_unenforced(request_id, constraint)
        params = self.sampling(req, max_tokens, req.logprobs_k)
        return ChatPlan(
            # with tools (or every turn's reasoning kept), the next prompt likely repeats this reply as written
            submission=Submission(prompt_ids, params, EngineRequest(
                n=n, constraint=constraint, continues=bool(tools.tools) or kwargs.get("preserve_thinking") is True,
                media=media)),
            stops=req.stop,  # type: ignore[arg-type]
            keep_stop=req.include_stop_str_in_output,
            n=n,
            thinking=thinking,
            tool_style=self.traits.tool_style if tools.tools else None,
            tools=tools,
            logprobs=req.logprobs_k is not None,
            messages=messages,
        )

    # ---- responses --------------------------------------------------------------------------------
    async def complete(self, req: ChatCompletionRequest, request: Request) -> Response:
        self.log_fields(request, user=req.user, safety_identifier=req.safety_identifier)
        plan = await self.prepare(req, request.state.request_id)
        handle = self.start(plan, request)
        choices = [self.new_choice(i, plan) for i in range(plan.n)]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return event_stream(self._stream(handle, plan, choices, request, include_usage))
        return await self._whole(handle, plan, choices, request)

    def start(self, plan: ChatPlan, request: Request):
        """Submit the planned request to the engine; its handle."""
        handle = self.submit(request.state.request_id, plan.submission)
        request.state.input_tokens = handle.prompt_tokens
        request.state.handles = [handle]
        if self.state.settings.log_prompts:  # the access log line carries them (--log-prompts, off by default)
            request.state.prompt = plan.messages
            request.state.reply = ""
        return handle

    def stream_closed(self, request: Request, handle, choices: list[ChatChoice], completed: bool) -> None:
        """A stream ended: recorded as abandoned when it did not complete (the client went away mid-stream), and
        the generation stopped if it still runs."""
        if not completed:
            self.stream_left(request, self.reply_text(choices))
        if not handle.finished:
            handle.cancel()

    async def collect(self, handle, choices: list[ChatChoice], request: Request,
                      each: Callable[[tuple], None] | None = None) -> Response | None:
        """Run a whole (not streamed) request to its end, calling `each` with every event of its choices: the
        answer to one that did not finish (499 when the client left, else the failure), or None when it did."""
        async def consume():
            async for item in self.choice_events(handle, choices):
                if item[0] == "error":
                    return item[1]
                if each is not None:
                    each(item)
            return None

        try:
            ok, failure = await until_disconnect(request, consume())
        finally:
            if not handle.finished:
                handle.cancel()
        return self.unfinished(request, not ok, failure, any(c.finish_reason is None for c in choices),
                               self.reply_text(choices))

    def new_choice(self, index: int, plan: ChatPlan) -> ChatChoice:
        tok = self.state.model.tokenizer
        parser = OutputParser(plan.thinking, plan.tool_style, plan.tools.tools, incremental=plan.tools.forced)
        one_call = plan.tool_style is not None and not plan.tools.parallel and not plan.tools.forced
        text = ChoiceText(tok, plan.stops, plan.logprobs, plan.submission.params.min_tokens, plan.keep_stop)
        return ChatChoice(index, text, parser, one_call)

    async def choice_events(self, handle, choices: list[ChatChoice]) -> AsyncIterator[tuple]:
        """("delta", choice, OutputDelta, logprobs) as text comes, ("finish", choice, OutputDelta, logprobs) when a
        choice ends, or ("error", FinishEvent) when the request fails."""
        open_ = {c.index for c in choices}
        async for ev in handle.events():
            if isinstance(ev, TokenEvent):
                if ev.index not in open_:
                    continue  # a choice that reached a stop string while others run on
                c = choices[ev.index]
                d = c.feed(c.text.add(ev))
                if d:
                    yield "delta", c, d, c.take_logprobs()
                if c.text.stopped:
                    open_.discard(c.index)
                    yield "finish", c, c.end("stop", c.text.tokens, ""), c.take_logprobs()
                    if not open_:
                        handle.cancel("stop")
                        return
            elif isinstance(ev, FinishEvent):
                if ev.index not in open_:
                    continue
                if ev.reason not in ("stop", "length"):
                    yield "error", ev
                    return
                c = choices[ev.index]
                c.event = ev
                open_.discard(c.index)
                yield "finish", c, c.end(ev.reason, ev.completion_tokens, c.text.end()), c.take_logprobs()
                if not open_:
                    return

    def _logprobs(self, lps: list[Pending]) -> ChoiceLogprobs:
        return ChoiceLogprobs(content=[self.traits.chat_logprob(p.event) for p in lps])

    def reply_text(self, choices: list[ChatChoice]) -> Any:
        texts = ["".join(c.raw) for c in choices]
        return texts[0] if len(texts) == 1 else texts

    async def _whole(self, handle, plan: ChatPlan, choices: list[ChatChoice], request: Request) -> Response:
        stopped = await self.collect(handle, choices, request)
        if stopped is not None:  # the client went away (the slot is freed now), or the request failed
            return stopped
        completion_tokens = self.finished(request, choices, self.reply_text(choices))
        body = ChatCompletion(
            id="chatcmpl-" + request.state.request_id,
            created=now(),
            model=self.state.settings.model_name,
            choices=[Choice(index=c.index, message=c.message(), finish_reason=c.finish_reason,
                            logprobs=self._logprobs(c.logprobs) if plan.logprobs else None) for c in choices],
            usage=usage(handle.prompt_tokens, completion_tokens, handle.cached_tokens),
        )
        return Response(body.model_dump_json(), media_type="application/json")

    async def _stream(self, handle, plan: ChatPlan, choices: list[ChatChoice], request: Request,
                      include_usage: bool) -> AsyncIterator[bytes]:
        cid = "chatcmpl-" + request.state.request_id
        created = now()
        model = self.state.settings.model_name

        def chunk(index: int, delta: Delta, finish: str | None = None, lps: list[Pending] | None = None) -> bytes:
            lp = self._logprobs(lps) if plan.logprobs and lps else None
            body = ChatCompletionChunk(id=cid, created=created, model=model,
                                       choices=[ChunkChoice(index=index, delta=delta, finish_reason=finish,
                                                            logprobs=lp)])
            return sse_event(body.dumps(include_usage))

        def deltas(index: int, d: OutputDelta, lps: list[Pending]) -> list[bytes]:
            parts = []
            if d.reasoning:
                parts.append(Delta(reasoning=d.reasoning, reasoning_content=d.reasoning))
            if d.content:
                parts.append(Delta(content=d.content))
            for call in d.tool_calls:
                parts.append(Delta(tool_calls=[call.to_openai()]))
            return [chunk(index, p, lps=lps if j == 0 else None) for j, p in enumerate(parts)]

        completed = False
        try:
            for c in choices:
                yield chunk(c.index, Delta(role="assistant", content=""))
            async for item in self.choice_events(handle, choices):
                kind = item[0]
                if kind == "error":
                    _, code, message = self.stream_failed(request, item[1], self.reply_text(choices))
                    yield sse(error_body(message, "server_error", None, code))
                    yield sse("[DONE]")
                    completed = True
                    return
                _, c, d, lps = item
                out = deltas(c.index, d, lps)
                for b in out:
                    yield b
                if kind == "finish":
                    yield chunk(c.index, Delta(), c.finish_reason, lps=None if out else lps)
            completion_tokens = self.finished(request, choices, self.reply_text(choices))
            if include_usage:
                last = ChatCompletionChunk(id=cid, created=created, model=model, choices=[],
                                           usage=usage(handle.prompt_tokens, completion_tokens, handle.cached_tokens))
                yield sse_event(last.dumps(include_usage=True))
            yield sse("[DONE]")
            completed = True
        finally:
            self.stream_closed(request, handle, choices, completed)

"""Chat completions: from a validated request to a prompt, to the engine, and back as JSON or SSE, built from
protocol.py's response models."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from .detokenizer import IncrementalDetokenizer, StopStringMatcher
from .engine import EngineDead, QueueFull, SamplingParams
from .engine.engine import FinishEvent, TokenEvent
from .errors import APIError, bad_request
from .protocol import (ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice, ChunkChoice, Delta,
                       ResponseMessage, Usage, error_body, now)

log = logging.getLogger("qwen_inference.serving")


@dataclass
class Prepared:
    prompt_ids: list[int]
    params: SamplingParams
    stops: list[str] | None
    messages: list[dict[str, str]]


def sse(data: Any) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return sse_event(payload)


def sse_event(payload: str) -> bytes:
    return f"data: {payload}\n\n".encode()


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


class ChatService:
    def __init__(self, state) -> None:
        self.state = state  # the ServerState: settings, metrics, loaded model

    # ---- preparation ------------------------------------------------------------------------------
    def prepare(self, req: ChatCompletionRequest) -> Prepared:
        settings, model = self.state.settings, self.state.model
        if req.model and req.model != settings.model_name:
            raise APIError(404, f"The model `{req.model}` does not exist; this server serves `{settings.model_name}`.",
                           "invalid_request_error", "model", "model_not_found", reason="not_found")
        messages = []
        for i, m in enumerate(req.messages):
            role = "system" if m.role == "developer" else m.role
            messages.append({"role": role, "content": m.text()})
        tok = model.tokenizer
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
        except Exception as exc:  # noqa: BLE001: a template that rejects these messages
            raise bad_request(f"the messages cannot be rendered with the chat template: {exc}", "messages")
        n_prompt = len(prompt_ids)
        limit = model.max_model_len
        if n_prompt >= limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, your messages resulted in "
                f"{n_prompt} tokens.", "messages", "context_length_exceeded", reason="context_length")
        requested = req.requested_max_tokens
        cap = settings.max_tokens_cap
        if requested is not None:
            if requested > cap:
                field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
                raise bad_request(f"{field} is {requested}, more than this server allows ({cap}).", field,
                                  "max_tokens_exceeded")
            if n_prompt + requested > limit:
                raise bad_request(
                    f"This model's maximum context length is {limit} tokens. However, you requested "
                    f"{n_prompt + requested} tokens ({n_prompt} in the messages, {requested} in the completion).",
                    "max_tokens", "context_length_exceeded", reason="context_length")
            max_tokens = requested
        else:
            max_tokens = min(settings.default_max_tokens, limit - n_prompt)
        kv_room = model.engine.kv_capacity_tokens
        if n_prompt + max_tokens > kv_room:
            raise bad_request(
                f"the prompt and reply ({n_prompt + max_tokens} tokens) exceed the KV cache ({kv_room} tokens); "
                "ask for fewer max_tokens", "max_tokens", "context_length_exceeded", reason="context_length")
        d = model.generation_defaults
        temperature = req.temperature if req.temperature is not None else d.get("temperature", 1.0)
        top_k = req.top_k if req.top_k is not None else d.get("top_k", 0)
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=float(temperature),
            top_p=float(req.top_p if req.top_p is not None else d.get("top_p", 1.0)),
            top_k=max(0, int(top_k)),
            seed=req.seed,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=float(req.repetition_penalty if req.repetition_penalty is not None
                                     else d.get("repetition_penalty", 1.0)),
            ignore_eos=req.ignore_eos,
        )
        return Prepared(prompt_ids, params, req.stop, messages)  # type: ignore[arg-type]

    def submit(self, request_id: str, prepared: Prepared):
        engine = self.state.model.engine
        try:
            return engine.submit(request_id, prepared.prompt_ids, prepared.params, self.state.settings.request_timeout)
        except QueueFull as exc:
            raise APIError(429, "The server is busy: too many requests are waiting. Retry later.",
                           "rate_limit_error", None, "queue_full", reason="queue_full",
                           headers={"Retry-After": str(exc.retry_after)}) from None
        except EngineDead as exc:
            raise APIError(503, f"The model is not available: {exc}", "service_unavailable", None,
                           "engine_unavailable", reason="not_ready") from None

    # ---- responses --------------------------------------------------------------------------------
    async def complete(self, req: ChatCompletionRequest, request: Request) -> Response:
        prepared = self.prepare(req)
        rid = request.state.request_id
        handle = self.submit(rid, prepared)
        request.state.input_tokens = handle.prompt_tokens
        if self.state.settings.log_prompts:  # the access log line carries them (--log-prompts, off by default)
            request.state.prompt = prepared.messages
            request.state.reply = ""
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                self._stream(handle, prepared, request, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await self._whole(handle, prepared, request)

    def _record(self, request: Request, finish: FinishEvent | None, completion_tokens: int,
                parts: list[str] | None = None) -> None:
        st = request.state
        st.output_tokens = completion_tokens
        if parts is not None and self.state.settings.log_prompts:
            st.reply = "".join(parts)
        if finish is not None:
            st.queue_time_ms = round(finish.queue_time * 1000, 1)
            st.inference_time_ms = round(finish.inference_time * 1000, 1)

    def _fail_reason(self, ev: FinishEvent) -> tuple[int, str, str, str]:
        if ev.reason == "timeout":
            return 504, "timeout", "timeout", ev.error or "the request timed out"
        if ev.reason == "cancelled":
            return 499, "cancelled", "cancelled", "the request was cancelled"
        return 500, "generation", "internal_error", ev.error or "generation failed"

    async def _run(self, handle, prepared: Prepared) -> AsyncIterator[tuple[str, Any]]:
        """Yields ("text", str) pieces, then ("finish", (reason, completion_tokens, event)) or
        ("error", event)."""
        detok = IncrementalDetokenizer(self.state.model.tokenizer)
        matcher = StopStringMatcher(prepared.stops)
        tokens = 0
        async for ev in handle.events():
            if isinstance(ev, TokenEvent):
                tokens += 1
                piece = matcher.feed(detok.add(ev.token_id))
                if piece:
                    yield "text", piece
                if matcher.stopped:
                    handle.cancel("stop")
                    yield "finish", ("stop", tokens, None)
                    return
                continue
            if ev.reason in ("stop", "length"):
                tail = matcher.feed(detok.flush())
                tail += matcher.flush()
                if tail:
                    yield "text", tail
                reason = "stop" if matcher.stopped else ev.reason
                yield "finish", (reason, ev.completion_tokens, ev)
            else:
                yield "error", ev
            return

    async def _whole(self, handle, prepared: Prepared, request: Request) -> Response:
        metrics = self.state.metrics
        parts: list[str] = []

        async def consume():
            async for kind, value in self._run(handle, prepared):
                if kind == "text":
                    parts.append(value)
                else:
                    return kind, value
            return "error", None

        task = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if task not in done:  # the client went away: free the slot now
                handle.cancel()
                task.cancel()
                metrics.errors.labels("cancelled").inc()
                self._record(request, None, 0, parts)
                return Response(status_code=499)
            kind, value = task.result()
        finally:
            watcher.cancel()
            if not handle.finished:
                handle.cancel()
        if kind == "error":
            status, reason, code, message = self._fail_reason(value) if value else (500, "internal", "internal_error", "generation ended without a result")
            metrics.errors.labels(reason).inc()
            self._record(request, value, value.completion_tokens if value else 0, parts)
            return APIError(status, message, "server_error" if status >= 500 else "invalid_request_error",
                            None, code, reason=reason).response()
        finish_reason, completion_tokens, ev = value
        metrics.success.labels(finish_reason).inc()
        self._record(request, ev, completion_tokens, parts)
        body = ChatCompletion(
            id="chatcmpl-" + request.state.request_id,
            created=now(),
            model=self.state.settings.model_name,
            choices=[Choice(message=ResponseMessage(content="".join(parts)), finish_reason=finish_reason)],
            usage=usage(handle.prompt_tokens, completion_tokens),
        )
        return Response(body.model_dump_json(), media_type="application/json")

    async def _stream(self, handle, prepared: Prepared, request: Request, include_usage: bool) -> AsyncIterator[bytes]:
        metrics = self.state.metrics
        cid = "chatcmpl-" + request.state.request_id
        created = now()
        model = self.state.settings.model_name

        parts: list[str] = []

        def chunk(delta: Delta, finish: str | None = None) -> bytes:
            body = ChatCompletionChunk(id=cid, created=created, model=model,
                                       choices=[ChunkChoice(delta=delta, finish_reason=finish)])
            return sse_event(body.dumps(include_usage))

        completed = False
        try:
            yield chunk(Delta(role="assistant", content=""))
            async for kind, value in self._run(handle, prepared):
                if kind == "text":
                    parts.append(value)
                    yield chunk(Delta(content=value))
                    continue
                if kind == "error":
                    status, reason, code, message = self._fail_reason(value)
                    metrics.errors.labels(reason).inc()
                    self._record(request, value, value.completion_tokens, parts)
                    request.state.stream_error = code
                    yield sse(error_body(message, "server_error", None, code))
                    yield sse("[DONE]")
                    completed = True
                    return
                finish_reason, completion_tokens, ev = value
                yield chunk(Delta(), finish_reason)
                if include_usage:
                    last = ChatCompletionChunk(id=cid, created=created, model=model, choices=[],
                                               usage=usage(handle.prompt_tokens, completion_tokens))
                    yield sse_event(last.dumps(include_usage=True))
                yield sse("[DONE]")
                metrics.success.labels(finish_reason).inc()
                self._record(request, ev, completion_tokens, parts)
                completed = True
                return
        finally:
            if not completed:  # the client went away mid-stream
                metrics.errors.labels("cancelled").inc()
                request.state.stream_error = "cancelled"
                if self.state.settings.log_prompts:
                    request.state.reply = "".join(parts)
            if not handle.finished:
                handle.cancel()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return

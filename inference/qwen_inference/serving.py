"""What the generating APIs share (serving_chat.py, serving_completions.py): the model's traits, sampling
parameters and limits, constraints compiled off the event loop, submission to the engine, one choice's text
(detokenized, stop strings, log-probabilities), and errors.

Log-probabilities are those of the model's own distribution, before penalties, temperature, top-k/top-p and
any grammar's mask (as vLLM reports them).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, AsyncIterator, Callable, TypeVar

import jinja2
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from .detokenizer import IncrementalDetokenizer, StopStringMatcher
from .engine import EngineDead, FinishEvent, QueueFull, Request as EngineRequest, SamplingParams, TokenEvent
from .errors import APIError, bad_request
from .protocol import PromptTokensDetails, SamplingFields, TopLogprob, TokenLogprob, Usage

log = logging.getLogger("qwen_inference.serving")

T = TypeVar("T")


def sse(data: Any) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return sse_event(payload)


def sse_event(payload: str) -> bytes:
    return f"data: {payload}\n\n".encode()


def named_event(ev: dict[str, Any]) -> bytes:
    """An SSE event that names its type (`event: <type>`), as the Responses and Messages APIs send them."""
    return f"event: {ev['type']}\n".encode() + sse_event(json.dumps(ev, ensure_ascii=False))


def event_stream(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


# ---- the model's traits -------------------------------------------------------------------------------


def _byte_decoder() -> dict[str, int]:
    """The inverse of byte-level BPE's byte-to-character table (GPT-2's, which Qwen's tokenizers use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


# names a chat template may read that the server sets itself (or that are the template's own functions)
_TEMPLATE_RESERVED = {"messages", "tools", "documents", "add_generation_prompt", "continue_final_message",
                      "raise_exception", "strftime_now", "bos_token", "eos_token", "pad_token", "unk_token",
                      "sep_token", "cls_token", "mask_token", "additional_special_tokens"}
THINKING_KWARGS = ("enable_thinking", "preserve_thinking")


class ModelTraits:
    """What the APIs need to know about the loaded model, worked out once: its tool-call format, whether it
    can think, what its chat template reads, and each token's text and bytes."""

    def __init__(self, model) -> None:
        from .engine.models import model_type_of

        self.model = model
        self.tokenizer = model.tokenizer
        self.model_type = model_type_of(model.path)
        self.tool_style = "qwen3_5_xml" if self.model_type.startswith("qwen3_5") else "hermes"
        vocab = self.tokenizer.get_vocab()
        self.has_think_tokens = "<think>" in vocab and "</think>" in vocab
        self.tokenizer_size = len(self.tokenizer)
        self._texts: dict[int, tuple[str, bytes]] = {}
        self._lock = threading.Lock()
        decoder = getattr(self.tokenizer, "backend_tokenizer", None)
        self._byte_level = decoder is not None and type(decoder.decoder).__name__ == "ByteLevel"
        self._bytes = _byte_decoder() if self._byte_level else {}
        self._added = {i: t.content for i, t in self.tokenizer.added_tokens_decoder.items()}

    @cached_property
    def template_variables(self) -> frozenset[str]:
        """The names the chat template reads that a request may set through chat_template_kwargs."""
        from jinja2 import meta

        env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols", "jinja2.ext.do"])
        try:
            names = meta.find_undeclared_variables(env.parse(self.tokenizer.chat_template or ""))
        except jinja2.TemplateError:
            names = set()
        return frozenset(names - _TEMPLATE_RESERVED - set(env.globals))

    def token(self, token_id: int) -> tuple[str, bytes]:
        """A token's text (invalid UTF-8, as in a token that holds part of a character, shows as U+FFFD) and
        its bytes."""
        hit = self._texts.get(token_id)
        if hit is not None:
            return hit
        if token_id in self._added:
            raw = self._added[token_id].encode()
        elif 0 <= token_id < self.tokenizer_size:
            piece = self.tokenizer.convert_ids_to_tokens(token_id) or ""
            if self._byte_level:
                raw = bytes(self._bytes[c] for c in piece if c in self._bytes)
            else:
                raw = self.tokenizer.convert_tokens_to_string([piece]).encode()
        else:
            raw = b""  # an embedding row past the tokenizer's vocabulary
        out = (raw.decode("utf-8", errors="replace"), raw)
        with self._lock:
            self._texts[token_id] = out
        return out

    def chat_logprob(self, ev: TokenEvent) -> TokenLogprob:
        text, raw = self.token(ev.token_id)
        top = [TopLogprob(token=self.token(t)[0], logprob=finite(lp), bytes=list(self.token(t)[1]))
               for t, lp in (ev.top_logprobs or [])]
        return TokenLogprob(token=text, logprob=finite(ev.logprob), bytes=list(raw), top_logprobs=top)


def finite(lp: float | None) -> float:
    """JSON has no -inf: a token the model gives no chance at all gets -9999.0, as vLLM reports it."""
    if lp is None or math.isnan(lp):
        return -9999.0
    return max(lp, -9999.0)


# ---- constraints ----------------------------------------------------------------------------------------


class GrammarService:
    """The model's grammar compiler (structured.Grammars), built on first need, and compiles, in worker threads:
    never on the event loop, never on the engine's thread."""

    def __init__(self, state) -> None:
        self.state = state
        self._grammars = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="qwen-grammar")

    def grammars(self):
        with self._lock:
            if self._grammars is None:
                from .structured import Grammars

                model = self.state.model
                self._grammars = Grammars(model.tokenizer, model.engine.vocab_size,
                                          stop_token_ids=sorted(model.eos_token_ids))
            return self._grammars

    async def run(self, build: Callable[[Any], T]) -> T:
        """`build(grammars)` in a worker thread; a StructuredOutputError becomes a 400 naming the field."""
        from .structured import StructuredOutputError

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, lambda: build(self.grammars()))
        except StructuredOutputError as exc:
            raise bad_request(str(exc), exc.param, "invalid_structured_output") from None

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# ---- one choice's text ----------------------------------------------------------------------------------


@dataclass
class Pending:
    """A generated token whose log-probability has not gone out with its text yet."""

    event: TokenEvent
    offset: int  # where its text starts in the choice's generated text


class ChoiceText:
    """One choice's generated text, token by token: detokenized incrementally, cut at a stop string, with the
    tokens whose text has not gone out yet held for their log-probabilities."""

    def __init__(self, tokenizer, stops: list[str] | None, logprobs: bool, min_tokens: int = 0,
                 keep_stop: bool = False) -> None:
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stop = StopStringMatcher(stops, keep=keep_stop)
        self.logprobs = logprobs
        self.min_tokens = min_tokens  # stop strings count from the token after these (vLLM's min_tokens)
        self.tokens = 0
        self.chars = 0  # characters the detokenizer has given
        self.pending: list[Pending] = []

    def add(self, ev: TokenEvent) -> str:
        self.tokens += 1
        if self.logprobs:
            self.pending.append(Pending(ev, self.chars))
        piece = self.detok.add(ev.token_id)
        self.chars += len(piece)
        return self.stop.feed(piece, search=self.tokens > self.min_tokens)

    @property
    def stopped(self) -> bool:
        return self.stop.stopped

    def end(self) -> str:
        """What was held back, at the end of the reply."""
        return self.stop.feed(self.detok.flush()) + self.stop.flush()

    def take(self) -> list[Pending]:
        out, self.pending = self.pending, []
        return out


# ---- the shared service ---------------------------------------------------------------------------------


@dataclass
class Limits:
    max_tokens: int
    n_prompt: int


@dataclass
class Submission:
    prompt_ids: list[int]
    params: SamplingParams
    request: EngineRequest = field(default_factory=EngineRequest)


class GenerationService:
    """Checks and submission shared by chat and text completions."""

    def __init__(self, state, grammars: GrammarService) -> None:
        self.state = state  # the ServerState: settings, metrics, loaded model
        self.grammar = grammars
        self._traits: ModelTraits | None = None

    @property
    def traits(self) -> ModelTraits:
        if self._traits is None or self._traits.model is not self.state.model:
            self._traits = ModelTraits(self.state.model)
        return self._traits

    def check_model(self, name: str | None) -> None:
        served = self.state.settings.model_name
        if name and name != served:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{served}`.",
                           "invalid_request_error", "model", "model_not_found", reason="not_found")

    def check_n(self, n: int) -> None:
        cap = self.state.model.engine.max_concurrency
        if n > cap:
            raise bad_request(f"n is {n}; this server runs at most {cap} sequences at once (--max-concurrency)",
                              "n", "n_too_large")

    def limits(self, n_prompt: int, requested: int | None, field_name: str, default: int, n: int = 1,
               param_prompt: str = "messages") -> int:
        """The reply's max_tokens, after every check against the cap, the context and the KV cache."""
        settings, model = self.state.settings, self.state.model
        limit = model.max_model_len
        if n_prompt >= limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, your {param_prompt} resulted in "
                f"{n_prompt} tokens.", param_prompt, "context_length_exceeded", reason="context_length")
        cap = settings.max_tokens_cap
        if requested is not None:
            if requested > cap:
                raise bad_request(f"{field_name} is {requested}, more than this server allows ({cap}).", field_name,
                                  "max_tokens_exceeded")
            if n_prompt + requested > limit:
                raise bad_request(
                    f"This model's maximum context length is {limit} tokens. However, you requested "
                    f"{n_prompt + requested} tokens ({n_prompt} in the {param_prompt}, {requested} in the "
                    f"completion).", field_name, "context_length_exceeded", reason="context_length")
            max_tokens = requested
        else:
            max_tokens = min(default, limit - n_prompt)
        engine = model.engine
        kv_room = engine.kv_capacity_tokens
        if n_prompt + max_tokens > kv_room:
            raise bad_request(
                f"the prompt and reply ({n_prompt + max_tokens} tokens) exceed the KV cache ({kv_room} tokens); "
                "ask for fewer max_tokens", field_name, "context_length_exceeded", reason="context_length")
        if n > 1:  # the other choices share the prompt's full blocks and need room for the rest
            bs = engine.block_size
            need = -(-(n_prompt + max_tokens) // bs)
            total = need + (n - 1) * (need - n_prompt // bs)
            if total * bs > kv_room:
                raise bad_request(
                    f"{n} choices of up to {max_tokens} tokens after this prompt need {total * bs} tokens of KV cache; "
                    f"this server has {kv_room}: ask for fewer choices or max_tokens", "n",
                    "context_length_exceeded", reason="context_length")
        return max_tokens

    def sampling(self, req: SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
        d = self.state.model.generation_defaults
        temperature = req.temperature if req.temperature is not None else d.get("temperature", 1.0)
        top_k = req.top_k if req.top_k is not None else d.get("top_k", 0)
        return SamplingParams(
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
            logprobs=logprobs,
            logit_bias=self.logit_bias(req.logit_bias),
            min_p=float(req.min_p if req.min_p is not None else d.get("min_p", 0.0)),
            min_tokens=self.min_tokens(req.min_tokens, max_tokens),
            stop_token_ids=frozenset(self.token_ids(req.stop_token_ids or (), "stop_token_ids")),
        )

    @staticmethod
    def min_tokens(requested: int | None, max_tokens: int) -> int:
        if requested and requested > max_tokens:
            raise bad_request(f"min_tokens is {requested}, more than the reply's max_tokens ({max_tokens})",
                              "min_tokens")
        return requested or 0

    def token_ids(self, ids, param: str) -> list[int]:
        """Token ids a request names, each checked against the model's vocabulary (400 otherwise)."""
        vocab = self.state.model.engine.vocab_size
        outside = sorted({t for t in ids if t >= vocab})
        if outside:
            raise bad_request(f"{param} names token ids outside this model's vocabulary of {vocab}: "
                              f"{', '.join(map(str, outside[:5]))}{' …' if len(outside) > 5 else ''}", param)
        return list(ids)

    def logit_bias(self, bias: dict[str, float] | None) -> dict[int, float] | None:
        """`logit_bias` with its token ids as numbers, each checked against the model's vocabulary (400 otherwise)."""
        if not bias:
            return None
        out = {int(k): float(v) for k, v in bias.items()}
        self.token_ids(out, "logit_bias")
        return out

    async def structured(self, req: SamplingFields, thinking) -> Any:
        """The constraint factory `response_format` or `structured_outputs` asks for, compiled in a worker
        thread; None for neither (or `response_format: {"type": "text"}`)."""
        if req.response_format is not None:
            rf = req.response_format
            return await self.grammar.run(lambda g: g.for_response_format(rf, thinking=thinking))
        if req.structured_outputs is not None:
            so = req.structured_outputs
            return await self.grammar.run(lambda g: g.for_structured_outputs(so, thinking=thinking))
        return None

    @staticmethod
    def note_unenforced(request_id: str | None, constraint) -> None:
        """Log what a schema asks that its grammar does not enforce (strict: false; strict refuses it)."""
        notes = getattr(constraint, "not_enforced", ())
        if notes:
            log.warning("part of the requested schema is not enforced", extra={
                "request_id": request_id, "kind": constraint.kind, "not_enforced": list(notes)})

    def submit(self, request_id: str, sub: Submission):
        engine = self.state.model.engine
        try:
            return engine.submit(request_id, sub.prompt_ids, sub.params, self.state.settings.request_timeout,
                                 sub.request)
        except QueueFull as exc:
            raise APIError(429, "The server is busy: too many requests are waiting. Retry later.",
                           "rate_limit_error", None, "queue_full", reason="queue_full",
                           headers={"Retry-After": str(exc.retry_after)}) from None
        except EngineDead as exc:
            raise APIError(503, f"The model is not available: {exc}", "service_unavailable", None,
                           "engine_unavailable", reason="not_ready") from None
        except ValueError as exc:  # what the engine can never run
            raise bad_request(str(exc), "n") from None

    @staticmethod
    def fail_reason(ev: FinishEvent | None) -> tuple[int, str, str, str]:
        if ev is None:
            return 500, "internal", "internal_error", "generation ended without a result"
        if ev.reason == "timeout":
            return 504, "timeout", "timeout", ev.error or "the request timed out"
        if ev.reason == "cancelled":
            return 499, "cancelled", "cancelled", "the request was cancelled"
        return 500, "generation", "internal_error", ev.error or "generation failed"

    def fail_response(self, ev: FinishEvent | None):
        status, reason, code, message = self.fail_reason(ev)
        self.state.metrics.errors.labels(reason).inc()
        return APIError(status, message, "server_error" if status >= 500 else "invalid_request_error", None, code,
                        reason=reason).response()

    def record(self, request: Request, finish: FinishEvent | None, completion_tokens: int,
               reply: Any = None) -> None:
        st = request.state
        st.output_tokens = completion_tokens
        st.cached_tokens = sum(h.cached_tokens for h in getattr(st, "handles", ()))
        if reply is not None and self.state.settings.log_prompts:
            st.reply = reply
        if finish is not None:
            st.queue_time_ms = round(finish.queue_time * 1000, 1)
            st.inference_time_ms = round(finish.inference_time * 1000, 1)

    def finished(self, request: Request, choices: list, reply: Any) -> int:
        """A request whose choices all ended: counted and recorded; returns its completion tokens."""
        completion_tokens = sum(c.completion_tokens for c in choices)
        self.state.metrics.success.labels(choices[0].finish_reason).inc()
        last = next((c.event for c in choices if c.event is not None), None)
        self.record(request, last, completion_tokens, reply)
        return completion_tokens

    def unfinished(self, request: Request, left: bool, failure: FinishEvent | None, cut: bool, reply: Any):
        """The answer to a whole (not streamed) request that did not finish, or None when it did: 499 when the
        client left first (`left`), else the failure's error (`cut`: a choice ended without a finish reason)."""
        if left:
            self.state.metrics.errors.labels("cancelled").inc()
            self.record(request, None, 0, reply)
            return Response(status_code=499)
        if failure is not None or cut:
            self.record(request, failure, failure.completion_tokens if failure else 0, reply)
            return self.fail_response(failure)
        return None

    def stream_failed(self, request: Request, ev: FinishEvent, reply: Any) -> tuple[int, str, str]:
        """A streamed request's generation failed: counted and recorded; the (status, code, message) its stream
        ends with."""
        status, reason, code, message = self.fail_reason(ev)
        self.state.metrics.errors.labels(reason).inc()
        self.record(request, ev, ev.completion_tokens, reply)
        request.state.stream_error = code
        return status, code, message

    def stream_left(self, request: Request, reply: Any) -> None:
        """The client went away mid-stream."""
        self.state.metrics.errors.labels("cancelled").inc()
        request.state.stream_error = "cancelled"
        if self.state.settings.log_prompts:
            request.state.reply = reply

    @staticmethod
    def log_fields(request: Request, **fields: Any) -> None:
        """Fields of the request written to its access-log line (`user`, `safety_identifier`)."""
        given = {k: v for k, v in fields.items() if v is not None}
        if given:
            request.state.log_fields = given


async def merged(handles: list) -> AsyncIterator[tuple[int, Any]]:
    """(handle index, event) from several requests' event streams, as they come."""
    if len(handles) == 1:
        async for ev in handles[0].events():
            yield 0, ev
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, handle) -> None:
        try:
            async for ev in handle.events():
                await queue.put((i, ev))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    left = len(handles)
    try:
        while left:
            i, ev = await queue.get()
            if ev is None:
                left -= 1
                continue
            yield i, ev
    finally:
        for t in tasks:
            t.cancel()


async def wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work) -> tuple[bool, Any]:
    """Run `work` (a coroutine) unless the client goes away first: (True, its result) or (False, None)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            task.cancel()
            return False, None
        return True, task.result()
    finally:
        watcher.cancel()

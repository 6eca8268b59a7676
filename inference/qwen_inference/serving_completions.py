"""Text completions (OpenAI's legacy /v1/completions): prompts as text or token ids, no chat template; `n`
choices per prompt, indexed prompt by prompt; `echo` puts the prompt before the reply (with its tokens'
log-probabilities when `logprobs` is set); `max_tokens: 0` with `echo` scores the prompt alone."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from .detokenizer import IncrementalDetokenizer
from .engine import FinishEvent, PromptLogprobsEvent, Request as EngineRequest, TokenEvent
from .errors import APIError, bad_request
from .protocol import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, error_body, now
from .reasoning import Thinking
from .serving import ChoiceText, GenerationService, Pending, Submission, event_stream, finite, merged, sse, \
    sse_event, until_disconnect, usage

log = logging.getLogger("qwen_inference.serving")


@dataclass
class Prompt:
    ids: list[int]
    text: str  # what echo shows


@dataclass
class TextChoice:
    index: int
    prompt: int
    text: ChoiceText
    parts: list[str] = field(default_factory=list)
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0
    event: FinishEvent | None = None


class CompletionService(GenerationService):
    def prompts(self, req: CompletionRequest) -> list[Prompt]:
        tok = self.state.model.tokenizer
        size = len(tok)
        out = []
        prompts = req.prompts()
        if not prompts:
            raise bad_request("prompt must not be empty", "prompt")
        for i, p in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt.{i}"
            if isinstance(p, str):
                ids = tok(p)["input_ids"]
                text = p
            else:
                bad = next((t for t in p if t >= size), None)
                if bad is not None:
                    raise bad_request(f"{param}: token id {bad} is outside the vocabulary (0 to {size - 1})", param)
                ids, text = list(p), tok.decode(p)
            if not ids:
                raise bad_request(f"{param} must not be empty", param)
            out.append(Prompt(ids, text))
        return out

    async def complete(self, req: CompletionRequest, request: Request) -> Response:
        self.log_fields(request, user=req.user)
        self.check_model(req.model)
        n = req.choices
        self.check_n(n)
        prompts = self.prompts(req)
        score_only = req.max_tokens == 0
        max_tokens = [self.limits(len(p.ids), max(1, req.max_tokens or 0), "max_tokens", 16, n, "prompt")
                      for p in prompts]
        constraint = await self.structured(req, Thinking.OFF)
        self.note_unenforced(request.state.request_id, constraint)
        prompt_lp = req.logprobs if req.echo and req.logprobs is not None else None
        subs = [Submission(p.ids, self.sampling(req, mt, req.logprobs),
                           EngineRequest(n=n, constraint=constraint, prompt_logprobs=prompt_lp))
                for p, mt in zip(prompts, max_tokens)]
        rid = request.state.request_id
        handles = []
        try:
            for i, sub in enumerate(subs):
                handles.append(self.submit(rid if len(subs) == 1 else f"{rid}-{i}", sub))
        except APIError:
            for h in handles:
                h.cancel()
            raise
        request.state.input_tokens = sum(h.prompt_tokens for h in handles)
        request.state.handles = handles
        if self.state.settings.log_prompts:
            request.state.prompt = [p.text for p in prompts]
            request.state.reply = ""
        tok = self.state.model.tokenizer
        stops: list[str] | None = req.stop  # type: ignore[assignment]  (made a list by the request's validator)
        choices = [TextChoice(i * n + j, i, ChoiceText(tok, stops, req.logprobs is not None, req.min_tokens or 0,
                                                      req.include_stop_str_in_output))
                   for i in range(len(prompts)) for j in range(n)]
        if req.logprobs is not None:
            for c in choices:
                c.logprobs = CompletionLogprobs()
        run = _Run(self, req, prompts, handles, choices, n, score_only)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return event_stream(self._stream(run, request, include_usage))
        return await self._whole(run, request)

    # ---- log-probabilities in the legacy shape -----------------------------------------------------------
    def _add_generated(self, c: TextChoice, lps: list[Pending], base: int) -> CompletionLogprobs | None:
        if c.logprobs is None:
            return None
        part = CompletionLogprobs()
        for p in lps:
            text = self.traits.token(p.event.token_id)[0]
            lp = finite(p.event.logprob)
            top = {self.traits.token(t)[0]: finite(v) for t, v in (p.event.top_logprobs or [])}
            top.setdefault(text, lp)  # the chosen token is always there
            part.tokens.append(text)
            part.token_logprobs.append(lp)
            part.top_logprobs.append(top)
            part.text_offset.append(base + p.offset)
        _extend(c.logprobs, part)
        return part if part.tokens else None

    def _prompt_logprobs(self, prompt: Prompt, ev: PromptLogprobsEvent) -> CompletionLogprobs:
        out = CompletionLogprobs()
        detok = IncrementalDetokenizer(self.state.model.tokenizer)
        chars = 0
        for k, token_id in enumerate(prompt.ids):
            text = self.traits.token(token_id)[0]
            lp = ev.logprobs[k] if k < len(ev.logprobs) else None
            top = ev.top_logprobs[k] if ev.top_logprobs and k < len(ev.top_logprobs) else None
            out.tokens.append(text)
            out.token_logprobs.append(None if lp is None else finite(lp))
            if lp is None:
                out.top_logprobs.append(None)
            else:
                d = {self.traits.token(t)[0]: finite(v) for t, v in (top or [])}
                d.setdefault(text, finite(lp))
                out.top_logprobs.append(d)
            out.text_offset.append(chars)
            chars += len(detok.add(token_id))
        return out

    # ---- the events ------------------------------------------------------------------------------------
    async def _events(self, run: "_Run") -> AsyncIterator[tuple]:
        """("echo", prompt index, CompletionLogprobs | None) once per prompt when echo is on; ("text", choice, text,
        logprobs); ("finish", choice, text, logprobs); or ("error", FinishEvent)."""
        n = run.n
        open_ = {c.index for c in run.choices}
        per_prompt = {i: n for i in range(len(run.prompts))}
        echo_wait_lp = run.req.echo and run.req.logprobs is not None
        if run.req.echo and not echo_wait_lp:
            for i in range(len(run.prompts)):
                yield "echo", i, None
        async for i, ev in merged(run.handles):
            if isinstance(ev, PromptLogprobsEvent):
                if echo_wait_lp:
                    yield "echo", i, self._prompt_logprobs(run.prompts[i], ev)
                continue
            c = run.choices[i * n + ev.index]
            if c.index not in open_:
                continue
            if isinstance(ev, TokenEvent):
                if run.score_only:
                    continue
                text = c.text.add(ev)
                if text:
                    yield "text", c, text, c.text.take()
                if c.text.stopped:
                    c.finish_reason, c.completion_tokens = "stop", c.text.tokens
                    open_.discard(c.index)
                    yield "finish", c, "", c.text.take()
                    per_prompt[i] -= 1
                    if not per_prompt[i]:
                        run.handles[i].cancel("stop")
                    if not open_:
                        return
                continue
            if ev.reason not in ("stop", "length"):
                yield "error", ev
                return
            c.event = ev
            if run.score_only:
                c.finish_reason, c.completion_tokens, tail = "length", 0, ""
            else:
                tail = c.text.end()
                c.finish_reason, c.completion_tokens = ev.reason, ev.completion_tokens
            open_.discard(c.index)
            per_prompt[i] -= 1
            yield "finish", c, tail, c.text.take()
            if not open_:
                return

    async def _whole(self, run: "_Run", request: Request) -> Response:
        echo: dict[int, CompletionLogprobs | None] = {}

        async def consume():
            async for item in self._events(run):
                kind = item[0]
                if kind == "error":
                    return item[1]
                if kind == "echo":
                    echo[item[1]] = item[2]
                    continue
                _, c, text, lps = item
                c.parts.append(text)
                self._add_generated(c, lps, run.base(c))
            return None

        try:
            ok, failure = await until_disconnect(request, consume())
        finally:
            run.cancel()
        stopped = self.unfinished(request, not ok, failure, any(c.finish_reason is None for c in run.choices),
                                  run.reply())
        if stopped is not None:
            return stopped
        completion_tokens = self.finished(request, run.choices, run.reply())
        out = []
        for c in run.choices:
            text = "".join(c.parts)
            lp = c.logprobs
            if run.req.echo:
                text = run.prompts[c.prompt].text + text
                if lp is not None and echo.get(c.prompt) is not None:
                    lp = _joined(echo[c.prompt], lp)
            out.append(CompletionChoice(index=c.index, text=text, logprobs=lp, finish_reason=c.finish_reason))
        body = Completion(id="cmpl-" + request.state.request_id, created=now(), model=self.state.settings.model_name,
                          choices=out, usage=usage(run.prompt_tokens, completion_tokens, run.cached_tokens))
        return Response(body.model_dump_json(), media_type="application/json")

    async def _stream(self, run: "_Run", request: Request, include_usage: bool) -> AsyncIterator[bytes]:
        cid = "cmpl-" + request.state.request_id
        created = now()
        model = self.state.settings.model_name

        def chunk(index: int, text: str, lp: CompletionLogprobs | None, finish: str | None = None) -> bytes:
            body = Completion(id=cid, created=created, model=model,
                              choices=[CompletionChoice(index=index, text=text, logprobs=lp, finish_reason=finish)])
            return sse_event(body.dumps(include_usage))

        completed = False
        try:
            async for item in self._events(run):
                kind = item[0]
                if kind == "error":
                    _, code, message = self.stream_failed(request, item[1], run.reply())
                    yield sse(error_body(message, "server_error", None, code))
                    yield sse("[DONE]")
                    completed = True
                    return
                if kind == "echo":
                    i, lp = item[1], item[2]
                    for c in run.choices:
                        if c.prompt == i:
                            yield chunk(c.index, run.prompts[i].text, lp)
                    continue
                _, c, text, lps = item
                c.parts.append(text)
                part = self._add_generated(c, lps, run.base(c))
                if kind == "text":
                    yield chunk(c.index, text, part)
                else:
                    yield chunk(c.index, text, part, c.finish_reason)
            completion_tokens = self.finished(request, run.choices, run.reply())
            if include_usage:
                last = Completion(id=cid, created=created, model=model, choices=[],
                                  usage=usage(run.prompt_tokens, completion_tokens, run.cached_tokens))
                yield sse_event(last.dumps(include_usage=True))
            yield sse("[DONE]")
            completed = True
        finally:
            if not completed:
                self.stream_left(request, run.reply())
            run.cancel()


@dataclass
class _Run:
    service: CompletionService
    req: CompletionRequest
    prompts: list[Prompt]
    handles: list[Any]
    choices: list[TextChoice]
    n: int
    score_only: bool

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.ids) for p in self.prompts)

    @property
    def cached_tokens(self) -> int:
        return sum(h.cached_tokens for h in self.handles)

    def base(self, c: TextChoice) -> int:
        """Where the generated text starts in the choice's text."""
        return len(self.prompts[c.prompt].text) if self.req.echo else 0

    def reply(self) -> Any:
        texts = ["".join(c.parts) for c in self.choices]
        return texts[0] if len(texts) == 1 else texts

    def cancel(self) -> None:
        for h in self.handles:
            if not h.finished:
                h.cancel()


def _extend(into: CompletionLogprobs, part: CompletionLogprobs) -> None:
    into.tokens += part.tokens
    into.token_logprobs += part.token_logprobs
    into.top_logprobs += part.top_logprobs
    into.text_offset += part.text_offset


def _joined(first: CompletionLogprobs, second: CompletionLogprobs) -> CompletionLogprobs:
    out = CompletionLogprobs()
    _extend(out, first)
    _extend(out, second)
    return out

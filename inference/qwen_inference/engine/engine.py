"""The engine loop: continuous batching over the model's caches, in one thread that alone touches the model.

Requests wait in a bounded queue. Each step admits waiting requests while slots, KV blocks and state slots
allow, runs one forward over every running sequence's next token plus a budget of prompt tokens (long
prompts are prefilled in chunks, so running streams keep flowing), samples each sequence with its own
parameters (and its own grammar, when one constrains it), and hands the tokens to the asyncio side. A
request for `n` choices prefills its prompt once: when the prompt is done, the other choices fork from it,
sharing its full KV blocks and copying its recurrent state. A cancelled or timed-out request leaves at the
next step and frees its slots and blocks. When nothing runs, the thread sleeps on a condition: no spinning.

With prefix caching, a prompt starts past the longest run of its full blocks found in the cache (blocks of
earlier prompts and replies). A model with recurrent layers also needs the state those blocks leave behind:
a prompt's state is checkpointed, in the step that gets there, at the last block boundary before the chat
template's generation prompt (where the next turn of the conversation renders differently) and at the
boundary where the blocks found in the cache ended (where another prompt, a shared system prompt say, went its
own way); a prompt then starts past the deepest boundary whose blocks and checkpoint are both kept. A reply that
the next prompt is likely to repeat as written (a turn of tool calls) keeps its state at its latest block
boundary as it decodes, in one checkpoint row (at most half the rows are so held), named when it ends: the
agent's next step starts there.

A step that fails is run again sequence by sequence, so that one bad request fails alone; not once the model
has run on a model with recurrent layers, whose states it moved on in place: then every sequence of the step
ends with the error.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .cache import BlockAllocator
from .models.base import CausalLM
from .runner import ModelRunner, SeqChunk
from .sampling import SamplerState, SamplingParams, apply_logit_bias, apply_penalties, new_state, sample_batch

log = logging.getLogger("qwen_inference.engine")

MAX_TOP_LOGPROBS = 20
CHECKPOINT_MIN_TOKENS = 64  # a shorter prefix is recomputed in no time: its checkpoint would only push out longer ones
GENERATION_PROMPT_TOKENS = 8  # the tail of a prompt its next turn may render differently ("<think>\n\n</think>\n\n")


class QueueFull(Exception):
    """The waiting queue is full: the client should retry after `retry_after` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("the server is busy: too many requests are waiting")
        self.retry_after = retry_after


class EngineDead(Exception):
    pass


@dataclass
class TokenEvent:
    token_id: int
    index: int = 0  # the choice (with n > 1)
    logprob: float | None = None  # of the token, under the model's own distribution
    top_logprobs: list[tuple[int, float]] | None = None  # the most likely tokens at this position


@dataclass
class PromptLogprobsEvent:
    """Log-probabilities of the prompt's tokens (None for the first, which nothing predicts)."""

    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None] | None = None


@dataclass
class FinishEvent:
    reason: str  # stop | length | cancelled | timeout | error
    prompt_tokens: int
    completion_tokens: int
    queue_time: float
    inference_time: float
    error: str | None = None
    index: int = 0


Event = TokenEvent | PromptLogprobsEvent | FinishEvent


class RequestHandle:
    """The asyncio side of one request (all its choices): an event queue to read and a cancel switch."""

    def __init__(self, request_id: str, prompt_tokens: int, loop: asyncio.AbstractEventLoop, engine: "Engine",
                 n: int = 1) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.n = n
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.loop = loop
        self._engine = engine
        self.cancelled = False
        self.cancel_reason = "cancelled"
        self.finished = False  # every choice has finished
        self.cached_tokens = 0  # prompt tokens found in the prefix cache (set by the engine at admission)
        self.unfinished = n  # choices still running (engine thread)

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the engine to drop this request; its slots are freed at the next step. `reason` is "stop" when
        the reply reached a stop string, "cancelled" when the client went away."""
        if not self.cancelled and not self.finished:
            self.cancel_reason = reason
            self.cancelled = True
            self._engine._wake()

    async def events(self):
        """Every event of every choice, until the last choice's FinishEvent."""
        left = self.n
        while True:
            ev = await self.queue.get()
            yield ev
            if isinstance(ev, FinishEvent):
                left -= 1
                if not left:
                    return


@dataclass
class Request:
    """What a request asks beyond sampling parameters."""

    n: int = 1
    constraint: Any = None  # a factory of per-sequence token constraints (`structured.ConstraintFactory`)
    prompt_logprobs: int | None = None  # None: none; k: the prompt tokens' log-probabilities and top k
    # the reply is likely to start the next prompt as written (a turn of tool calls, whose reasoning and calls the
    # next prompt renders token for token): a model with recurrent layers keeps its state at the reply's last block
    # boundary for that prompt to start from
    continues: bool = False
    media: Any = None  # the prompt's images (`media.Media`), for a model that takes them


@dataclass(eq=False)
class Sequence:
    handle: RequestHandle
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float
    deadline: float
    sampler: SamplerState
    request: Request = field(default_factory=Request)
    index: int = 0  # the choice
    constraint: Any = None  # this sequence's grammar state
    output_ids: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    state_slot: int | None = None  # recurrent-state slot (models with linear-attention layers)
    reserved: int = 0  # blocks reserved and not yet taken
    sibling_reserve: int = 0  # blocks reserved for the other choices, handed over at the fork
    computed: int = 0  # tokens whose keys and values are in the cache
    hashes: list[bytes] | None = None  # chained hashes of the prompt's full blocks (prefix caching)
    registered: int = 0  # of those, blocks already offered to the prefix cache
    checkpoint_at: list[int] = field(default_factory=list)  # prompt positions where the state is checkpointed
    reply_row: int | None = None  # a continuing reply's checkpoint row: its state at its latest block boundary...
    reply_row_at: int = 0  # ...this many tokens in
    prompt_lp: list = field(default_factory=list)  # prompt log-probabilities gathered while prefilling
    prompt_top: list = field(default_factory=list)
    image_rows: dict = field(default_factory=dict)  # image -> its encoding, while the prompt is prefilled
    encoding: tuple | None = None  # (image, the vision tower's generator, seconds so far): an image being encoded
    admitted_at: float = 0.0
    first_token_at: float = 0.0
    last_token_at: float = 0.0

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_at(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    @property
    def key_ids(self) -> list[int]:
        """The prompt as the prefix cache names its blocks: its ids, an image's placeholders told apart by the
        image's content."""
        media = self.request.media
        return self.prompt_ids if media is None else media.key_ids(self.prompt_ids)


class EngineMetrics:
    """What the engine reports; the server plugs Prometheus metrics in, tests may leave it empty."""

    def on_admit(self, queue_seconds: float) -> None: ...
    def on_first_token(self, ttft_seconds: float) -> None: ...
    def on_tokens(self, prompt: int, generated: int) -> None: ...
    def on_prefix_hit(self, tokens: int) -> None: ...
    def on_image(self, seconds: float) -> None: ...
    def on_finish(self, seq_reason: str, e2e: float, tpot: float | None, inference: float) -> None: ...
    def on_step(self, running: int, waiting: int, kv_usage: float, state_usage: float = 0.0) -> None: ...


class Engine:
    def __init__(
        self,
        model: CausalLM,
        *,
        max_concurrency: int,
        max_queue: int,
        max_model_len: int,
        kv_cache_tokens: int,
        prefill_chunk: int = 256,
        block_size: int = 16,
        eos_token_ids: set[int] | None = None,
        suppress_token_ids: list[int] | None = None,
        default_seed: int = 0,
        metrics: EngineMetrics | None = None,
        prefix_caching: bool = False,
        state_checkpoints: int = 0,
    ) -> None:
        self.runner = ModelRunner(model, kv_tokens=kv_cache_tokens, block_size=block_size,
                                  state_slots=max_concurrency,
                                  state_checkpoints=state_checkpoints if prefix_caching else 0)
        self.model = model
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.max_model_len = max_model_len
        self.prefill_chunk = prefill_chunk
        self.block_size = block_size
        self.eos_token_ids = set(eos_token_ids or ())
        self.metrics = metrics or EngineMetrics()
        self.default_seed = default_seed
        self.prefix_caching = prefix_caching and self.runner.supports_prefix_caching
        if prefix_caching and not self.prefix_caching:
            log.info("prefix caching is off: this model keeps a recurrent state per sequence, and no checkpoints of "
                     "it are kept to restore at a cached prefix's end")
        self.allocator = BlockAllocator(self.runner.num_blocks, block_size, prefix_caching=self.prefix_caching)
        dev = model.output_device
        self._suppress = (
            torch.tensor(sorted(set(suppress_token_ids)), dtype=torch.long, device=dev)
            if suppress_token_ids
            else None
        )
        self._bitmask: torch.Tensor | None = None
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running: list[Sequence] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._seeds = itertools.count(default_seed)
        self.steps = 0
        self.alive = False
        self.fatal_error: str | None = None
        self.fault_hook: Callable[[list[Sequence]], None] | None = None
        self._forward_started = False  # whether the step being run reached the model
        self._reply_rows = 0  # checkpoint rows held by continuing replies: at most half of them
        self._forked: list[Sequence] = []  # choices forked in the step being run

    # ---- public, called from the asyncio side -------------------------------------------------------
    @property
    def kv_capacity_tokens(self) -> int:
        return self.allocator.usable_blocks * self.block_size

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    def max_reply_room(self, prompt_tokens: int) -> int:
        return self.max_model_len - prompt_tokens

    def start(self) -> None:
        """Run the loop in a thread of its own."""
        self._thread = threading.Thread(target=self.run, name="qwen-engine", daemon=True)
        self.alive = True
        self._thread.start()

    def run(self) -> None:
        """Run the loop in the calling thread until stop(). The server calls this from the thread that loaded
        the model: OpenMP runs measurably slower (a third, here) when a second thread takes over the model."""
        self.alive = True
        if self._thread is None:
            self._thread = threading.current_thread()
        self._run()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            waiting = len(self._waiting)
        return {
            "running": len(self._running),
            "waiting": waiting,
            "kv_cache_usage": self._kv_usage(),
            "state_usage": self.runner.state_usage,
            "prefix_cache_hit_tokens": self.allocator.hit_tokens,
            "prefix_cached_blocks": self.allocator.cached_blocks,
            "state_checkpoints": self.runner.state_checkpoints,
            "steps": self.steps,
        }

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, timeout: float,
               request: Request | None = None) -> RequestHandle:
        """Queue a request; raises QueueFull when the queue is full, EngineDead when the loop is gone and
        ValueError for what this engine can never run (more choices than slots)."""
        if not self.alive:
            raise EngineDead(self.fatal_error or "the engine is not running")
        request = request or Request()
        if not 1 <= request.n <= self.max_concurrency:
            raise ValueError(f"n must be between 1 and {self.max_concurrency} (the server's concurrency)")
        loop = asyncio.get_running_loop()
        handle = RequestHandle(request_id, len(prompt_ids), loop, self, request.n)
        now = time.monotonic()
        seed = params.seed if params.seed is not None else next(self._seeds)
        seq = Sequence(
            handle=handle,
            prompt_ids=list(prompt_ids),
            params=params,
            arrival=now,
            deadline=now + timeout,
            sampler=new_state(params, seed),
            request=request,
            constraint=request.constraint.new() if request.constraint is not None else None,
        )
        with self._cv:
            free_slots = max(0, self.max_concurrency - len(self._running))
            if len(self._waiting) >= self.max_queue + free_slots:
                raise QueueFull(retry_after=self._retry_after())
            self._waiting.append(seq)
            self._cv.notify()
        return handle

    def _kv_usage(self) -> float:
        return self.allocator.used_blocks / max(1, self.allocator.usable_blocks)

    def _report(self, running: int, waiting: int) -> None:
        self.metrics.on_step(running, waiting, self._kv_usage(), self.runner.state_usage)

    def _retry_after(self) -> int:
        return 1 if self.max_concurrency > 1 else 2

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    # ---- the loop -----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with torch.inference_mode():  # this thread only ever runs inference
                self._loop()
        except BaseException as exc:  # a bug in the loop itself: fail everyone, report unhealthy
            log.exception("engine loop died")
            self.fatal_error = f"engine loop died: {exc!r}"
            self.alive = False
            with self._cv:
                leftovers = list(self._running) + list(self._waiting)
                self._running.clear()
                self._waiting.clear()
            out: list[tuple[Sequence, Event]] = []
            for seq in leftovers:
                self._finish(seq, "error", out, error=self.fatal_error)
            self._deliver(out)
        finally:
            self.alive = False

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._running and not self._waiting:
                    self._report(0, 0)
                    self._cv.wait()
                if self._stopping:
                    return
            self._step()

    def _step(self) -> None:
        out: list[tuple[Sequence, Event]] = []
        now = time.monotonic()
        self._reap(now, out)
        self._admit(now)
        self._encode_images(out)
        batch = self._schedule()
        if batch:
            self._execute(batch, out)
        self.steps += 1
        with self._lock:
            waiting = len(self._waiting)
        self._report(len(self._running), waiting)
        self._deliver(out)

    def _reap(self, now: float, out: list) -> None:
        """Drop cancelled and timed-out requests, running or waiting."""
        keep = []
        for seq in self._running:
            if seq.handle.cancelled:
                self._finish(seq, seq.handle.cancel_reason, out)
            elif now > seq.deadline:
                self._finish(seq, "timeout", out, error="the request timed out")
            else:
                keep.append(seq)
        self._running = keep
        with self._lock:
            if any(s.handle.cancelled or now > s.deadline for s in self._waiting):
                waiting = collections.deque()
                for seq in self._waiting:
                    if seq.handle.cancelled:
                        self._finish(seq, "cancelled", out)
                    elif now > seq.deadline:
                        self._finish(seq, "timeout", out, error="the request timed out while queued")
                    else:
                        waiting.append(seq)
                self._waiting = waiting

    def _admit(self, now: float) -> None:
        with self._lock:
            while self._waiting:
                seq = self._waiting[0]
                n = seq.request.n
                if len(self._running) + n > self.max_concurrency:
                    break
                worst = min(len(seq.prompt_ids) + seq.params.max_tokens, self.max_model_len)
                need = self.allocator.blocks_for(worst)
                # the other choices share the prompt's full blocks and need the rest of their own
                sibling = need - len(seq.prompt_ids) // self.block_size
                if need + (n - 1) * sibling > self.allocator.usable_blocks:
                    # can never fit: refuse instead of blocking the queue forever
                    self._waiting.popleft()
                    self._fail_unfit(seq)
                    continue
                if self.runner.has_state and self.runner.free_state_slots < n:
                    break
                if seq.hashes is None:
                    seq.hashes = (self.allocator.block_hashes(seq.key_ids, len(seq.prompt_ids))
                                  if self.allocator.prefix_caching else [])
                # the last prompt token is always computed: its logits give the first reply token
                cached = self.allocator.match(seq.hashes[: (len(seq.prompt_ids) - 1) // self.block_size])
                if seq.request.prompt_logprobs is not None:  # every prompt token's logits are wanted
                    self.allocator.release(cached, 0)
                    cached = []
                if self.runner.has_state and self.prefix_caching:
                    cached = self._state_prefix(seq, cached)
                if not self.allocator.reserve(need - len(cached) + (n - 1) * sibling):
                    self.allocator.release(cached, 0)
                    break  # first come, first served: wait for blocks to free
                self._waiting.popleft()
                seq.reserved = need - len(cached)
                seq.sibling_reserve = (n - 1) * sibling
                seq.blocks = cached
                seq.registered = len(cached)
                seq.computed = len(cached) * self.block_size
                seq.state_slot = self.runner.acquire_state()
                if cached and seq.state_slot is not None:
                    restored = self.runner.restore_checkpoint(seq.hashes[len(cached) - 1], seq.state_slot)
                    assert restored, "_state_prefix keeps only blocks that end at a checkpoint"
                if cached:
                    seq.handle.cached_tokens = seq.computed
                    self.allocator.hit_tokens += seq.computed
                    self.metrics.on_prefix_hit(seq.computed)
                    self.metrics.on_tokens(seq.computed, 0)
                seq.admitted_at = now
                self._running.append(seq)
                self.metrics.on_admit(now - seq.arrival)

    def _state_prefix(self, seq: Sequence, cached: list[int]) -> list[int]:
        """A model with recurrent layers starts past cached blocks only up to the deepest boundary whose state
        is checkpointed: the blocks found past it go back (their tokens are computed again, to rebuild the
        state). Sets where this prompt's state is to be checkpointed; returns the blocks kept."""
        bs = self.block_size
        keep = len(cached)
        while keep and not self.runner.has_checkpoint(seq.hashes[keep - 1]):
            keep -= 1
        marks = {(len(seq.prompt_ids) - GENERATION_PROMPT_TOKENS) // bs * bs}
        if keep < len(cached):  # another prompt went its own way where the blocks found end: keep the state there
            marks.add(len(cached) * bs)
            self.allocator.release(cached[keep:], 0)
            cached = cached[:keep]
        seq.checkpoint_at = sorted(m for m in marks if m >= CHECKPOINT_MIN_TOKENS and m > keep * bs)
        return cached

    def _fail_unfit(self, seq: Sequence) -> None:
        out: list = []
        self._finish(seq, "error", out, error="the request needs more KV cache than the server has")
        self._deliver(out)

    @staticmethod
    def _image_due(s: Sequence) -> int | None:
        """The next image of a sequence's prompt still to be encoded (its prefill stops at its first placeholder
        until it is), or None."""
        media = s.request.media
        if media is None or s.computed >= len(s.prompt_ids):
            return None
        for i, (start, n) in enumerate(media.spans):
            if start + n > s.computed and i not in s.image_rows:
                return i
        return None

    def _encode_images(self, out: list) -> None:
        """One block of the vision tower a step, for the first running sequence whose prompt has an image to
        encode: a large image takes as many steps as the tower has blocks, and every other sequence steps on
        between them instead of waiting seconds for the whole tower."""
        for s in self._running:
            i = self._image_due(s)
            if i is None:
                continue
            media = s.request.media
            if s.encoding is None or s.encoding[0] != i:
                grid = torch.tensor([media.grids[i]], dtype=torch.long)
                s.encoding = (i, self.runner.model.encode_image_steps(media.pixel_values[i], grid), 0.0)
            image, steps, spent = s.encoding
            started = time.perf_counter()
            try:
                next(steps)
                s.encoding = (image, steps, spent + time.perf_counter() - started)
            except StopIteration as done:
                s.image_rows[image] = done.value
                s.encoding = None
                self.metrics.on_image(spent + time.perf_counter() - started)
            except Exception as exc:  # noqa: BLE001: this sequence's image, not the step
                log.exception("encoding an image failed for request %s", s.handle.request_id)
                s.encoding = None
                self._running.remove(s)
                self._finish(s, "error", out, error=f"encoding an image failed: {exc}")
            return

    def _schedule(self) -> tuple[list[Sequence], list[tuple[Sequence, int]]] | None:
        decode = [s for s in self._running if s.computed >= len(s.prompt_ids) and s.computed == s.length - 1]
        budget = max(self.prefill_chunk - len(decode), self.block_size)
        prefill: list[tuple[Sequence, int]] = []
        for s in self._running:
            if s.computed < len(s.prompt_ids) and budget > 0:
                n = min(len(s.prompt_ids) - s.computed, budget)
                due = self._image_due(s)
                if due is not None:  # up to the image's first placeholder while it is being encoded
                    n = min(n, s.request.media.spans[due][0] - s.computed)
                    if n <= 0:
                        continue
                prefill.append((s, n))
                budget -= n
        if not decode and not prefill:
            return None
        return decode, prefill

    def _ensure_blocks(self, seq: Sequence, upto: int) -> None:
        while len(seq.blocks) * self.block_size < upto:
            seq.blocks.append(self.allocator.take())
            seq.reserved -= 1

    def _chunks(self, decode: list[Sequence], prefill: list[tuple[Sequence, int]]):
        """This step's work for the runner: one token of each decoding sequence, then each prompt chunk, the
        sequence each chunk belongs to, and the checkpoints (name, row) the step writes. A prompt chunk that passes
        one of its sequence's checkpoint positions is cut there in two, in order in the same step, the first
        writing the state it leaves to a checkpoint row."""
        chunks, owners, saves = [], [], []
        for s in decode:
            pos = s.computed
            self._ensure_blocks(s, pos + 1)
            chunks.append(SeqChunk([s.token_at(pos)], pos, s.blocks, s.state_slot, logits=True,
                                   rope_offset=s.request.media.delta if s.request.media is not None else 0))
            owners.append(s)
        for s, n in prefill:
            first, end = s.computed, s.computed + n
            self._ensure_blocks(s, end)
            cuts = [m for m in s.checkpoint_at if first < m <= end]
            for a, b in zip([first] + cuts, cuts + [end]):
                if a == b:
                    continue
                row = None
                if b in cuts:
                    name = s.hashes[b // self.block_size - 1]
                    row = self.runner.claim_checkpoint(name)
                    if row is not None:
                        saves.append((name, row))
                chunk = SeqChunk(s.prompt_ids[a:b], a, s.blocks, s.state_slot, logits=b == len(s.prompt_ids),
                                 all_logits=s.request.prompt_logprobs is not None, save_state_to=row, prompt=True)
                if s.request.media is not None:
                    self._with_images(s, chunk, a, b)
                chunks.append(chunk)
                owners.append(s)
        return chunks, owners, saves

    def _with_images(self, s: Sequence, chunk: SeqChunk, a: int, b: int) -> None:
        """A prompt chunk `[a, b)` of a sequence with images: its rotary positions per section, and the encodings
        of the images it holds part of in place of their placeholders (each encoded once by `_encode_images`
        before its first placeholder is computed: not at all when the prefix cache holds it)."""
        media = s.request.media
        chunk.mrope = media.positions[:, a:b]
        for i, (start, n) in enumerate(media.spans):
            lo, hi = max(a, start), min(b, start + n)
            if lo >= hi:
                continue
            assert i in s.image_rows, "_schedule stops a prompt chunk at an image not yet encoded"
            chunk.embeds.append((lo - a, s.image_rows[i][lo - start: hi - start]))

    def _execute(self, batch, out: list) -> None:
        decode, prefill = batch
        self._forward_started = False
        self._forked = []
        try:
            self._forward_and_sample(decode, prefill, out)
        except Exception as exc:  # noqa: BLE001
            for child in self._forked:  # choices forked in the failed step: never started, gone with it
                self._unfork(child)
            seqs = decode + [p[0] for p in prefill]
            if len(seqs) == 1 or (self.runner.has_state and self._forward_started):
                # alone, or past the start of a forward that moves recurrent states on in place: a state may hold
                # part of this step, so the step cannot be run again for any of its sequences
                for seq in seqs:
                    log.exception("generation failed for request %s", seq.handle.request_id)
                    if seq in self._running:
                        self._running.remove(seq)
                        self._finish(seq, "error", out, error=f"generation failed: {exc}")
                return
            # isolate the culprit: run each sequence alone so one bad request fails alone
            log.warning("batched step failed (%s); retrying each sequence alone", exc)
            for s in decode:
                if s in self._running:
                    self._execute(([s], []), out)
            for s, n in prefill:
                if s in self._running:
                    self._execute(([], [(s, n)]), out)

    def _forward_and_sample(self, decode: list[Sequence], prefill: list[tuple[Sequence, int]], out: list) -> None:
        if self.fault_hook is not None:
            self.fault_hook(decode + [s for s, _ in prefill])
        chunks, owners, saves = self._chunks(decode, prefill)
        self._forward_started = True
        try:
            logits = self.runner.execute(chunks)
        except BaseException:
            for _, row in saves:
                self.runner.abandon_checkpoint(row)
            raise
        for name, row in saves:
            self.runner.commit_checkpoint(name, row)
        # which row of `logits` each sampling sequence reads; prompt log-probabilities from all-logits chunks
        rows: list[int] = []
        sampled: list[Sequence] = []
        r = 0
        for c, s in zip(chunks, owners):
            if c.all_logits:
                self._prompt_logprobs(s, c, logits[r: r + len(c.tokens)], out)
                r += len(c.tokens)
                if c.logits:
                    rows.append(r - 1)
                    sampled.append(s)
            elif c.logits:
                rows.append(r)
                sampled.append(s)
                r += 1
        for j in range(len(sampled)):
            s = sampled[j]
            if s.request.n > 1 and not s.output_ids and s.index == 0:  # the prompt is done: fork the choices
                children = self._fork(s)
                self._forked += children
                sampled.extend(children)
                rows.extend([rows[j]] * len(children))
        if rows != list(range(logits.shape[0])):
            logits = logits.index_select(0, torch.tensor(rows, dtype=torch.long, device=logits.device))
        now = time.monotonic()
        prompt_done = sum(n for _, n in prefill)
        want_lp = [i for i, s in enumerate(sampled) if s.params.logprobs is not None]
        raw = torch.log_softmax(logits[want_lp], dim=-1) if want_lp else None  # before any processing
        self._process(logits, sampled)
        tokens = sample_batch(logits, [s.params for s in sampled], [s.sampler for s in sampled])
        lp_info = self._token_logprobs(raw, want_lp, sampled, tokens)
        for s in decode:
            s.computed += 1
            if s.request.continues and s.computed % self.block_size == 0 and s.state_slot is not None \
                    and self.prefix_caching and s.computed >= CHECKPOINT_MIN_TOKENS:
                self._keep_reply_state(s)
        for s, n in prefill:
            s.computed += n
            if s.image_rows and s.computed >= len(s.prompt_ids):
                s.image_rows = {}
            self._offer_prefix(s)
            s.checkpoint_at = [m for m in s.checkpoint_at if m > s.computed]
        finished: list[Sequence] = []
        for i, (s, token) in enumerate(zip(sampled, tokens)):
            s.output_ids.append(token)
            if not s.first_token_at:
                s.first_token_at = now
                self.metrics.on_first_token(now - s.arrival)
            s.last_token_at = now
            grammar_done = False
            if s.constraint is not None:
                if not s.constraint.accept(token):
                    finished.append(s)
                    self._finish(s, "error", out, error=f"token {token} broke the request's grammar")
                    continue
                grammar_done = s.constraint.is_terminated()
            if (token in self.eos_token_ids and not s.params.ignore_eos) or token in s.params.stop_token_ids:
                finished.append(s)
                s.output_ids.pop()  # the end marker is not part of the reply
                self._finish(s, "stop", out, completion=len(s.output_ids) + 1)
                continue
            lp, top = lp_info.get(i, (None, None))
            out.append((s, TokenEvent(token, s.index, lp, top)))
            if grammar_done:  # the grammar is complete: nothing but an end marker could follow
                finished.append(s)
                self._finish(s, "stop", out)
            elif len(s.output_ids) >= s.params.max_tokens or s.length >= self.max_model_len:
                finished.append(s)
                self._finish(s, "length", out)
        self.metrics.on_tokens(prompt_done, len(sampled))
        if finished:
            gone = {id(s) for s in finished}
            self._running = [s for s in self._running if id(s) not in gone]

    def _process(self, logits: torch.Tensor, sampled: list[Sequence]) -> None:
        """In place: penalties, logit bias and the end tokens a reply below its min_tokens may not take, then
        suppressed ids (rows without a grammar: a grammar decides for itself which ids may follow) and each
        grammar's token mask."""
        constrained = [i for i, s in enumerate(sampled) if s.constraint is not None]
        for i, s in enumerate(sampled):
            if s.params.penalized:
                apply_penalties(logits[i], s.params, s.prompt_ids, s.output_ids)
            if s.params.logit_bias:
                apply_logit_bias(logits[i], s.params.logit_bias)
            if s.params.min_tokens > len(s.output_ids) and s.constraint is None:  # a grammar ends when complete
                ends = s.params.stop_token_ids | (set() if s.params.ignore_eos else self.eos_token_ids)
                if ends:
                    logits[i, torch.tensor(sorted(ends), dtype=torch.long, device=logits.device)] = float("-inf")
        if self._suppress is not None:
            if not constrained:
                logits.index_fill_(1, self._suppress, float("-inf"))
            elif len(constrained) < len(sampled):
                free = torch.tensor([i for i in range(len(sampled)) if i not in set(constrained)],
                                    dtype=torch.long, device=logits.device)
                logits[free] = logits[free].index_fill_(1, self._suppress, float("-inf"))
        if constrained:
            from ..structured import allocate_bitmask, apply_bitmask

            if self._bitmask is None or self._bitmask.shape[0] < len(sampled):
                self._bitmask = allocate_bitmask(max(len(sampled), self.max_concurrency), self.vocab_size)
            for i in constrained:
                sampled[i].constraint.fill_bitmask(self._bitmask, i)
            apply_bitmask(logits, self._bitmask, constrained)

    @staticmethod
    def _token_logprobs(raw: torch.Tensor | None, rows: list[int], sampled: list[Sequence],
                        tokens: list[int]) -> dict[int, tuple[float, list[tuple[int, float]] | None]]:
        """The chosen token's log-probability and the top alternatives, for the rows that asked; one sync."""
        if raw is None:
            return {}
        chosen = raw.gather(1, torch.tensor([[tokens[i]] for i in rows], device=raw.device))[:, 0]
        k = max(min(sampled[i].params.logprobs or 0, MAX_TOP_LOGPROBS) for i in rows)
        top_v, top_i = raw.topk(k, dim=-1) if k else (None, None)
        chosen_l = chosen.tolist()
        top_vl, top_il = (top_v.tolist(), top_i.tolist()) if k else (None, None)
        info = {}
        for j, i in enumerate(rows):
            want = sampled[i].params.logprobs or 0
            top = list(zip(top_il[j][:want], top_vl[j][:want])) if want else None
            info[i] = (chosen_l[j], top)
        return info

    def _prompt_logprobs(self, s: Sequence, c: SeqChunk, logits: torch.Tensor, out: list) -> None:
        """Log-probabilities of the prompt tokens this chunk's logits predict; sent once the prompt is done."""
        p = len(s.prompt_ids)
        if c.start == 0:
            s.prompt_lp, s.prompt_top = [None], [None]
        targets = [i for i in range(c.start + 1, c.start + len(c.tokens) + 1) if i < p]
        if targets:
            lp = torch.log_softmax(logits[: len(targets)], dim=-1)
            ids = torch.tensor([s.prompt_ids[i] for i in targets], device=lp.device)
            s.prompt_lp += lp.gather(1, ids[:, None])[:, 0].tolist()
            k = min(s.request.prompt_logprobs or 0, MAX_TOP_LOGPROBS)
            if k:
                v, idx = lp.topk(k, dim=-1)
                s.prompt_top += [list(zip(a, b)) for a, b in zip(idx.tolist(), v.tolist())]
            else:
                s.prompt_top += [None] * len(targets)
        if c.start + len(c.tokens) == p:
            top = s.prompt_top if s.request.prompt_logprobs else None
            out.append((s, PromptLogprobsEvent(s.prompt_lp, top)))

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """The other choices of `parent`'s request, now that its prompt is in the cache: they share its full
        prompt blocks, copy the partly filled one and its recurrent state, and sample their first token from the
        same logits."""
        bs = self.block_size
        full = len(parent.prompt_ids) // bs
        n = parent.request.n
        per_child = parent.sibling_reserve // (n - 1)
        children = []
        for i in range(1, n):
            params = parent.params
            seed = (params.seed + i) % 2**64 if params.seed is not None else next(self._seeds)
            child = Sequence(parent.handle, parent.prompt_ids, params, parent.arrival, parent.deadline,
                             new_state(params, seed), parent.request, index=i,
                             constraint=parent.request.constraint.new() if parent.request.constraint else None)
            child.blocks = self.allocator.share(parent.blocks[:full])
            child.reserved, parent.sibling_reserve = per_child, parent.sibling_reserve - per_child
            if len(parent.prompt_ids) % bs:
                self._ensure_blocks(child, (full + 1) * bs)
                self.runner.copy_block(parent.blocks[full], child.blocks[full])
            child.computed = len(parent.prompt_ids)  # after this step's forward
            child.hashes, child.registered = [], 0
            child.state_slot = self.runner.acquire_state()
            if child.state_slot is not None:
                self.runner.copy_state(parent.state_slot, child.state_slot)
            child.admitted_at = parent.admitted_at
            children.append(child)
        self._running.extend(children)
        return children

    def _unfork(self, child: Sequence) -> None:
        """Undo a fork whose step failed, unannounced (the parent, which the step retries or ends, still speaks for
        every choice): the child's state slot goes back, and its blocks and reservation to the parent's reserve for
        the other choices, as before the fork."""
        self._running.remove(child)
        parent = next(s for s in self._running if s.handle is child.handle and s.index == 0)
        own = len(child.blocks) - len(child.prompt_ids) // self.block_size  # the blocks it took, beyond the shared
        self.allocator.release(child.blocks, 0)
        again = self.allocator.reserve(own)  # just freed: they are there
        assert again
        parent.sibling_reserve += child.reserved + own
        child.blocks, child.reserved = [], 0
        self.runner.release_state(child.state_slot)
        child.state_slot = None

    def _offer_prefix(self, seq: Sequence) -> None:
        """Hand the prompt's blocks that are now full and computed to the prefix cache."""
        bs = self.block_size
        while seq.hashes and seq.registered < len(seq.hashes) and (seq.registered + 1) * bs <= seq.computed:
            self.allocator.register(seq.blocks[seq.registered], seq.hashes[seq.registered])
            seq.registered += 1

    def _keep_reply_state(self, seq: Sequence) -> None:
        """A continuing reply reached a block boundary: its state there goes to its checkpoint row (taken on the
        first boundary while fewer than half the rows are held so), replacing the previous boundary's."""
        if seq.reply_row is None:
            if self._reply_rows >= self.runner.caches.states.checkpoints // 2:
                return
            seq.reply_row = self.runner.claim_reply_row()
            if seq.reply_row is None:
                return
            self._reply_rows += 1
        self.runner.copy_state(seq.state_slot, seq.reply_row)
        seq.reply_row_at = seq.computed

    def _offer_reply(self, seq: Sequence) -> None:
        """At a sequence's end, its full blocks past the prompt join the prefix cache too: the next turn of a
        conversation starts with this one's prompt and reply. A continuing reply's state checkpoint is named
        after the block it ends."""
        bs = self.block_size
        full = min(seq.computed // bs, len(seq.blocks))
        if not self.prefix_caching or full <= max(seq.registered, len(seq.prompt_ids) // bs):
            return
        hashes = self.allocator.block_hashes(seq.key_ids + seq.output_ids, full * bs, seq.hashes)
        for i in range(seq.registered, full):
            self.allocator.register(seq.blocks[i], hashes[i])
        if seq.reply_row is not None:
            self.runner.commit_checkpoint(hashes[seq.reply_row_at // bs - 1], seq.reply_row)
            self._let_go_reply_row(seq)

    def _let_go_reply_row(self, seq: Sequence, abandon: bool = False) -> None:
        if seq.reply_row is not None:
            if abandon:
                self.runner.abandon_checkpoint(seq.reply_row)
            seq.reply_row = None
            self._reply_rows -= 1

    def _finish(self, seq: Sequence, reason: str, out: list, error: str | None = None, completion: int | None = None) -> None:
        if reason != "error":
            self._offer_reply(seq)
        self._let_go_reply_row(seq, abandon=True)  # an error's, or one _offer_reply had no blocks to name by
        if seq.blocks or seq.reserved or seq.sibling_reserve:
            self.allocator.release(seq.blocks, seq.reserved + seq.sibling_reserve)
            seq.blocks, seq.reserved, seq.sibling_reserve = [], 0, 0
        if seq.state_slot is not None:
            self.runner.release_state(seq.state_slot)
            seq.state_slot = None
        now = time.monotonic()
        queue_time = (seq.admitted_at or now) - seq.arrival
        inference = now - seq.admitted_at if seq.admitted_at else 0.0
        n = completion if completion is not None else len(seq.output_ids)
        tpot = None
        if len(seq.output_ids) > 1 and seq.first_token_at:
            tpot = (seq.last_token_at - seq.first_token_at) / (len(seq.output_ids) - 1)
        self.metrics.on_finish(reason, now - seq.arrival, tpot, inference)
        out.append((seq, FinishEvent(reason, len(seq.prompt_ids), n, queue_time, inference, error, seq.index)))
        # choices that were never forked (the request ended before its prompt did) end with it
        if seq.index == 0 and seq.request.n > 1 and not seq.output_ids and reason != "stop":
            for i in range(1, seq.request.n):
                out.append((seq, FinishEvent(reason, len(seq.prompt_ids), 0, queue_time, inference, error, i)))

    def _deliver(self, out: list[tuple[Sequence, Event]]) -> None:
        if not out:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for seq, ev in out:
            if isinstance(ev, FinishEvent):
                seq.handle.unfinished -= 1
                if seq.handle.unfinished <= 0:
                    seq.handle.finished = True
            by_loop.setdefault(seq.handle.loop, []).append((seq.handle, ev))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop is closed: nobody is listening
                pass


def _put_all(items: list[tuple[RequestHandle, Event]]) -> None:
    for handle, ev in items:
        handle.queue.put_nowait(ev)

"""The engine loop: continuous batching over a paged KV cache, in one thread that alone touches the model.

Requests wait in a bounded queue. Each step admits waiting requests while slots and KV blocks allow, runs
one forward over every running sequence's next token plus a budget of prompt tokens (long prompts are
prefilled in chunks, so running streams keep flowing), samples each sequence with its own parameters, and
hands the tokens to the asyncio side. A cancelled or timed-out request leaves at the next step and frees
its slot and blocks. When nothing runs, the thread sleeps on a condition: no busy spinning.
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
from .sampling import SamplerState, SamplingParams, apply_penalties, new_state, sample_batch

log = logging.getLogger("qwen_inference.engine")


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


@dataclass
class FinishEvent:
    reason: str  # stop | length | cancelled | timeout | error
    prompt_tokens: int
    completion_tokens: int
    queue_time: float
    inference_time: float
    error: str | None = None


Event = TokenEvent | FinishEvent


class RequestHandle:
    """The asyncio side of one request: an event queue to read and a cancel switch."""

    def __init__(self, request_id: str, prompt_tokens: int, loop: asyncio.AbstractEventLoop, engine: "Engine") -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.loop = loop
        self._engine = engine
        self.cancelled = False
        self.cancel_reason = "cancelled"
        self.finished = False

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the engine to drop this request; its slot is freed at the next step. `reason` is "stop" when
        the reply reached a stop string, "cancelled" when the client went away."""
        if not self.cancelled and not self.finished:
            self.cancel_reason = reason
            self.cancelled = True
            self._engine._wake()

    async def events(self):
        while True:
            ev = await self.queue.get()
            yield ev
            if isinstance(ev, FinishEvent):
                return


@dataclass
class Sequence:
    handle: RequestHandle
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float
    deadline: float
    sampler: SamplerState
    output_ids: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    state_slot: int | None = None  # recurrent-state slot (models with linear-attention layers)
    reserved: int = 0  # blocks reserved and not yet taken
    computed: int = 0  # tokens whose keys and values are in the cache
    hashes: list[bytes] | None = None  # chained hashes of the prompt's full blocks (prefix caching)
    registered: int = 0  # of those, blocks already offered to the prefix cache
    admitted_at: float = 0.0
    first_token_at: float = 0.0
    last_token_at: float = 0.0

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_at(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]


class EngineMetrics:
    """What the engine reports; the server plugs Prometheus metrics in, tests may leave it empty."""

    def on_admit(self, queue_seconds: float) -> None: ...
    def on_first_token(self, ttft_seconds: float) -> None: ...
    def on_tokens(self, prompt: int, generated: int) -> None: ...
    def on_prefix_hit(self, tokens: int) -> None: ...
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
    ) -> None:
        self.runner = ModelRunner(model, kv_tokens=kv_cache_tokens, block_size=block_size,
                                  state_slots=max_concurrency)
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
            log.info("prefix caching is off: this model keeps a recurrent state per sequence, which a cached "
                     "prompt prefix cannot restore")
        self.allocator = BlockAllocator(self.runner.num_blocks, block_size, prefix_caching=self.prefix_caching)
        dev = model.output_device
        self._suppress = (
            torch.tensor(sorted(set(suppress_token_ids)), dtype=torch.long, device=dev)
            if suppress_token_ids
            else None
        )
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

    # ---- public, called from the asyncio side -------------------------------------------------------
    @property
    def kv_capacity_tokens(self) -> int:
        return self.allocator.usable_blocks * self.block_size

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
            "steps": self.steps,
        }

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, timeout: float) -> RequestHandle:
        """Queue a request; raises QueueFull when the queue is full and EngineDead when the loop is gone."""
        if not self.alive:
            raise EngineDead(self.fatal_error or "the engine is not running")
        loop = asyncio.get_running_loop()
        handle = RequestHandle(request_id, len(prompt_ids), loop, self)
        now = time.monotonic()
        seed = params.seed if params.seed is not None else next(self._seeds)
        seq = Sequence(
            handle=handle,
            prompt_ids=list(prompt_ids),
            params=params,
            arrival=now,
            deadline=now + timeout,
            sampler=new_state(params, seed),
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
            while self._waiting and len(self._running) < self.max_concurrency:
                seq = self._waiting[0]
                worst = min(len(seq.prompt_ids) + seq.params.max_tokens, self.max_model_len)
                need = self.allocator.blocks_for(worst)
                if need > self.allocator.usable_blocks:
                    # can never fit: refuse instead of blocking the queue forever
                    self._waiting.popleft()
                    self._fail_unfit(seq)
                    continue
                if self.runner.has_state and not self.runner.free_state_slots:
                    break
                if seq.hashes is None:
                    seq.hashes = (self.allocator.block_hashes(seq.prompt_ids, len(seq.prompt_ids))
                                  if self.allocator.prefix_caching else [])
                # the last prompt token is always computed: its logits give the first reply token
                cached = self.allocator.match(seq.hashes[: (len(seq.prompt_ids) - 1) // self.block_size])
                if not self.allocator.reserve(need - len(cached)):
                    self.allocator.release(cached, 0)
                    break  # first come, first served: wait for blocks to free
                self._waiting.popleft()
                seq.reserved = need - len(cached)
                seq.blocks = cached
                seq.registered = len(cached)
                seq.computed = len(cached) * self.block_size
                seq.state_slot = self.runner.acquire_state()
                if cached:
                    self.allocator.hit_tokens += seq.computed
                    self.metrics.on_prefix_hit(seq.computed)
                    self.metrics.on_tokens(seq.computed, 0)
                seq.admitted_at = now
                self._running.append(seq)
                self.metrics.on_admit(now - seq.arrival)

    def _fail_unfit(self, seq: Sequence) -> None:
        out: list = []
        self._finish(seq, "error", out, error="the request needs more KV cache than the server has")
        self._deliver(out)

    def _schedule(self) -> tuple[list[Sequence], list[tuple[Sequence, int]]] | None:
        decode = [s for s in self._running if s.computed >= len(s.prompt_ids) and s.computed == s.length - 1]
        budget = max(self.prefill_chunk - len(decode), self.block_size)
        prefill: list[tuple[Sequence, int]] = []
        for s in self._running:
            if s.computed < len(s.prompt_ids) and budget > 0:
                n = min(len(s.prompt_ids) - s.computed, budget)
                prefill.append((s, n))
                budget -= n
        if not decode and not prefill:
            return None
        return decode, prefill

    def _ensure_blocks(self, seq: Sequence, upto: int) -> None:
        while len(seq.blocks) * self.block_size < upto:
            seq.blocks.append(self.allocator.take())
            seq.reserved -= 1

    def _chunks(self, decode: list[Sequence], prefill: list[tuple[Sequence, int]]) -> list[SeqChunk]:
        """This step's work for the runner: one token of each decoding sequence, then each prompt chunk."""
        chunks = []
        for s in decode:
            pos = s.computed
            self._ensure_blocks(s, pos + 1)
            chunks.append(SeqChunk([s.token_at(pos)], pos, s.blocks, s.state_slot, logits=True))
        for s, n in prefill:
            first = s.computed
            self._ensure_blocks(s, first + n)
            chunks.append(SeqChunk(s.prompt_ids[first:first + n], first, s.blocks, s.state_slot,
                                   logits=first + n == len(s.prompt_ids)))
        return chunks

    def _execute(self, batch, out: list) -> None:
        decode, prefill = batch
        try:
            self._forward_and_sample(decode, prefill, out)
        except Exception as exc:  # noqa: BLE001
            if len(decode) + len(prefill) == 1:
                seq = (decode or [p[0] for p in prefill])[0]
                log.exception("generation failed for request %s", seq.handle.request_id)
                self._running.remove(seq)
                self._finish(seq, "error", out, error=f"generation failed: {exc}")
                return
            # isolate the culprit: run each sequence alone so one bad request fails alone
            log.warning("batched step failed (%s); retrying each sequence alone", exc)
            for s in decode:
                self._execute(([s], []), out)
            for s, n in prefill:
                self._execute(([], [(s, n)]), out)

    def _forward_and_sample(self, decode: list[Sequence], prefill: list[tuple[Sequence, int]], out: list) -> None:
        if self.fault_hook is not None:
            self.fault_hook(decode + [s for s, _ in prefill])
        logits = self.runner.execute(self._chunks(decode, prefill))
        if self._suppress is not None:
            logits.index_fill_(1, self._suppress, float("-inf"))
        now = time.monotonic()
        sampled_seqs = list(decode) + [s for s, n in prefill if s.computed + n == len(s.prompt_ids)]
        prompt_done = sum(n for _, n in prefill)
        for row, s in enumerate(sampled_seqs):
            if s.params.penalized:
                apply_penalties(logits[row], s.params, s.prompt_ids, s.output_ids)
        tokens = sample_batch(logits, [s.params for s in sampled_seqs], [s.sampler for s in sampled_seqs])
        for s in decode:
            s.computed += 1
        for s, n in prefill:
            s.computed += n
            self._offer_prefix(s)
        finished: list[Sequence] = []
        for s, token in zip(sampled_seqs, tokens):
            s.output_ids.append(token)
            if not s.first_token_at:
                s.first_token_at = now
                self.metrics.on_first_token(now - s.arrival)
            s.last_token_at = now
            if token in self.eos_token_ids and not s.params.ignore_eos:
                finished.append(s)
                s.output_ids.pop()  # the end marker is not part of the reply
                self._finish(s, "stop", out, completion=len(s.output_ids) + 1)
                continue
            out.append((s, TokenEvent(token)))
            if len(s.output_ids) >= s.params.max_tokens or s.length >= self.max_model_len:
                finished.append(s)
                self._finish(s, "length", out)
        self.metrics.on_tokens(prompt_done, len(sampled_seqs))
        if finished:
            gone = {id(s) for s in finished}
            self._running = [s for s in self._running if id(s) not in gone]

    def _offer_prefix(self, seq: Sequence) -> None:
        """Hand the prompt's blocks that are now full and computed to the prefix cache."""
        bs = self.block_size
        while seq.hashes and seq.registered < len(seq.hashes) and (seq.registered + 1) * bs <= seq.computed:
            self.allocator.register(seq.blocks[seq.registered], seq.hashes[seq.registered])
            seq.registered += 1

    def _finish(self, seq: Sequence, reason: str, out: list, error: str | None = None, completion: int | None = None) -> None:
        if seq.blocks or seq.reserved:
            self.allocator.release(seq.blocks, seq.reserved)
            seq.blocks, seq.reserved = [], 0
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
        out.append((seq, FinishEvent(reason, len(seq.prompt_ids), n, queue_time, inference, error)))

    def _deliver(self, out: list[tuple[Sequence, Event]]) -> None:
        if not out:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for seq, ev in out:
            if isinstance(ev, FinishEvent):
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

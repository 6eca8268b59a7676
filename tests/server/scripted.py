"""A model that writes known text, for tests of what the server makes of a reply (reasoning, tool calls).

The test models have random weights, and their generation config keeps them from writing `<think>` or
`<tool_call>` on their own. `Scripted` plays a model that does: for the requests it knows (by request id), it
makes the next token of a given text the only one the sampler can pick, after the engine's own processing of
the logits (penalties, the random model's suppressed ids; a grammar's mask must allow the token). Everything
else — the real engine, tokenizer, detokenizer, parsers, SSE — runs as it does for any reply.
Log-probabilities stay the random model's (they are taken before processing).
"""

from __future__ import annotations

import contextlib
import threading

import torch


class Scripted:
    def __init__(self, server) -> None:
        model = server.state.model
        self.engine = model.engine
        self.tokenizer = model.tokenizer
        self.end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")  # ends the reply
        self.scripts: dict = {}
        self.queue: list[list[int]] = []
        self.lock = threading.Lock()

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def say(self, request_id: str | None, text: str, *, end: bool = True, index: int | None = None) -> list[int]:
        """The reply of request `request_id` (None: of every request without a script of its own), or of its
        choice `index`: `text`, then the end marker (or, with end=False, the text and then whatever the model
        writes)."""
        ids = self.ids(text) + ([self.end] if end else [])
        with self.lock:
            self.scripts[request_id if index is None else (request_id, index)] = ids
        return ids

    def then(self, *texts: str) -> None:
        """The replies of the next requests that have no script of their own, one text each, in the order they
        are first sampled (for clients that send several requests in a row, as an agent loop does)."""
        with self.lock:
            self.queue += [self.ids(t) + [self.end] for t in texts]

    def _script(self, seq) -> list[int] | None:
        rid = seq.handle.request_id
        with self.lock:
            if rid not in self.scripts and (rid, seq.index) not in self.scripts and self.queue:
                self.scripts[rid] = self.queue.pop(0)
            for key in ((rid, seq.index), rid, None):
                if key in self.scripts:
                    return self.scripts[key]
        return None

    def _process(self, logits: torch.Tensor, sampled) -> None:
        self._original(logits, sampled)
        for i, s in enumerate(sampled):
            ids = self._script(s)
            k = len(s.output_ids)
            if ids is None or k >= len(ids):
                continue
            row = logits[i]
            token = ids[k]
            if s.constraint is not None:
                assert torch.isfinite(row[token]), f"the request's grammar does not allow the script's token {token}"
            row.fill_(float("-inf"))
            row[token] = 0.0

    def __enter__(self) -> "Scripted":
        self._original = self.engine._process
        self.engine._process = self._process
        return self

    def __exit__(self, *exc) -> None:
        del self.engine._process  # the class's method again


def client(server):
    """The official openai client, against a test server."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@contextlib.contextmanager
def failing(server, request_id: str = "poison"):
    """Every engine step that holds request `request_id` raises, until the block ends."""
    engine = server.state.model.engine

    def poison(seqs):
        if any(s.handle.request_id == request_id for s in seqs):
            raise RuntimeError("injected failure")

    engine.fault_hook = poison
    try:
        yield
    finally:
        engine.fault_hook = None

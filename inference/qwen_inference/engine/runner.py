"""Between the scheduler and a model: allocates the caches the model's specs ask for, and turns each step's
chunks (block tables, state slots, positions) into the batch and metadata the model's layers read.

The scheduler speaks in sequences and blocks; the model in rows, slots and segments; only this module
knows both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention import build_metadata
from .cache import Caches, PagedAttentionSpec, PagedKVCache, RecurrentStateSpec, StatePool
from .models.base import CausalLM, ForwardBatch


@dataclass
class SeqChunk:
    """Compute `tokens` of one sequence, the first at position `start`, over its cache blocks."""

    tokens: list[int]
    start: int
    block_table: list[int]
    state_slot: int | None = None
    logits: bool = False  # the next-token logits after the chunk's last token are wanted
    all_logits: bool = False  # the logits after every token of the chunk (prompt log-probabilities)
    save_state_to: int | None = None  # a checkpoint row for the recurrent state after the chunk
    prompt: bool = False  # a prompt chunk even when it holds one token (else one token is a decode row)
    # a sequence with images: its rotary positions are not its tokens' indices. `mrope`: the chunk's positions per
    # section `[3, len(tokens)]` (prompt chunks); `rope_offset`: position minus index (decode rows, past the
    # prompt); `embeds`: (offset in the chunk, `[n, hidden]`) image encodings in place of placeholder tokens
    mrope: torch.Tensor | None = None
    rope_offset: int = 0
    embeds: list[tuple[int, torch.Tensor]] = field(default_factory=list)


class ModelRunner:
    def __init__(self, model: CausalLM, *, kv_tokens: int, block_size: int = 16, state_slots: int = 0,
                 state_checkpoints: int = 0) -> None:
        self.model = model
        self.block_size = block_size
        self.attention_backend = model.platform.attention_backend
        specs = model.cache_specs()
        kv_spec = next((s for s in specs if isinstance(s, PagedAttentionSpec)), None)
        state_spec = next((s for s in specs if isinstance(s, RecurrentStateSpec)), None)
        self.num_blocks = -(-kv_tokens // block_size) + 1 if kv_spec else 0  # +1: the padding block
        devices = model.layer_devices
        self.caches = Caches(
            kv=PagedKVCache(kv_spec, self.num_blocks, block_size, devices) if kv_spec else None,
            states=StatePool(state_spec, state_slots, devices, state_checkpoints if kv_spec else 0)
            if state_spec and state_slots else None,
        )
        if state_spec and not state_slots:
            raise ValueError("this model keeps a recurrent state per sequence: state_slots must be at least 1")

    # ---- what the scheduler asks -------------------------------------------------------------------------
    @property
    def has_state(self) -> bool:
        return self.caches.states is not None

    @property
    def supports_prefix_caching(self) -> bool:
        """A prompt prefix found in the KV cache can be skipped when no layer keeps a recurrent state, or when
        the state at the block boundary can be restored too: the state pool keeps checkpoints (only a model with
        attention layers, blocks to find, is given any)."""
        states = self.caches.states
        return states is None or states.checkpoints > 0

    @property
    def state_checkpoints(self) -> int:
        """Checkpoints kept now (0 for models without recurrent layers)."""
        return self.caches.states.saved if self.caches.states else 0

    def has_checkpoint(self, name: bytes) -> bool:
        return self.caches.states is not None and self.caches.states.has_checkpoint(name)

    def claim_checkpoint(self, name: bytes) -> int | None:
        """A row for checkpoint `name` (the hash of the tokens its state has seen), for a chunk's `save_state_to`;
        None when it is kept already or no row is free."""
        return self.caches.states.claim(name)

    def claim_reply_row(self) -> int | None:
        """A checkpoint row to keep a decoding sequence's state in (copy_state), named when the sequence ends."""
        return self.caches.states.claim_unnamed()

    def commit_checkpoint(self, name: bytes, row: int) -> None:
        self.caches.states.commit(name, row)

    def abandon_checkpoint(self, row: int) -> None:
        self.caches.states.abandon(row)

    def restore_checkpoint(self, name: bytes, slot: int) -> bool:
        return self.caches.states.restore(name, slot)

    @property
    def free_state_slots(self) -> int:
        states = self.caches.states
        return states.slots - states.used if states else 0

    @property
    def state_usage(self) -> float:
        states = self.caches.states
        return states.used / states.slots if states else 0.0

    def acquire_state(self) -> int | None:
        return self.caches.states.acquire() if self.caches.states else None

    def release_state(self, slot: int | None) -> None:
        if slot is not None and self.caches.states is not None:
            self.caches.states.release(slot)

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one KV block's keys and values, in every attention layer."""
        kv, bs = self.caches.kv, self.block_size
        if kv is None:
            return
        for store in (kv.k, kv.v):
            for t in store.values():
                t[dst * bs:(dst + 1) * bs] = t[src * bs:(src + 1) * bs]

    def copy_state(self, src: int, dst: int) -> None:
        """Copy one sequence's recurrent state to another slot, in every recurrent layer."""
        if self.caches.states is not None:
            self.caches.states.copy(src, dst)

    # ---- one step ----------------------------------------------------------------------------------------
    def execute(self, chunks: list[SeqChunk]) -> torch.Tensor:
        """Run one forward over `chunks`; return float32 logits in the chunks' order: a row for each chunk that
        asked for its last token's, or one per token for a chunk that asked for all."""
        singles = [c for c in chunks if len(c.tokens) == 1 and not c.prompt]
        multis = [c for c in chunks if len(c.tokens) > 1 or c.prompt]
        tokens: list[int] = []
        positions: list[int] = []
        segments: list[tuple[int, int]] = []
        rows_of: dict[int, range] = {}
        mrope: list[tuple[int, torch.Tensor]] = []
        embeds: list[tuple[int, torch.Tensor]] = []
        for c in singles:
            rows_of[id(c)] = range(len(tokens), len(tokens) + 1)
            tokens.append(c.tokens[0])
            positions.append(c.start + c.rope_offset)
        for c in multis:
            segments.append((len(tokens), len(c.tokens)))
            rows_of[id(c)] = range(len(tokens), len(tokens) + len(c.tokens))
            if c.mrope is not None:
                mrope.append((len(tokens), c.mrope))
            embeds += [(len(tokens) + at, e) for at, e in c.embeds]
            tokens.extend(c.tokens)
            positions.extend(range(c.start + c.rope_offset, c.start + c.rope_offset + len(c.tokens)))
        logit_rows: list[int] = []
        for c in chunks:
            if c.all_logits:
                logit_rows.extend(rows_of[id(c)])
            elif c.logits:
                logit_rows.append(rows_of[id(c)][-1])
        batch = ForwardBatch(
            token_ids=torch.tensor(tokens, dtype=torch.long),
            positions=torch.tensor(positions, dtype=torch.long),
            num_decode=len(singles),
            segments=segments,
            logit_rows=torch.tensor(logit_rows, dtype=torch.long),
            embeds=embeds,
        )
        if embeds and self.model.image_token_id is None:
            raise ValueError(f"{type(self.model).__name__} takes no images")
        if mrope:
            batch.mrope = batch.positions[None].repeat(3, 1)
            for row, p in mrope:
                batch.mrope[:, row: row + p.shape[1]] = p
        if self.caches.kv is not None:
            batch.attention = build_metadata([(c.start, c.block_table) for c in singles],
                                             [(c.start, len(c.tokens), c.block_table) for c in multis],
                                             self.block_size, self.attention_backend)
        if self.caches.states is not None:
            ordered = singles + multis
            if any(c.state_slot is None for c in ordered):
                raise ValueError("every chunk of a model with recurrent layers needs a state slot")
            self.caches.states.reset([c.state_slot for c in ordered if c.start == 0])
            batch.state_slots = torch.tensor([c.state_slot for c in ordered], dtype=torch.long)
            batch.state_saves = {j: c.save_state_to for j, c in enumerate(multis) if c.save_state_to is not None}
        return self.model.forward(batch, self.caches)

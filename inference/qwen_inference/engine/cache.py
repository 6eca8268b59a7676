"""The caches a model keeps between steps, described by specs the model gives and sized from memory.

Two kinds, as a hybrid model needs both:
- a paged KV cache for attention layers: fixed-size blocks of token slots, handed to sequences as they grow;
- a pool of per-sequence recurrent states for linear-attention layers: one fixed-size slot per running
  sequence, whatever its length.

Memory is bounded by the number of blocks and slots. A sequence reserves, on admission, the blocks its longest
possible reply needs, so a running sequence never waits for memory mid-reply; a request that cannot
reserve waits in the queue instead of failing. With prefix caching, the full blocks of a sequence stay in the
cache after it ends, and a later prompt that starts with the same tokens starts past them. A model with
recurrent layers needs their state at that point too: the state pool keeps checkpoints, copies of a sequence's
state at a block boundary, named by the same chained hash as the block that ends there.
"""

from __future__ import annotations

import collections
import hashlib
import math
import struct
from dataclasses import dataclass, field

import torch


@dataclass
class BlockAllocator:
    """Hands out blocks and, with prefix caching, keeps full blocks after their sequence ends.

    A cached block is named by a hash chained over every token up to its end, so two prompts share a block
    only when everything before it is the same too. Blocks in use are counted by reference; a cached block
    nobody uses is free for the taking (least recently used first) but found again by its hash until then.
    """

    num_blocks: int
    block_size: int
    prefix_caching: bool = False
    _free: list[int] = field(default_factory=list)
    reserved: int = 0  # blocks promised to running sequences but not yet handed out
    _refs: dict[int, int] = field(default_factory=dict)  # block -> sequences using it
    _by_hash: dict[bytes, int] = field(default_factory=dict)
    _hash_of: dict[int, bytes] = field(default_factory=dict)
    _idle: "collections.OrderedDict[int, None]" = field(default_factory=collections.OrderedDict)  # cached, unused
    hit_tokens: int = 0  # prompt tokens found in the cache, all told

    def __post_init__(self) -> None:
        # block 0 is never handed out: padded positions point at it, so a gather never reads a live block
        self._free = list(range(self.num_blocks - 1, 0, -1))

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def free_blocks(self) -> int:
        """Blocks a reservation may count on: never used, or cached and unused."""
        return len(self._free) + len(self._idle)

    @property
    def used_blocks(self) -> int:
        return self.usable_blocks - self.free_blocks

    @property
    def cached_blocks(self) -> int:
        return len(self._by_hash)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def can_reserve(self, blocks: int) -> bool:
        return blocks <= self.free_blocks - self.reserved

    def reserve(self, blocks: int) -> bool:
        if not self.can_reserve(blocks):
            return False
        self.reserved += blocks
        return True

    def take(self) -> int:
        """Hand out one reserved block: a never-used one, else the least recently used cached one."""
        if self.reserved <= 0:
            raise RuntimeError("take() without a reservation")
        self.reserved -= 1
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._idle.popitem(last=False)
            del self._by_hash[self._hash_of.pop(block)]
        self._refs[block] = 1
        return block

    def release(self, blocks: list[int], unused_reservation: int) -> None:
        for block in reversed(blocks):
            n = self._refs.pop(block) - 1
            if n:
                self._refs[block] = n
            elif block in self._hash_of:
                self._idle[block] = None  # stays findable until taken
            else:
                self._free.append(block)
        self.reserved -= unused_reservation
        assert self.reserved >= 0 and self.free_blocks <= self.usable_blocks

    def share(self, blocks: list[int]) -> list[int]:
        """Another sequence uses `blocks` too (the choices of one request share their prompt's blocks)."""
        for block in blocks:
            self._refs[block] += 1
        return list(blocks)

    # ---- prefix caching ---------------------------------------------------------------------------------
    def block_hashes(self, tokens: list[int], limit: int, known: list[bytes] | None = None) -> list[bytes]:
        """The chained hashes of the full blocks among the first `limit` tokens; `known`, those of the first
        blocks already hashed, are taken as they are."""
        bs = self.block_size
        out = list((known or [])[: limit // bs])
        h = out[-1] if out else b""
        for i in range(len(out), limit // bs):
            h = hashlib.sha256(h + struct.pack(f"<{bs}q", *tokens[i * bs:(i + 1) * bs])).digest()
            out.append(h)
        return out

    def match(self, hashes: list[bytes]) -> list[int]:
        """Claim the cached blocks of the longest cached prefix of `hashes`; give them back with release()."""
        if not self.prefix_caching:
            return []
        blocks = []
        for h in hashes:
            block = self._by_hash.get(h)
            if block is None:
                break
            if block in self._idle:
                del self._idle[block]
            self._refs[block] = self._refs.get(block, 0) + 1
            blocks.append(block)
        return blocks

    def register(self, block: int, h: bytes) -> None:
        """`block` now holds the keys and values of the token prefix named `h`."""
        if self.prefix_caching and h not in self._by_hash and block not in self._hash_of:
            self._by_hash[h] = block
            self._hash_of[block] = h



# ---- what a model asks for --------------------------------------------------------------------------------


def _itemsize(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


@dataclass(frozen=True)
class PagedAttentionSpec:
    """Attention layers whose keys and values live in paged blocks, `kv_heads × head_dim` per token each."""

    layers: tuple[int, ...]
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def bytes_per_token(self) -> int:
        return len(self.layers) * 2 * self.kv_heads * self.head_dim * _itemsize(self.dtype)


@dataclass(frozen=True)
class RecurrentStateSpec:
    """Layers that keep a fixed-size state per sequence (named tensors of the given shapes), whatever its
    length: the causal-convolution window and the delta-rule matrix of a Gated DeltaNet layer, say."""

    layers: tuple[int, ...]
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    dtype: torch.dtype

    def bytes_per_sequence(self) -> int:
        per_layer = sum(math.prod(shape) for _, shape in self.shapes) * _itemsize(self.dtype)
        return len(self.layers) * per_layer


CacheSpec = PagedAttentionSpec | RecurrentStateSpec


@dataclass(frozen=True)
class CachePlan:
    kv_tokens: int  # token slots of the paged KV cache (0: the model has no attention layers)
    state_slots: int  # sequences the recurrent-state pool holds (0: the model has no recurrent layers)
    kv_bytes: int
    state_bytes: int  # the running sequences' states and the checkpoints
    checkpoints: int = 0  # recurrent-state checkpoints kept for prefix caching


class CacheTooSmall(ValueError):
    pass


def plan_caches(specs: list[CacheSpec], *, budget: int, max_concurrency: int, max_model_len: int,
                kv_tokens: int | None = None, checkpoints: int = 0) -> CachePlan:
    """Size the caches: a state slot for every sequence that may run at once, then KV blocks from what is
    left of `budget` (at least one whole sequence, at most every slot at full length), unless `kv_tokens`
    is given. Up to `checkpoints` recurrent-state checkpoints (prefix caching, models with recurrent layers)
    come out of what the KV cache would leave over: as many as fit beside one whole sequence's KV cache."""
    per_token = sum(s.bytes_per_token() for s in specs if isinstance(s, PagedAttentionSpec))
    per_seq = sum(s.bytes_per_sequence() for s in specs if isinstance(s, RecurrentStateSpec))
    slots = max_concurrency if per_seq else 0
    state_bytes = slots * per_seq
    if not per_seq or not per_token:
        checkpoints = 0  # without both kinds of layers a checkpoint would have nothing to restore, or no blocks
    if not per_token:
        return CachePlan(0, slots, 0, state_bytes)
    if kv_tokens is None:
        left = budget - state_bytes
        if left < max_model_len * per_token and state_bytes:
            raise CacheTooSmall(
                f"the recurrent state of {max_concurrency} sequences ({state_bytes / 2**20:.0f} MiB) leaves no room "
                f"for one sequence's KV cache in {budget / 2**20:.0f} MiB: lower --max-concurrency")
        if checkpoints:
            checkpoints = max(0, min(checkpoints, (left - max_model_len * per_token) // per_seq))
        left -= checkpoints * per_seq
        kv_tokens = min(max_concurrency * max_model_len, max(left // per_token, max_model_len))
    return CachePlan(kv_tokens, slots, kv_tokens * per_token, state_bytes + checkpoints * per_seq, checkpoints)


# ---- the caches themselves -----------------------------------------------------------------------------


class PagedKVCache:
    """Keys and values of each attention layer, `[num_blocks * block_size, kv_heads, head_dim]` on the
    layer's device. Block 0 is padding: masked positions read it, so it is kept finite."""

    def __init__(self, spec: PagedAttentionSpec, num_blocks: int, block_size: int,
                 layer_devices: list[torch.device]) -> None:
        self.spec = spec
        self.block_size = block_size
        self.num_blocks = num_blocks
        slots = num_blocks * block_size
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        for layer in spec.layers:
            device = layer_devices[layer]
            for store in (self.k, self.v):
                t = torch.empty(slots, spec.kv_heads, spec.head_dim, dtype=spec.dtype, device=device)
                # GPU memory may hold anything, NaNs included; on CPU only the padding block is ever read unset
                (t if device.type != "cpu" else t[:block_size]).zero_()
                store[layer] = t


class StatePool:
    """Per-sequence recurrent states, one slot per running sequence: for each layer and each named tensor of
    the spec, `[slots + checkpoints, *shape]` on the layer's device. A slot is zeroed when a new sequence takes
    it from its first token, or given a checkpoint's copy when the sequence starts past a cached prefix.

    Checkpoints are the rows past the slots: copies of a state at a block boundary, named by the chained hash
    of the tokens before it (the name of the KV block that ends there), least recently used taken first. The
    model writes them itself, in the step that reaches the boundary (`ForwardBatch.state_saves`)."""

    def __init__(self, spec: RecurrentStateSpec, slots: int, layer_devices: list[torch.device],
                 checkpoints: int = 0) -> None:
        self.spec = spec
        self.slots = slots
        self.checkpoints = checkpoints
        self.tensors: dict[int, dict[str, torch.Tensor]] = {
            layer: {name: torch.zeros(slots + checkpoints, *shape, dtype=spec.dtype, device=layer_devices[layer])
                    for name, shape in spec.shapes}
            for layer in spec.layers
        }
        self._free = list(range(slots - 1, -1, -1))
        self._saved: "collections.OrderedDict[bytes, int]" = collections.OrderedDict()  # name -> row, LRU first
        self._spare = list(range(slots + checkpoints - 1, slots - 1, -1))  # checkpoint rows holding nothing

    @property
    def saved(self) -> int:
        return len(self._saved)

    def has_checkpoint(self, name: bytes) -> bool:
        return name in self._saved

    def claim(self, name: bytes) -> int | None:
        """A row for the model to write checkpoint `name` into during a step: a spare one, or the least recently
        used checkpoint's. None when `name` is kept already (the same tokens give the same state) or no row is
        free. The row is found under `name` only after commit(); abandon() gives it back."""
        if name in self._saved:
            self._saved.move_to_end(name)
            return None
        return self.claim_unnamed()

    def claim_unnamed(self) -> int | None:
        """A row for a state whose name is not known yet (a reply's, named when it ends): a spare one, or the least
        recently used checkpoint's; None when every row is out. commit() or abandon() it as claim()'s."""
        if self._spare:
            return self._spare.pop()
        if self._saved:
            return self._saved.popitem(last=False)[1]
        return None

    def commit(self, name: bytes, row: int) -> None:
        """The step that wrote `row` succeeded: it is checkpoint `name` from now on (unless another row of the same
        step became `name` first: two prompts alike, side by side)."""
        if name in self._saved:
            self._spare.append(row)
        else:
            self._saved[name] = row

    def abandon(self, row: int) -> None:
        """The step that was to write `row` failed: the row holds nothing."""
        self._spare.append(row)

    def restore(self, name: bytes, slot: int) -> bool:
        """Put checkpoint `name` into `slot`; False when it is not kept."""
        row = self._saved.get(name)
        if row is None:
            return False
        self._saved.move_to_end(name)
        self.copy(row, slot)
        return True

    def copy(self, src: int, dst: int) -> None:
        """Copy row `src`'s state to row `dst`, in every recurrent layer."""
        for per_layer in self.tensors.values():
            for t in per_layer.values():
                t[dst].copy_(t[src])

    @property
    def used(self) -> int:
        return self.slots - len(self._free)

    def acquire(self) -> int:
        if not self._free:
            raise RuntimeError("no free state slot")
        return self._free.pop()

    def release(self, slot: int) -> None:
        assert slot not in self._free
        self._free.append(slot)

    def reset(self, slots: list[int]) -> None:
        """Zero the states of `slots` (sequences that start from their first token)."""
        if not slots:
            return
        for per_layer in self.tensors.values():
            for t in per_layer.values():
                idx = torch.tensor(slots, dtype=torch.long, device=t.device)
                t.index_fill_(0, idx, 0)

    def __getitem__(self, layer: int) -> dict[str, torch.Tensor]:
        return self.tensors[layer]


@dataclass
class Caches:
    """What one model keeps between steps; either part may be absent."""

    kv: PagedKVCache | None = None
    states: StatePool | None = None

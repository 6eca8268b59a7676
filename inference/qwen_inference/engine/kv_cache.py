"""A paged KV cache: fixed-size blocks of token slots, handed to sequences as they grow.

Memory is bounded by the number of blocks. A sequence reserves, on admission, the blocks its longest
possible reply needs, so a running sequence never waits for memory mid-reply; a request that cannot
reserve waits in the queue instead of failing. With prefix caching, the full blocks of a prompt stay in the
cache after their sequence ends, and a later prompt that starts with the same tokens starts past them.
"""

from __future__ import annotations

import collections
import hashlib
import struct
from dataclasses import dataclass, field

import torch


@dataclass
class BlockAllocator:
    """Hands out blocks and, with prefix caching, keeps full prompt blocks after their sequence ends.

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

    # ---- prefix caching ---------------------------------------------------------------------------------
    def block_hashes(self, tokens: list[int], limit: int) -> list[bytes]:
        """The chained hashes of the full blocks among the first `limit` tokens."""
        out, h = [], b""
        bs = self.block_size
        for i in range(limit // bs):
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
        """`block` now holds the keys and values of the prompt prefix named `h`."""
        if self.prefix_caching and h not in self._by_hash and block not in self._hash_of:
            self._by_hash[h] = block
            self._hash_of[block] = h


class KVCache:
    """Key and value tensors per layer, `[num_blocks * block_size, kv_heads, head_dim]`, on each layer's device."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        layer_devices: list[torch.device],
    ) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        slots = num_blocks * block_size
        self.k = [torch.zeros(slots, kv_heads, head_dim, dtype=dtype, device=d) if d.type != "cpu"
                  else torch.empty(slots, kv_heads, head_dim, dtype=dtype) for d in layer_devices]
        self.v = [torch.zeros(slots, kv_heads, head_dim, dtype=dtype, device=d) if d.type != "cpu"
                  else torch.empty(slots, kv_heads, head_dim, dtype=dtype) for d in layer_devices]
        # the padding block is read by masked positions: keep it finite
        for t in self.k + self.v:
            t[:block_size].zero_()

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return num_layers * 2 * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

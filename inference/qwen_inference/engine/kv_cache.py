"""A paged KV cache: fixed-size blocks of token slots, handed to sequences as they grow.

Memory is bounded by the number of blocks. A sequence reserves, on admission, the blocks its longest
possible reply needs, so a running sequence never waits for memory mid-reply; a request that cannot
reserve waits in the queue instead of failing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class BlockAllocator:
    num_blocks: int
    block_size: int
    _free: list[int] = field(default_factory=list)
    reserved: int = 0  # blocks promised to running sequences but not yet handed out

    def __post_init__(self) -> None:
        # block 0 is never handed out: padded positions point at it, so a gather never reads a live block
        self._free = list(range(self.num_blocks - 1, 0, -1))

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.usable_blocks - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def can_reserve(self, blocks: int) -> bool:
        return blocks <= len(self._free) - self.reserved

    def reserve(self, blocks: int) -> bool:
        if not self.can_reserve(blocks):
            return False
        self.reserved += blocks
        return True

    def take(self) -> int:
        """Hand out one reserved block."""
        if self.reserved <= 0:
            raise RuntimeError("take() without a reservation")
        self.reserved -= 1
        return self._free.pop()

    def release(self, blocks: list[int], unused_reservation: int) -> None:
        self._free.extend(reversed(blocks))
        self.reserved -= unused_reservation
        assert self.reserved >= 0 and len(self._free) <= self.usable_blocks


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

"""Attention over the paged KV cache, for every model family: the metadata the runner builds from block
tables, and the one function attention layers call.

Decode rows (one new token per sequence) attend in one batched call; each prompt chunk attends in a call of
its own. Grouped-query heads are folded into the query length, so no key is ever repeated. The backend
(`Platform.attention_backend`) is "sdpa-gather", which gathers each sequence's keys and values from their blocks
into dense tensors for SDPA, or, on CPUs where the engine's kernels load, "cpu-kernel": decode rows attend straight
from the blocks in one operator (`torch.ops.qwen.decode_attention`), prompt chunks as with "sdpa-gather".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillSegment:
    start: int  # first row of the chunk in the batch
    length: int  # tokens in the chunk
    gather: torch.Tensor  # [L] cache slots of every position up to the chunk's end
    mask: torch.Tensor  # [length, L] bool, causal


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot each token's key and value go to
    num_decode: int  # the first num_decode rows are single tokens of running sequences
    decode_gather: torch.Tensor | None  # [B, L] cache slots of each decode row's history (padding: block 0)
    decode_mask: torch.Tensor | None  # [B, 1, 1, L] bool; None when every row sees all L positions (no padding)
    prefills: list[PrefillSegment]
    decode_lens: torch.Tensor | None = None  # [B] positions each decode row attends to
    decode_kernel: bool = False  # decode rows on the engine's CPU kernel ("cpu-kernel")
    _grouped: dict = field(default_factory=dict, repr=False)

    def to(self, device: torch.device) -> "AttentionMetadata":
        def mv(t):
            return None if t is None else t.to(device, non_blocking=True)

        return AttentionMetadata(
            mv(self.slot_mapping), self.num_decode, mv(self.decode_gather), mv(self.decode_mask),
            [PrefillSegment(p.start, p.length, mv(p.gather), mv(p.mask)) for p in self.prefills],
            mv(self.decode_lens), self.decode_kernel and device.type == "cpu")

    def prefill_mask(self, i: int, groups: int) -> torch.Tensor:
        """Segment i's mask with query rows repeated for each query head sharing a KV head."""
        key = (i, groups)
        if key not in self._grouped:
            self._grouped[key] = self.prefills[i].mask.repeat(groups, 1)
        return self._grouped[key]


def build_metadata(decode: list[tuple[int, list[int]]], prefill: list[tuple[int, int, list[int]]],
                   block_size: int, backend: str = "sdpa-gather") -> AttentionMetadata:
    """From block tables: `decode` holds (position, block_table) of each single-token row, in row order;
    `prefill` holds (first position, length, block_table) of each prompt chunk, after the decode rows. `backend`
    is the platform's `attention_backend`."""

    def slots_upto(table: list[int], n: int) -> torch.Tensor:
        blocks = torch.tensor(table[: -(-n // block_size)], dtype=torch.long)
        return (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:n]

    slot_mapping: list[torch.Tensor] = []
    decode_gather = decode_mask = decode_lens = None
    if decode:
        decode_lens = torch.tensor([pos + 1 for pos, _ in decode], dtype=torch.long)
        lmax = max(pos + 1 for pos, _ in decode)
        decode_gather = torch.zeros(len(decode), lmax, dtype=torch.long)
        decode_mask = torch.zeros(len(decode), 1, 1, lmax, dtype=torch.bool)
        for i, (pos, table) in enumerate(decode):
            slots = slots_upto(table, pos + 1)
            decode_gather[i, : pos + 1] = slots
            decode_mask[i, 0, 0, : pos + 1] = True
            slot_mapping.append(slots[-1:])
        if all(pos + 1 == lmax for pos, _ in decode):
            decode_mask = None  # nothing padded (one sequence, or all at one length): SDPA needs no mask
    segments: list[PrefillSegment] = []
    row = len(decode)
    for first, n, table in prefill:
        total = first + n
        gather = slots_upto(table, total)
        slot_mapping.append(gather[first:])
        causal = torch.ones(n, total, dtype=torch.bool).tril(diagonal=first)
        segments.append(PrefillSegment(row, n, gather, causal))
        row += n
    return AttentionMetadata(torch.cat(slot_mapping) if slot_mapping else torch.zeros(0, dtype=torch.long),
                             len(decode), decode_gather, decode_mask, segments, decode_lens, backend == "cpu-kernel")


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """Store this step's keys and values, then attend. q `[T, H, D]`, k and v `[T, KV, D]`; returns
    `[T, H * D]` in q's dtype. The scale is 1/sqrt(D)."""
    T, H, D = q.shape
    KV = k.shape[1]
    G = H // KV
    act = q.dtype
    k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
    B = meta.num_decode
    if B == T:
        return _decode(q, k_cache, v_cache, meta, KV, G, act)
    out = torch.empty(T, H * D, dtype=act, device=q.device)
    if B:
        out[:B] = _decode(q[:B], k_cache, v_cache, meta, KV, G, act)
    for i, seg in enumerate(meta.prefills):
        n = seg.length
        qs = q[seg.start: seg.start + n].reshape(n, KV, G, D).permute(1, 2, 0, 3).reshape(1, KV, G * n, D)
        ks = k_cache[seg.gather].to(act).transpose(0, 1)[None]
        vs = v_cache[seg.gather].to(act).transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=meta.prefill_mask(i, G))
        out[seg.start: seg.start + n] = o.view(KV, G, n, D).permute(2, 0, 1, 3).reshape(n, H * D)
    return out


def _decode(q, k_cache, v_cache, meta: AttentionMetadata, KV: int, G: int, act) -> torch.Tensor:
    B, _, D = q.shape
    g = meta.decode_gather
    if meta.decode_kernel and act in (k_cache.dtype, torch.float32):  # float32 rows over a bf16 cache: int8 models
        return torch.ops.qwen.decode_attention(q.contiguous(), k_cache, v_cache, g, meta.decode_lens)
    qd = q.reshape(B, KV, G, D)
    kd = k_cache[g].to(act).transpose(1, 2)
    vd = v_cache[g].to(act).transpose(1, 2)
    return F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask).reshape(B, KV * G * D)

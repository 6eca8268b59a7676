"""Images in a prompt, as the engine sees them: each image's patches and grid, where its placeholder tokens sit,
and the rotary positions of the whole prompt.

An image of `t x h x w` patches takes `t*h*w / merge**2` placeholder tokens. Their rotary positions are per
section (time, height, width): the image's row and column in merged patches, all starting at the position the
image starts at; the text after it goes on from the largest of those plus one, so a prompt with images ends at a
smaller position than its length, and every later token keeps that difference (`delta`). This is
`Qwen3_5Model.get_rope_index` in transformers, for one sequence of text and images.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch


@dataclass
class Media:
    pixel_values: list[torch.Tensor]  # each image's patches [t*h*w, channels*temporal*patch*patch]
    grids: list[tuple[int, int, int]]  # each image's (t, h, w) in patches
    spans: list[tuple[int, int]]  # each image's placeholder run in the prompt: (first index, tokens)
    positions: torch.Tensor  # [3, prompt tokens] rotary positions per section
    delta: int  # rotary position minus index, past the prompt
    digests: list[bytes] = field(default_factory=list)  # each image's content hash (prefix caching)

    def key_ids(self, prompt_ids: list[int]) -> list[int]:
        """The prompt's ids with each image's placeholder tokens replaced by values no token has, drawn from the
        image's content: the prefix cache then tells two images apart."""
        out = list(prompt_ids)
        for (start, n), digest in zip(self.spans, self.digests):
            base = int.from_bytes(digest[:6], "little")
            for i in range(n):
                out[start + i] = -1 - ((base + i) & 0x7FFF_FFFF_FFFF)
        return out


def placeholder_runs(prompt_ids: list[int], token_id: int) -> list[tuple[int, int]]:
    """(first index, length) of each run of `token_id` in the prompt."""
    runs: list[tuple[int, int]] = []
    i, n = 0, len(prompt_ids)
    while i < n:
        if prompt_ids[i] == token_id:
            j = i
            while j < n and prompt_ids[j] == token_id:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    return runs


def rope_positions(length: int, spans: list[tuple[int, int]], grids: list[tuple[int, int, int]],
                   merge: int) -> tuple[torch.Tensor, int]:
    """Rotary positions per section `[3, length]` of a prompt whose images sit at `spans`, and the delta of the
    tokens after it."""
    parts: list[torch.Tensor] = []
    at = pos = 0
    for (start, n), (t, h, w) in zip(spans, grids):
        if start > at:
            parts.append(torch.arange(pos, pos + start - at).expand(3, -1))
            pos += start - at
        gh, gw = h // merge, w // merge
        if t * gh * gw != n:
            raise ValueError(f"an image of {t}x{h}x{w} patches takes {t * gh * gw} tokens, not {n}")
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        parts.append(torch.stack((tt, hh, ww)).reshape(3, -1) + pos)
        pos += max(gh, gw)
        at = start + n
    if length > at:
        parts.append(torch.arange(pos, pos + length - at).expand(3, -1))
        pos += length - at
    positions = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
    return positions.long(), pos - length


def build(prompt_ids: list[int], token_id: int, pixel_values: list[torch.Tensor],
          grids: list[tuple[int, int, int]], merge: int) -> Media:
    """The Media of a prompt whose placeholder runs (of `token_id`, already as long as each image needs) hold the
    images in order."""
    spans = placeholder_runs(prompt_ids, token_id)
    if len(spans) != len(grids):
        raise ValueError(f"the prompt has {len(spans)} image placeholders for {len(grids)} images")
    positions, delta = rope_positions(len(prompt_ids), spans, grids, merge)
    digests = [hashlib.sha256(p.numpy().tobytes() + repr(g).encode()).digest() for p, g in zip(pixel_values, grids)]
    return Media(pixel_values=list(pixel_values), grids=list(grids), spans=spans, positions=positions, delta=delta,
                 digests=digests)

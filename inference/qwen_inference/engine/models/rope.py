"""Rotary position embeddings computed as transformers computes them, without importing a modeling module.

Every text model's rotary class in transformers (`Qwen2RotaryEmbedding`, `Qwen3RotaryEmbedding`,
`LlamaRotaryEmbedding`, `Qwen3_5TextRotaryEmbedding`'s frequencies) is the same module: frequencies from
`modeling_rope_utils.ROPE_INIT_FUNCTIONS` for the scaled types (or the original RoPE's for "default"). This module is
that class, built on the same functions. Importing a model's modeling module instead costs about two seconds of a
server's start (it pulls in torch._dynamo, torch.distributed and transformers' generation code); the rope utilities
cost next to nothing once the tokenizer has imported transformers. tests/unit/test_rope.py holds it to each model's
own class, table for table, for every rope type it takes.

The two types whose frequencies change on each call, with the length of what the call holds (dynamic: past the
trained positions; longrope: short or long factors either side of them), are refused: prompts prefilled in chunks
and sequences batched together make those lengths differ from transformers' one call per sequence, so a reply
would depend on its neighbours. (vLLM makes them static instead; `--rope-scaling` yarn or linear takes their place.)
"""

from __future__ import annotations

import functools

import torch

from ..weights import UnsupportedModel

# rope types whose frequencies change on each call with its length (refused, above)
CHANGING = ("dynamic", "longrope")


@functools.cache
def _rope_utils():
    from transformers import modeling_rope_utils

    return modeling_rope_utils


def default_parameters(config) -> tuple[torch.Tensor, float]:
    """The original RoPE's inverse frequencies over the rotated part of a head (all of it unless the rope
    parameters give a `partial_rotary_factor`), and no scaling."""
    base = config.rope_parameters["rope_theta"]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    return inv_freq, 1.0


class RotaryEmbedding(torch.nn.Module):
    """`forward(x, position_ids)` → (cos, sin) in x's dtype, `[batch, positions, rotary dim]`, as the model's own
    rotary class gives them."""

    def __init__(self, config) -> None:
        super().__init__()
        self.rope_type = config.rope_parameters["rope_type"]
        if self.rope_type in CHANGING:
            raise UnsupportedModel(
                f"rope type {self.rope_type!r} is not supported: its frequencies change with each call's length, "
                "which prompt chunks and batches make differ from transformers' (--rope-scaling, yarn or linear, "
                "can serve the model in its place)")
        known = _rope_utils().ROPE_INIT_FUNCTIONS
        if self.rope_type != "default" and self.rope_type not in known:
            raise UnsupportedModel(f"rope type {self.rope_type!r} is not one transformers knows "
                                   f"({', '.join(['default', *known])})")
        init = default_parameters if self.rope_type == "default" else known[self.rope_type]
        inv_freq, self.attention_scaling = init(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


# what a rope scaling keeps of the model's own rotary embedding: its base, the rotated part of a head, Qwen3.5's
# multimodal sections
BASE_KEYS = ("rope_theta", "partial_rotary_factor", "mrope_section", "mrope_interleaved")


def scale(config, scaling: dict) -> None:
    """Give a (text) config the rope scaling `scaling` in place of its own, as if its config.json said so."""
    own = dict(getattr(config, "rope_parameters", None) or {})
    config.rope_parameters = {k: own[k] for k in BASE_KEYS if k in own} | dict(scaling)


def max_positions(config) -> int:
    """The positions a model takes: its max_position_embeddings, times the factor of a linear or yarn rope scaling
    (yarn's of the positions the model was trained for), as vLLM derives its context length."""
    native = int(getattr(config, "max_position_embeddings", 0) or 0)
    params = getattr(config, "rope_parameters", None) or {}
    kind, factor = params.get("rope_type"), params.get("factor")
    if kind not in ("linear", "yarn") or not factor:
        return native
    trained = int(params.get("original_max_position_embeddings") or native) if kind == "yarn" else native
    return int(trained * factor)

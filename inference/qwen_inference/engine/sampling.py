"""Per-request sampling inside a batch: temperature, top-k, top-p, seeds and OpenAI/HF penalties."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


@dataclass
class SamplerState:
    """What the sampler keeps per sequence: its random stream."""

    generator: torch.Generator | None = field(default=None)


def new_state(params: SamplingParams, default_seed: int) -> SamplerState:
    if params.greedy:
        return SamplerState()
    g = torch.Generator()
    g.manual_seed(params.seed if params.seed is not None else default_seed)
    return SamplerState(generator=g)


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int]
) -> None:
    """In place, on one row. presence/frequency follow OpenAI (generated tokens only); repetition follows
    transformers (prompt and generated tokens)."""
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=logits.device)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        ids = torch.tensor(output_ids, dtype=torch.long, device=logits.device)
        counts = torch.bincount(ids, minlength=logits.shape[-1]).to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)


def sample_row(logits: torch.Tensor, params: SamplingParams, state: SamplerState) -> int:
    """Pick the next token from one row of float32 logits (already penalised and suppressed)."""
    if params.greedy:
        return int(torch.argmax(logits))
    # extreme temperatures and penalties can overflow: keep the ranking, never sample from inf or nan
    logits = torch.nan_to_num(logits / params.temperature, nan=float("-inf"), posinf=3e38)
    if not torch.isfinite(logits).any():
        return int(torch.argmax(logits))
    vocab = logits.shape[-1]
    if params.top_k and params.top_k < vocab:
        values, indices = torch.topk(logits, params.top_k)
    elif params.top_p < 1.0:
        values, indices = torch.sort(logits, descending=True)
    else:
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=state.generator))
    probs = torch.softmax(values, dim=-1)
    if params.top_p < 1.0:
        cum = torch.cumsum(probs, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = (cum - probs) < params.top_p
        keep[0] = True  # the most likely token always stays, however small top_p is
        probs = torch.where(keep, probs, torch.zeros_like(probs))
    choice = int(torch.multinomial(probs, 1, generator=state.generator))
    return int(indices[choice])

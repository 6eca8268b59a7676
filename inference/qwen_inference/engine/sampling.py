"""Per-request sampling inside a batch: temperature, min-p, top-k, top-p, seeds, OpenAI/HF penalties, logit bias,
and the tokens a reply may not end on before its minimum length.

Every tensor op runs on the logits' device. Randomness never does: each sequence has its own CPU generator
that draws one uniform number per sampled token, and the token is found on the device by inverse transform
(the first token whose cumulative probability reaches it). So no device generator is ever needed, a seed
gives the same tokens on every device and in every batch, and only the chosen token ids cross back to the
host, once per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off; else tokens below min_p times the most likely one's probability are dropped
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the chosen token's log-probability and the k most likely
    logit_bias: dict[int, float] | None = None  # OpenAI's: token id -> added to its logit before sampling
    stop_token_ids: frozenset[int] = frozenset()  # vLLM's: tokens that end the reply as the end marker does
    min_tokens: int = 0  # vLLM's: no end marker nor stop token (nor stop string) before this many tokens

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


@dataclass
class SamplerState:
    """What the sampler keeps per sequence: its random stream (on the host, whatever the model's device)."""

    generator: torch.Generator | None = field(default=None)

    def uniform(self) -> float:
        """A number in (0, 1]: never 0, so the inverse transform never lands on a token of probability 0."""
        return 1.0 - float(torch.rand((), generator=self.generator))


def new_state(params: SamplingParams, seed: int) -> SamplerState:
    """The random stream of one sequence, seeded with `seed` (the request's seed, or one the engine picks)."""
    if params.greedy:
        return SamplerState()
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
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
        counts = torch.zeros_like(logits).index_add_(0, ids, torch.ones(len(output_ids), dtype=logits.dtype,
                                                                        device=logits.device))
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> None:
    """In place, on one row: each listed token's logit plus its bias (OpenAI's `logit_bias`: -100 bans a token in
    practice, 100 all but forces it), after the penalties and before any grammar's mask, so a bias never lets
    through a token the request's grammar forbids."""
    ids = torch.tensor(list(bias), dtype=torch.long, device=logits.device)
    logits.index_add_(0, ids, torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device))


def sample_tensor(logits: torch.Tensor, params: SamplingParams, u: float | None) -> torch.Tensor:
    """The next token of one row of float32 logits (already penalised and suppressed), as a 0-d tensor on the
    logits' device. `u` in (0, 1] is the sequence's uniform draw; None for greedy."""
    if params.greedy or u is None:
        return torch.argmax(logits)
    # extreme temperatures and penalties can overflow: keep the ranking, never sample from inf or nan
    scaled = torch.nan_to_num(logits / params.temperature, nan=float("-inf"), posinf=3e38)
    if params.min_p > 0.0:  # p < min_p * p_max, in log space: logit < max + log(min_p); the most likely stays
        scaled = scaled.masked_fill(scaled < scaled.max() + math.log(params.min_p), float("-inf"))
    vocab = scaled.shape[-1]
    indices = None
    if params.top_k and params.top_k < vocab:
        values, indices = torch.topk(scaled, params.top_k)
    elif params.top_p < 1.0:
        values, indices = torch.sort(scaled, descending=True)
    else:
        values = scaled
    probs = torch.softmax(values, dim=-1)
    if indices is not None and params.top_p < 1.0:
        cum = torch.cumsum(probs, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = (cum - probs) < params.top_p
        keep[0] = True  # the most likely token always stays, however small top_p is
        probs = torch.where(keep, probs, torch.zeros_like(probs))
    cum = torch.cumsum(probs, dim=-1)
    choice = torch.searchsorted(cum, cum[-1:] * u).clamp_(max=cum.shape[-1] - 1)  # [1]
    picked = choice if indices is None else indices.index_select(0, choice)  # no host sync, unlike indices[t]
    # every logit -inf or nan: softmax gives nan, and the ranking decides
    return torch.where(torch.isfinite(cum[-1]), picked[0], torch.argmax(scaled))


def sample_row(logits: torch.Tensor, params: SamplingParams, state: SamplerState) -> int:
    """The next token of one row, as an int."""
    return int(sample_tensor(logits, params, None if params.greedy else state.uniform()))


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], states: list[SamplerState]) -> list[int]:
    """One token per row of `[R, vocab]` logits, each row with its own parameters; one host sync."""
    if all(p.greedy for p in params):
        return torch.argmax(logits, dim=-1).tolist()
    picks = [sample_tensor(logits[i], p, None if p.greedy else s.uniform())
             for i, (p, s) in enumerate(zip(params, states))]
    return torch.stack(picks).tolist()

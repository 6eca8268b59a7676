"""What one request may ask of the engine beyond sampling: several choices sharing the prompt's cache,
log-probabilities of generated and prompt tokens, and a grammar that constrains every token."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from qwen_inference.engine import (FinishEvent, PromptLogprobsEvent, Request, SamplingParams, TokenEvent)
from qwen_inference.engine.models import load_model
from qwen_inference.engine.platform import Platform

from ..conftest import make_model
from .test_engine import make_engine


@pytest.fixture(scope="module", params=["tiny", "tiny-qwen3.5"])
def preset(request):
    return request.param


@pytest.fixture(scope="module")
def path(preset):
    return make_model(preset, "float32")


@pytest.fixture(scope="module")
def model(path):
    return load_model(path, Platform.cpu(torch.float32))


@pytest.fixture(scope="module")
def hf(path, preset):
    from transformers import AutoModelForCausalLM, Qwen3_5ForConditionalGeneration

    cls = Qwen3_5ForConditionalGeneration if preset == "tiny-qwen3.5" else AutoModelForCausalLM
    m = cls.from_pretrained(str(path), dtype=torch.float32).eval()
    m.generation_config.suppress_tokens = None
    return m


def prompt_for(model, length, base=2000):
    start = 248045 if model.vocab_size > 200000 else 151644
    return [start] + list(range(base, base + length - 1))


async def collect(handle):
    """Tokens per choice, finish events per choice, every token event, and the prompt's log-probabilities."""
    toks: dict[int, list[int]] = {}
    fins: dict[int, FinishEvent] = {}
    events, prompt = [], None
    async for ev in handle.events():
        if isinstance(ev, TokenEvent):
            toks.setdefault(ev.index, []).append(ev.token_id)
            events.append(ev)
        elif isinstance(ev, PromptLogprobsEvent):
            prompt = ev
        else:
            fins[ev.index] = ev
    return toks, fins, events, prompt


def reference(hf, prompt, n):
    with torch.no_grad():
        return hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()


async def test_n_choices_fork_from_one_prefill_and_share_its_blocks(model, hf):
    engine = make_engine(model, prefill_chunk=16)
    prompt = prompt_for(model, 40)  # two full blocks and a partly filled third
    tables = []

    def watch(seqs):
        decoding = [s for s in seqs if s.output_ids]
        if len(decoding) == 4 and not tables:
            tables.append([list(s.blocks) for s in sorted(decoding, key=lambda s: s.index)])

    engine.fault_hook = watch
    try:
        toks, fins, _, _ = await collect(engine.submit("n", prompt, SamplingParams(max_tokens=6, temperature=0), 60,
                                                       Request(n=4)))
        want = reference(hf, prompt, 6)
        assert [toks[i] for i in range(4)] == [want] * 4  # greedy: every choice the same reply
        assert all(fins[i].reason == "length" and fins[i].completion_tokens == 6 for i in range(4))
        first = tables[0]
        assert all(t[:2] == first[0][:2] for t in first)  # the full prompt blocks, shared
        assert len({t[2] for t in first}) == 4  # the partly filled one, copied
        assert engine.allocator.used_blocks == 0 and engine.allocator.reserved == 0
        assert engine.runner.state_usage == 0.0
        # sampled choices differ, and a seed gives the same choices again
        params = SamplingParams(max_tokens=8, temperature=1.0, seed=11)
        a, _, _, _ = await collect(engine.submit("s1", prompt, params, 60, Request(n=3)))
        b, _, _, _ = await collect(engine.submit("s2", prompt, params, 60, Request(n=3)))
        assert a == b and len({tuple(v) for v in a.values()}) > 1
    finally:
        engine.stop()


async def test_n_choices_fork_after_a_cached_prefix(model, hf, preset):
    """A prompt found in the prefix cache (Qwen3.5: through its state checkpoint) then forks its choices: each
    gets the state and blocks the restored prefix left, and the greedy replies are transformers'."""
    engine = make_engine(model, prefill_chunk=32, prefix_caching=True, state_checkpoints=2)
    prompt = prompt_for(model, 100, base=4000)
    params = SamplingParams(max_tokens=5, temperature=0)
    try:
        await collect(engine.submit("a", prompt, params, 60))
        toks, _, _, _ = await collect(engine.submit("b", prompt, params, 60, Request(n=3)))
        assert [toks[i] for i in range(3)] == [reference(hf, prompt, 5)] * 3
        # dense: every full block but the last token's; Qwen3.5: up to its checkpoint 8 tokens or more before the end
        assert engine.stats()["prefix_cache_hit_tokens"] == (80 if preset == "tiny-qwen3.5" else 96)
        assert engine.allocator.used_blocks == 0 and engine.runner.state_usage == 0.0
    finally:
        engine.stop()


async def test_a_step_that_fails_as_choices_fork_gives_back_the_forks(model, hf, preset):
    """The step in which a request's choices fork fails after the model ran: the forks are undone. The dense
    model runs each request again alone (the parent forks anew: every choice gets transformers' reply); Qwen3.5,
    whose states already took the step, ends both requests, every choice. Nothing is left held either way."""
    import asyncio

    engine = make_engine(model, prefill_chunk=128)
    process = engine._process
    failed = []

    def fail_at_the_fork(logits, sampled):
        if any(s.index > 0 for s in sampled) and len({s.handle for s in sampled}) == 2 and not failed:
            failed.append(1)
            raise RuntimeError("injected")
        return process(logits, sampled)

    engine._process = fail_at_the_fork
    prompt, other = prompt_for(model, 40), prompt_for(model, 30, base=3000)
    params = SamplingParams(max_tokens=4, temperature=0)
    try:
        (toks, fins, _, _), (toks2, fins2, _, _) = await asyncio.gather(
            collect(engine.submit("n", prompt, params, 60, Request(n=3))), collect(engine.submit("o", other, params, 60)))
        assert failed
        if preset == "tiny-qwen3.5":
            assert {i: f.reason for i, f in fins.items()} == {0: "error", 1: "error", 2: "error"} and not toks
            assert fins2[0].reason == "error"
        else:
            assert [toks[i] for i in range(3)] == [reference(hf, prompt, 4)] * 3
            assert toks2[0] == reference(hf, other, 4) and fins2[0].reason == "length"
        assert engine.allocator.used_blocks == 0 and engine.allocator.reserved == 0
        assert engine.runner.state_usage == 0.0 and not engine._running
        toks, _, _, _ = await collect(engine.submit("again", prompt, params, 60, Request(n=3)))
        assert [toks[i] for i in range(3)] == [reference(hf, prompt, 4)] * 3
    finally:
        engine.stop()


async def test_a_cancelled_request_ends_every_choice_and_frees_everything(model):
    engine = make_engine(model, prefill_chunk=16)
    try:
        for cancel_after in (0, 3):  # before the prompt is done (nothing forked yet), and mid-reply
            h = engine.submit("c", prompt_for(model, 60), SamplingParams(max_tokens=300, temperature=0.8), 60,
                              Request(n=3))
            seen, fins = 0, {}
            if cancel_after == 0:
                h.cancel()
            async for ev in h.events():
                if isinstance(ev, TokenEvent):
                    seen += 1
                    if seen == cancel_after:
                        h.cancel()
                elif isinstance(ev, FinishEvent):
                    fins[ev.index] = ev.reason
            assert fins == {0: "cancelled", 1: "cancelled", 2: "cancelled"}
            assert engine.allocator.used_blocks == 0 and engine.allocator.reserved == 0
            assert engine.runner.state_usage == 0.0
    finally:
        engine.stop()


async def test_more_choices_than_slots_are_refused(model):
    engine = make_engine(model, max_concurrency=2)
    try:
        with pytest.raises(ValueError, match="between 1 and 2"):
            engine.submit("x", [1, 2, 3], SamplingParams(max_tokens=2), 60, Request(n=3))
    finally:
        engine.stop()


async def test_logprobs_of_generated_and_prompt_tokens_match_transformers(model, hf):
    engine = make_engine(model, prefill_chunk=16)  # the prompt spans three chunks
    prompt = prompt_for(model, 40, base=3000)
    try:
        toks, fins, events, plp = await collect(engine.submit(
            "lp", prompt, SamplingParams(max_tokens=5, temperature=0, logprobs=4), 60, Request(prompt_logprobs=2)))
        reply = toks[0]
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([prompt + reply])).logits[0].float(), dim=-1)
        for j, ev in enumerate(events):
            row = ref[len(prompt) - 1 + j]
            assert ev.logprob == pytest.approx(row[ev.token_id].item(), abs=1e-3)
            assert [t for t, _ in ev.top_logprobs] == row.topk(4).indices.tolist()
            assert ev.top_logprobs[0][0] == ev.token_id  # greedy: the chosen token is the most likely
        assert plp.logprobs[0] is None and len(plp.logprobs) == len(prompt)
        want = [ref[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
        assert plp.logprobs[1:] == pytest.approx(want, abs=1e-3)
        assert [t for t, _ in plp.top_logprobs[5]] == ref[4].topk(2).indices.tolist()
        assert engine.allocator.used_blocks == 0
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def grammars(path, model):
    from transformers import AutoTokenizer

    from qwen_inference.structured import Grammars

    tok = AutoTokenizer.from_pretrained(str(path))
    return tok, Grammars(tok, model.vocab_size, stop_token_ids=[tok.convert_tokens_to_ids("<|im_end|>")])


SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 9},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["city", "days", "tags"], "additionalProperties": False}


async def test_a_grammar_makes_even_random_weights_answer_valid_json(model, grammars, path):
    """Suppressed ids do not apply to a constrained row (the grammar needs newlines the random model's
    suppress list bans); the reply ends when the grammar is complete."""
    import json as _json

    tok, g = grammars
    gen = _json.loads((path / "generation_config.json").read_text())
    engine = make_engine(model, suppress_token_ids=gen["suppress_tokens"])
    factory = g.for_json_schema(SCHEMA, strict=True)
    try:
        toks, fins, _, _ = await collect(engine.submit(
            "g", prompt_for(model, 12), SamplingParams(max_tokens=200, temperature=1.0, seed=5), 60,
            Request(n=2, constraint=factory)))
        for i in range(2):
            text = tok.decode(toks[i], skip_special_tokens=True)
            jsonschema.validate(json.loads(text), SCHEMA)
            assert fins[i].reason == "stop"
        free, _, _, _ = await collect(engine.submit("f", prompt_for(model, 12),
                                                    SamplingParams(max_tokens=30, temperature=1.0, seed=5), 60))
        suppressed = set(gen["suppress_tokens"])
        assert not suppressed & set(free[0])  # unconstrained rows keep the suppress list
        assert engine.allocator.used_blocks == 0
    finally:
        engine.stop()

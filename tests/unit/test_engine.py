"""The engine's forward against transformers' own, and the scheduler's promises, on pure torch."""

from __future__ import annotations

import asyncio

import pytest
import torch

from qwen_inference.engine import Engine, QueueFull, SamplingParams
from qwen_inference.engine.engine import FinishEvent, TokenEvent
from qwen_inference.engine.cache import BlockAllocator
from qwen_inference.engine.models import load_model
from qwen_inference.engine.platform import Platform
from qwen_inference.engine.runner import ModelRunner, SeqChunk
from qwen_inference.engine.sampling import apply_logit_bias, apply_penalties, new_state, sample_row


def prompt_logits(model, ids, state_slots=0):
    """The model's logits after every token of `ids`, computed as one prompt chunk."""
    runner = ModelRunner(model, kv_tokens=-(-len(ids) // 16) * 16, state_slots=state_slots)
    table = list(range(1, runner.num_blocks))
    with torch.inference_mode():
        return runner.execute([SeqChunk(list(ids), 0, table, 0 if state_slots else None, all_logits=True)])


@pytest.fixture(scope="module")
def runner(tiny_model):
    return load_model(tiny_model, Platform.cpu(torch.float32))


def hf_causal_lm(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    model.generation_config.suppress_tokens = None  # the engines under test are made without suppressed ids
    return model


@pytest.fixture(scope="module")
def hf_model(tiny_model):
    return hf_causal_lm(tiny_model)


def make_engine(runner, **kw):
    args = dict(max_concurrency=8, max_queue=8, max_model_len=512, kv_cache_tokens=4096, prefill_chunk=32)
    args.update(kw)
    e = Engine(runner, **args)
    e.start()
    return e


async def run(engine, prompt, params, rid="r", timeout=60.0):
    h = engine.submit(rid, prompt, params, timeout)
    toks, fin = [], None
    async for ev in h.events():
        if isinstance(ev, TokenEvent):
            toks.append(ev.token_id)
        else:
            fin = ev
    return toks, fin


def test_allocator_reserves_and_releases():
    a = BlockAllocator(num_blocks=5, block_size=16)
    assert a.usable_blocks == 4
    assert a.reserve(3) and not a.reserve(2) and a.reserve(1)
    blocks = [a.take(), a.take()]
    assert 0 not in blocks  # the padding block is never handed out
    a.release(blocks, unused_reservation=2)
    assert a.free_blocks == 4 and a.reserved == 0
    with pytest.raises(RuntimeError):
        a.take()


async def test_greedy_matches_transformers_generate(runner, hf_model):
    await greedy_matches_transformers(runner, hf_model)


async def test_greedy_matches_transformers_generate_on_qwen3(tiny_qwen3_model):
    """Qwen3's dense decoder (RMSNorm on queries and keys before the rotation, no qkv bias) too."""
    model = load_model(tiny_qwen3_model, Platform.cpu(torch.float32))
    assert model.layers[0].q_norm is not None and model.layers[0].bqkv is None
    await greedy_matches_transformers(model, hf_causal_lm(tiny_qwen3_model))


async def greedy_matches_transformers(runner, hf_model):
    """Six prompts of different lengths at once (decode rows of different lengths in every step), each reply
    transformers' own greedy one."""
    engine = make_engine(runner)
    try:
        prompts = [[151644] + list(range(1000 + 37 * i, 1000 + 37 * i + 5 + 13 * i)) for i in range(6)]
        results = await asyncio.gather(*(run(engine, p, SamplingParams(max_tokens=12, temperature=0)) for p in prompts))
        for p, (toks, fin) in zip(prompts, results):
            ref = hf_model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)[0, len(p):].tolist()
            assert toks == ref
            assert fin.reason == "length" and fin.completion_tokens == 12 and fin.prompt_tokens == len(p)
    finally:
        engine.stop()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_logits_match_transformers(tiny_model, dtype):
    from transformers import AutoModelForCausalLM

    r = load_model(tiny_model, Platform.cpu(dtype))
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=dtype).eval()
    ids = list(range(500, 540))
    ours = prompt_logits(r, ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert torch.allclose(ours, ref, atol=tol, rtol=tol), (ours - ref).abs().max()


async def test_chunked_prefill_equals_one_shot(runner):
    prompt = list(range(2000, 2150))
    one = make_engine(runner, prefill_chunk=512)
    chunked = make_engine(runner, prefill_chunk=16)
    try:
        a, _ = await run(one, prompt, SamplingParams(max_tokens=8, temperature=0))
        b, _ = await run(chunked, prompt, SamplingParams(max_tokens=8, temperature=0))
        assert a == b
    finally:
        one.stop()
        chunked.stop()


async def test_per_request_sampling_inside_one_batch(runner):
    engine = make_engine(runner)
    try:
        prompt = list(range(3000, 3020))
        greedy = SamplingParams(max_tokens=10, temperature=0)
        seeded = SamplingParams(max_tokens=10, temperature=1.0, seed=7)
        topk1 = SamplingParams(max_tokens=10, temperature=1.5, top_k=1)
        r = await asyncio.gather(run(engine, prompt, greedy), run(engine, prompt, seeded),
                                 run(engine, prompt, topk1), run(engine, prompt, seeded))
        assert r[0][0] == r[2][0]  # top_k=1 is greedy whatever the temperature
        assert r[1][0] == r[3][0]  # the same seed gives the same tokens, even in one batch
        assert r[1][0] != r[0][0]
    finally:
        engine.stop()


def test_sampling_rules():
    logits = torch.tensor([0.0, 5.0, 4.0, -1.0, 3.0])
    state = new_state(SamplingParams(temperature=1.0, seed=1), 0)
    picks = {sample_row(logits.clone(), SamplingParams(temperature=1.0, top_k=2, seed=1), state) for _ in range(200)}
    assert picks == {1, 2}
    picks = {sample_row(logits.clone(), SamplingParams(temperature=1.0, top_p=0.5), state) for _ in range(100)}
    assert picks == {1}  # token 1 alone has more than half the mass
    assert sample_row(logits.clone(), SamplingParams(temperature=0), state) == 1
    # overflowing temperatures and penalties sample from the ranking, never from inf or nan
    huge = torch.tensor([1e38, 3e38, -1e38, float("nan")])
    assert sample_row(huge.clone(), SamplingParams(temperature=1e-4, seed=1), state) == 1
    # a top_p below float32's smallest number still keeps the most likely token (found by the fuzzer)
    assert sample_row(logits.clone(), SamplingParams(temperature=1.0, top_p=5e-324), state) == 1
    assert sample_row(logits.clone(), SamplingParams(temperature=1.0, top_k=3, top_p=5e-324), state) == 1


def test_penalties():
    logits = torch.tensor([1.0, 2.0, -2.0, 0.5])
    p = SamplingParams(repetition_penalty=2.0)
    apply_penalties(logits, p, prompt_ids=[1], output_ids=[2])
    assert logits.tolist() == [1.0, 1.0, -4.0, 0.5]
    logits = torch.tensor([1.0, 1.0, 1.0, 1.0])
    apply_penalties(logits, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [0], [1, 1, 3])
    assert logits.tolist() == [1.0, 1.0 - 0.5 - 0.5, 1.0, 1.0 - 0.5 - 0.25]


def test_logit_bias_adds_to_the_named_logits():
    logits = torch.tensor([1.0, 2.0, -2.0, 0.5])
    apply_logit_bias(logits, {0: -100.0, 3: 2.5})
    assert logits.tolist() == [-99.0, 2.0, -2.0, 3.0]


async def test_logit_bias_bans_lifts_and_forces_tokens(runner):
    """A bias is added to the logits before sampling: -100 bans the greedy token (the next best follows), a bias
    just over the gap between two tokens' logits swaps them and one just under does not, +100 forces a token at
    temperature 1; the log-probabilities reported stay the model's own."""
    engine = make_engine(runner)
    prompt = [151644, 77, 1200, 8800, 15, 6021, 930]
    try:
        h = engine.submit("plain", prompt, SamplingParams(max_tokens=1, temperature=0, logprobs=3), 60)
        first = [ev async for ev in h.events() if isinstance(ev, TokenEvent)][0]
        (a, lp_a), (b, _), (c, lp_c) = first.top_logprobs
        assert first.token_id == a
        banned, _ = await run(engine, prompt, SamplingParams(max_tokens=1, temperature=0, logit_bias={a: -100.0}))
        assert banned == [b]
        gap = lp_a - lp_c  # log-probabilities differ as the logits do
        over, _ = await run(engine, prompt, SamplingParams(max_tokens=1, temperature=0, logit_bias={c: gap + 1e-3}))
        under, _ = await run(engine, prompt, SamplingParams(max_tokens=1, temperature=0,
                                                            logit_bias={c: gap - 1e-3}))
        assert (over, under) == ([c], [a])
        h = engine.submit("forced", prompt, SamplingParams(max_tokens=6, temperature=1.0, seed=2, logprobs=1,
                                                           logit_bias={5000: 100.0}), 60)
        events = [ev async for ev in h.events() if isinstance(ev, TokenEvent)]
        assert [ev.token_id for ev in events] == [5000] * 6
        assert all(ev.top_logprobs[0][0] != 5000 and ev.logprob < ev.top_logprobs[0][1] for ev in events)
    finally:
        engine.stop()


def test_min_p_keeps_the_tokens_within_its_share_of_the_most_likely():
    from qwen_inference.engine.sampling import sample_tensor

    logits = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04]).log()
    grid = [(i + 1) / 400 for i in range(400)]  # the sequence's uniform draw, swept over (0, 1]
    for min_p, kept in ((0.25, [0, 1]), (0.1, [0, 1, 2, 3]), (0.0, [0, 1, 2, 3, 4]), (1.0, [0])):
        params = SamplingParams(temperature=1.0, min_p=min_p)
        picks = [int(sample_tensor(logits.clone(), params, u)) for u in grid]
        assert sorted(set(picks)) == kept, min_p
        # the kept tokens' probabilities, renormalised: token 0 takes its share of the draws
        share = 0.5 / sum([0.5, 0.3, 0.1, 0.06, 0.04][t] for t in kept)
        assert picks.count(0) == pytest.approx(share * len(grid), abs=1)
    # with top-k and top-p too, and at a temperature that flattens the distribution
    params = SamplingParams(temperature=2.0, min_p=0.5, top_k=4, top_p=0.99)
    flat = (logits / 2.0).softmax(-1)
    kept = [t for t in range(5) if flat[t] >= 0.5 * flat.max()]
    assert sorted({int(sample_tensor(logits.clone(), params, u)) for u in grid}) == kept


async def test_stop_token_ids_and_min_tokens(runner):
    """A stop token ends the reply as the end marker does (not part of it); before min_tokens neither the end
    marker nor a stop token may come, and the reply is what the model writes without them."""
    eos = 151645
    engine = make_engine(runner, eos_token_ids={eos})
    prompt = [151644, 77, 1200, 8800, 15, 6021, 930]
    try:
        plain, _ = await run(engine, prompt, SamplingParams(max_tokens=8, temperature=0))
        j = next(j for j in range(1, 8) if plain[j] not in plain[:j])
        toks, fin = await run(engine, prompt, SamplingParams(max_tokens=8, temperature=0,
                                                             stop_token_ids=frozenset({plain[j]})))
        assert (toks, fin.reason, fin.completion_tokens) == (plain[:j], "stop", j + 1)
        forced = {eos: 100.0}  # the end marker all but forced at every step
        toks, fin = await run(engine, prompt, SamplingParams(max_tokens=8, temperature=0, logit_bias=forced))
        assert (toks, fin.reason) == ([], "stop")
        toks, fin = await run(engine, prompt, SamplingParams(max_tokens=8, temperature=0, logit_bias=forced,
                                                             min_tokens=4))
        assert (toks, fin.reason) == (plain[:4], "stop")
        stop = 777
        params = SamplingParams(max_tokens=8, temperature=0.8, seed=5, min_tokens=3, logit_bias={stop: 100.0},
                                stop_token_ids=frozenset({stop}))
        toks, fin = await run(engine, prompt, params)
        assert len(toks) == 3 and stop not in toks and fin.reason == "stop"
        # ignore_eos: the end marker neither ends the reply nor is held back by min_tokens
        toks, fin = await run(engine, prompt, SamplingParams(max_tokens=5, temperature=0, logit_bias=forced,
                                                             ignore_eos=True, min_tokens=3))
        assert (toks, fin.reason) == ([eos] * 5, "length")
    finally:
        engine.stop()


async def test_eos_ends_with_stop(runner):
    engine = make_engine(runner)
    try:
        prompt = [151644, 77, 1200, 8800, 15, 6021, 930]
        toks, _ = await run(engine, prompt, SamplingParams(max_tokens=12, temperature=0))
        k = next(i for i in range(1, len(toks)) if toks[i] not in toks[:i])
        engine.eos_token_ids = {toks[k]}
        toks2, fin = await run(engine, prompt, SamplingParams(max_tokens=12, temperature=0))
        assert toks2 == toks[:k] and fin.reason == "stop" and fin.completion_tokens == k + 1
        toks3, fin = await run(engine, prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        assert toks3 == toks and fin.reason == "length"
    finally:
        engine.stop()


async def test_cancel_frees_slot_and_blocks(runner):
    engine = make_engine(runner, max_concurrency=1)
    try:
        h = engine.submit("long", list(range(10)), SamplingParams(max_tokens=400, temperature=0), 60)
        seen = 0
        async for ev in h.events():
            if isinstance(ev, TokenEvent):
                seen += 1
                if seen == 3:
                    h.cancel()
            else:
                assert ev.reason == "cancelled"
                break
        assert seen < 400
        assert engine.allocator.used_blocks == 0 and engine.allocator.reserved == 0
        toks, fin = await run(engine, list(range(10)), SamplingParams(max_tokens=3, temperature=0))
        assert len(toks) == 3
    finally:
        engine.stop()


async def test_queue_bound(runner):
    engine = make_engine(runner, max_concurrency=1, max_queue=1)
    try:
        handles = [engine.submit(f"q{i}", [1, 2, 3], SamplingParams(max_tokens=50), 60) for i in range(2)]
        with pytest.raises(QueueFull) as exc:
            engine.submit("q2", [1, 2, 3], SamplingParams(max_tokens=50), 60)
        assert exc.value.retry_after >= 1
        for h in handles:
            async for ev in h.events():
                last = ev
            assert isinstance(last, FinishEvent) and last.reason == "length"
    finally:
        engine.stop()


async def test_idle_engine_does_not_spin(runner):
    engine = make_engine(runner)
    try:
        await run(engine, [1, 2, 3], SamplingParams(max_tokens=2))
        steps = engine.stats()["steps"]
        await asyncio.sleep(0.5)
        assert engine.stats()["steps"] == steps
    finally:
        engine.stop()


def test_int8_logits_track_the_float_model(tiny_model):
    """Per-token int8 activations and per-channel int8 weights: the next-token distribution barely moves."""
    ids = list(range(700, 764))
    models = {q: load_model(tiny_model, Platform.cpu(torch.float32, q)) for q in ("none", "int8")}
    assert models["int8"].weight_bytes() < 0.3 * models["none"].weight_bytes()
    a, b = (prompt_logits(models[q], ids) for q in ("none", "int8"))
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.min() > 0.99, cos.min()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean()
    assert agree > 0.9, agree


@pytest.mark.parametrize("layout", ["engine", "torch"])
def test_int4_weights_in_groups_compute_what_their_dequantized_weights_do(tiny_model, layout, monkeypatch):
    """4-bit weights in groups of 32 (the output layer in int8): a third of bf16's bytes for the layers, and
    logits those of a bf16 model holding the same weights dequantized, so the kernel computes the quantized model
    (the engine's own layout and kernel quantize activations to int8 per row on the way, as llama.cpp does, which
    costs a little of the agreement); what 4 bits cost against float32 is measured in make bench (on this random
    tiny model the logits keep a cosine of about 0.95). Prompt chunks and single decode rows agree. Both layouts:
    the engine's where its AVX512 kernel runs, torch's elsewhere."""
    from qwen_inference.engine.weights import Int4BlockWeight, Int4Weight, Int8Weight

    if layout == "torch":
        monkeypatch.setattr(Platform, "int4_kernels", lambda self: False)
    elif not Platform.cpu(torch.bfloat16, "int4").int4_kernels():
        pytest.skip("the engine's int4 kernel needs AVX512")
    kind = Int4BlockWeight if layout == "engine" else Int4Weight
    ids = list(range(700, 764))
    q = load_model(tiny_model, Platform.cpu(torch.bfloat16, "int4"))
    names = ("wqkv", "wo", "w_gate_up", "w_down")
    assert all(isinstance(getattr(lw, n), kind) for lw in q.layers for n in names)
    assert isinstance(q.lm_head, Int8Weight) and q.embed is None  # tied: the embedding reads the int8 rows
    ref = load_model(tiny_model, Platform.cpu(torch.bfloat16))
    layer_bytes = sum(getattr(lw, n).nbytes() for lw in q.layers for n in names)
    assert layer_bytes < 0.33 * sum(getattr(lw, n).numel() * 2 for lw in ref.layers for n in names)
    for lw in ref.layers:
        for n in names:
            w = getattr(lw, n)
            g = w.float().view(w.shape[0], -1, 32)
            lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
            scale = ((hi - lo) / 15).clamp(min=1e-8)
            setattr(lw, n, (torch.round((g - lo) / scale).clamp(0, 15) * scale + lo).view_as(w).bfloat16())
    # the int8 output layer run as the int4 model runs it: on CPUs without VNNI torch's integer matmul, which a bf16
    # model's matmul would call, saturates (Platform.int8_kernel_rows)
    ref.lm_head, ref.embed, ref.linear = q.lm_head, None, q.linear
    a, b = prompt_logits(ref, ids), prompt_logits(q, ids)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.min() > 0.995
    exact = prompt_logits(load_model(tiny_model, Platform.cpu(torch.float32)), ids)
    assert torch.nn.functional.cosine_similarity(exact, b, dim=-1).mean() > 0.9
    one = prompt_logits(q, ids[:1])  # a single row: the decode shape
    assert torch.nn.functional.cosine_similarity(one[0], b[0], dim=0) > 0.999


def test_int8_refuses_gpus_and_unknown_schemes(tiny_model):
    with pytest.raises(ValueError, match="CPU only"):
        load_model(tiny_model, Platform((torch.device("cuda", 0),), torch.float32, "int8"))
    with pytest.raises(ValueError, match="unknown quantization"):
        load_model(tiny_model, Platform.cpu(torch.float32, "int3"))
    with pytest.raises(ValueError, match="int4 runs on CPU only"):
        Platform((torch.device("cuda", 0),), torch.bfloat16, "int4")


def test_layers_split_over_devices_keep_every_tensor_on_its_layers_device(tiny_model):
    """The several-GPU layout (consecutive layers per device, activations handed from one to the next, each
    layer's KV cache on its device) with the `meta` device standing in for a second GPU, since none is here:
    torch refuses any op that mixes a CPU tensor with a meta one, so a tensor left on the wrong device fails
    this test. A real GPU run is not part of the suite."""
    cpu, other = torch.device("cpu"), torch.device("meta")
    r = load_model(tiny_model, Platform((cpu, other), torch.float32))
    half = -(-r.num_layers // 2)
    assert r.layer_devices == [cpu] * half + [other] * (r.num_layers - half)
    assert r.embed.device == cpu and r.lm_head.device == r.norm.device == other
    runner = ModelRunner(r, kv_tokens=112)
    assert [runner.caches.kv.k[i].device for i in range(r.num_layers)] == r.layer_devices
    # one step with a decode row (a sequence 40 tokens in) and a 24-token prompt chunk of another
    out = runner.execute([SeqChunk([7], 40, [1, 2, 3], logits=True),
                          SeqChunk(list(range(600, 624)), 0, [4, 5], logits=True)])
    assert out.device == other and out.shape == (2, r.vocab_size)


# ---- prefix caching -----------------------------------------------------------------------------------


def test_allocator_keeps_full_prompt_blocks_until_their_room_is_needed():
    a = BlockAllocator(num_blocks=4, block_size=4, prefix_caching=True)  # 3 usable blocks
    prompt = list(range(100, 110))  # two full blocks and two tokens
    hashes = a.block_hashes(prompt, len(prompt))
    assert len(hashes) == 2 and hashes == a.block_hashes(prompt + [1, 2], 10)
    assert a.block_hashes(prompt, len(prompt), hashes[:1]) == hashes  # the chain goes on from the blocks known
    assert a.block_hashes([7] + prompt[1:], 10)[1] != hashes[1]  # a block's name covers all before it
    assert a.match(hashes) == []
    assert a.reserve(3)
    blocks = [a.take() for _ in range(3)]
    for b, h in zip(blocks, hashes):
        a.register(b, h)
    a.release(blocks, 0)
    assert a.free_blocks == 3 and a.cached_blocks == 2 and a.used_blocks == 0
    # found again: both blocks, claimed (in use) until released
    assert a.match(hashes) == blocks[:2] and a.used_blocks == 2
    assert a.match(hashes[:1]) == blocks[:1]  # a second sequence shares the first block
    a.release(blocks[:1], 0)
    a.release(blocks[:2], 0)
    assert a.used_blocks == 0 and a.cached_blocks == 2
    # room is needed: the never-used block goes first, then the least recently used cached one
    assert a.reserve(3)
    taken = [a.take() for _ in range(3)]
    assert sorted(taken) == sorted(blocks) and a.cached_blocks == 0 and a.match(hashes) == []
    a.release(taken, 0)
    assert a.free_blocks == 3
    # without prefix caching nothing is kept
    b = BlockAllocator(num_blocks=4, block_size=4)
    assert b.reserve(1)
    blk = b.take()
    b.register(blk, hashes[0])
    b.release([blk], 0)
    assert b.match(hashes) == [] and b.cached_blocks == 0


async def test_prefix_cache_hits_give_the_same_tokens(runner):
    """Greedy replies with the prompt's start found in the cache equal those computed from scratch."""
    plain = make_engine(runner)
    cached = make_engine(runner, prefix_caching=True)
    system = [151644] + list(range(3000, 3050))  # 51 tokens shared: three full blocks of 16
    prompts = [system + list(range(4000 + 50 * i, 4000 + 50 * i + 9 + i)) for i in range(4)]
    try:
        want = [await run(plain, p, SamplingParams(max_tokens=10, temperature=0)) for p in prompts]
        got = [await run(cached, prompts[0], SamplingParams(max_tokens=10, temperature=0))]
        assert cached.stats()["prefix_cache_hit_tokens"] == 0
        # the others, at once: each starts past the three cached blocks
        got += await asyncio.gather(*(run(cached, p, SamplingParams(max_tokens=10, temperature=0), rid=f"r{i}")
                                      for i, p in enumerate(prompts[1:])))
        assert [t for t, _ in got] == [t for t, _ in want]
        assert [f.prompt_tokens for _, f in got] == [len(p) for p in prompts]
        assert cached.stats()["prefix_cache_hit_tokens"] == 3 * 48
        # the same prompt again: every full block but the one holding the last token is found
        again, _ = await run(cached, prompts[3], SamplingParams(max_tokens=10, temperature=0))
        assert again == want[3][0]
        assert cached.stats()["prefix_cache_hit_tokens"] == 3 * 48 + (len(prompts[3]) - 1) // 16 * 16
        a = cached.allocator
        assert a.used_blocks == 0 and a.reserved == 0 and a.cached_blocks > 0
    finally:
        plain.stop()
        cached.stop()


async def test_the_next_turn_of_a_conversation_starts_past_the_last_reply(runner):
    """A sequence's reply blocks join the prefix cache when it ends: a prompt that carries on from the reply
    (the next turn of a conversation) starts past them, with the same tokens as from scratch. A failed
    sequence offers nothing."""
    plain = make_engine(runner)
    cached = make_engine(runner, prefix_caching=True)
    prompt = [151644] + list(range(6000, 6039))  # 40 tokens: 2 full blocks
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    try:
        reply, _ = await run(cached, prompt, params)
        assert cached.allocator.cached_blocks == (40 + 30 - 1) // 16  # the last reply token was never computed
        nxt = prompt + reply + [151645, 198, 151644] + list(range(7000, 7010))
        got, _ = await run(cached, nxt, SamplingParams(max_tokens=8, temperature=0))
        want, _ = await run(plain, nxt, SamplingParams(max_tokens=8, temperature=0))
        assert got == want and cached.stats()["prefix_cache_hit_tokens"] == 64
        before = cached.allocator.cached_blocks
        calls = []

        def fail_late(seqs):  # 2 prompt chunks of 32, then decode: the 25th step fails, 62 tokens computed
            calls.append(1)
            if len(calls) == 25:
                raise RuntimeError("injected")

        cached.fault_hook = fail_late
        _, fin = await run(cached, list(range(8000, 8040)), params)
        assert fin.reason == "error" and cached.allocator.cached_blocks == before + 2  # the prompt's blocks only
        assert cached.allocator.used_blocks == 0 and cached.allocator.reserved == 0
    finally:
        plain.stop()
        cached.stop()


async def test_prefix_cache_under_memory_pressure_evicts_and_leaks_nothing(runner):
    """A cache too small to keep every prompt: cached blocks are taken back for new work, never in use."""
    engine = make_engine(runner, prefix_caching=True, kv_cache_tokens=160, max_concurrency=4)  # 10 blocks
    plain = make_engine(runner, kv_cache_tokens=160, max_concurrency=4)
    prompts = [[151644] + list(range(5000 + 7 * i, 5000 + 7 * i + 40)) for i in range(6)]
    prompts += prompts[:2]  # evicted by now, or found: either way the same tokens
    try:
        for batch in (prompts[:4], prompts[4:]):
            params = SamplingParams(max_tokens=6, temperature=0)
            got = await asyncio.gather(*(run(engine, p, params, rid=str(i)) for i, p in enumerate(batch)))
            want = await asyncio.gather(*(run(plain, p, params, rid=str(i)) for i, p in enumerate(batch)))
            assert [t for t, _ in got] == [t for t, _ in want]
        a = engine.allocator
        assert a.used_blocks == 0 and a.reserved == 0 and a.free_blocks == a.usable_blocks
        assert 0 < a.cached_blocks <= a.usable_blocks
    finally:
        engine.stop()
        plain.stop()


def test_sampling_runs_on_the_logits_device():
    """No GPU here, so the `meta` device stands in for one: every tensor the sampler touches must sit on the
    logits' device (a CPU tensor or a CPU generator handed to a device op is the bug this guards against), and
    only the sequence's host generator draws random numbers, outside any device op."""
    from torch.overrides import TorchFunctionMode

    from qwen_inference.engine.sampling import sample_tensor

    class Devices(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen, self.generators = set(), []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            for a in list(args) + list(kwargs.values()):
                for t in (a if isinstance(a, (list, tuple)) else [a]):
                    if isinstance(t, torch.Tensor):
                        self.seen.add(t.device.type)
            if kwargs.get("generator") is not None:
                self.generators.append(func)
            return func(*args, **kwargs)

    logits = torch.zeros(151936, device="meta")
    cases = [SamplingParams(temperature=0.7, top_p=0.9, seed=3), SamplingParams(temperature=1.2, top_k=40, seed=3),
             SamplingParams(temperature=0.8, top_k=50, top_p=0.5), SamplingParams(temperature=1.0),
             SamplingParams(temperature=0), SamplingParams(temperature=1.0, repetition_penalty=1.3,
                                                           presence_penalty=0.5, frequency_penalty=0.2),
             SamplingParams(temperature=0.9, logit_bias={3: 5.0, 7: -100.0}),
             SamplingParams(temperature=0.9, min_p=0.05, top_k=40)]
    for params in cases:
        state = new_state(params, 0)
        u = None if params.greedy else state.uniform()  # drawn on the host, before any device op
        with Devices() as mode:
            row = logits.clone()
            apply_penalties(row, params, [5, 6, 7], [8, 8, 9])
            if params.logit_bias:
                apply_logit_bias(row, params.logit_bias)
            token = sample_tensor(row, params, u)
        assert token.device.type == "meta" and token.dim() == 0
        assert mode.seen == {"meta"}, (params, mode.seen)
        assert mode.generators == []


def test_decode_rows_of_one_length_attend_without_a_mask_and_get_the_masked_result():
    """No padding in a decode batch (one sequence, or all at one length): no mask goes to SDPA, and the result is
    what the all-true mask gives; rows of different lengths keep their mask."""
    from qwen_inference.engine.attention import build_metadata, paged_attention

    assert build_metadata([(9, [1])], [], 16).decode_mask is None
    assert build_metadata([(9, [1]), (9, [2])], [], 16).decode_mask is None
    mixed = build_metadata([(9, [1]), (4, [2])], [], 16)
    assert mixed.decode_mask is not None and mixed.decode_mask[1, 0, 0].tolist() == [True] * 5 + [False] * 5
    g = torch.Generator().manual_seed(0)
    kc, vc = torch.randn(48, 2, 8, generator=g), torch.randn(48, 2, 8, generator=g)
    q, k, v = torch.randn(2, 4, 8, generator=g), torch.randn(2, 2, 8, generator=g), torch.randn(2, 2, 8, generator=g)
    meta = build_metadata([(9, [1]), (9, [2])], [], 16)
    masked = build_metadata([(9, [1]), (9, [2])], [], 16)
    masked.decode_mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    a = paged_attention(q, k, v, kc.clone(), vc.clone(), meta)
    b = paged_attention(q, k, v, kc.clone(), vc.clone(), masked)
    assert torch.allclose(a, b, atol=1e-6, rtol=1e-6)


def test_widened_weights_reuse_one_buffer_per_thread():
    """A bf16 weight widened for a float32 prompt chunk lands in the thread's scratch buffer (no fresh memory to
    fault in on every step), equal to torch's conversion; another thread widens into its own."""
    import threading

    from qwen_inference.engine.weights import linear, widened

    from qwen_inference.engine import weights

    g = torch.Generator().manual_seed(5)
    big, small = torch.randn(64, 32, generator=g).bfloat16(), torch.randn(8, 16, generator=g).bfloat16()
    weights._scratch.__dict__.clear()
    with torch.inference_mode():  # made in an engine step, written again outside one
        widened(big, torch.float32)
    a = widened(big, torch.float32)
    assert torch.equal(a, big.float()) and a.shape == big.shape
    b = widened(small, torch.float32)
    assert torch.equal(b, small.float()) and b.data_ptr() == a.data_ptr()  # the same memory, reused
    other = {}
    t = threading.Thread(target=lambda: other.update(p=widened(small, torch.float32).data_ptr()))
    t.start()
    t.join()
    assert other["p"] != a.data_ptr()
    x = torch.randn(3, 32, generator=g)
    bias = torch.randn(64, generator=g).bfloat16()
    assert torch.equal(linear(x, big, bias), torch.nn.functional.linear(x, big.float(), bias.float()))


def test_checkpoint_reads_straight_from_the_file_what_safetensors_reads(tmp_path):
    """Tensors stored in the dtype wanted are read from the file into their tensor (stacked ones into their rows);
    the rest go through safetensors and a conversion. Either way the values are safetensors' own, across shards;
    a file that ends inside a tensor is an error, not a short tensor."""
    import json

    from safetensors.torch import save_file

    from qwen_inference.engine.weights import Checkpoint, CheckpointError

    torch.manual_seed(5)
    shards = {
        "a.safetensors": {"q": torch.randn(6, 8).bfloat16(), "k": torch.randn(2, 8).bfloat16(),
                          "norm": torch.randn(8), "scalar": torch.tensor(3.5)},
        "b.safetensors": {"v": torch.randn(2, 8).bfloat16(), "h": torch.randn(4, 8, dtype=torch.float16)},
    }
    for file, tensors in shards.items():
        save_file(tensors, str(tmp_path / file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {name: file for file, tensors in shards.items() for name in tensors}}))
    every = {name: t for tensors in shards.values() for name, t in tensors.items()}
    cpu = torch.device("cpu")
    with Checkpoint(tmp_path) as ck:
        for name, t in every.items():
            for dtype in (t.dtype, torch.float32, torch.bfloat16):
                got = ck.get(name, dtype, cpu)
                assert got.dtype == dtype and got.shape == t.shape and torch.equal(got, t.to(dtype)), (name, dtype)
        direct = ck.cat(["q", "k", "v"], torch.bfloat16, cpu)  # across two shards, each read into its rows
        assert torch.equal(direct, torch.cat([every["q"], every["k"], every["v"]]))
        widened = ck.cat(["q", "k", "v"], torch.float32, cpu)  # stored bf16, wanted float32: converted
        assert torch.equal(widened, torch.cat([every["q"], every["k"], every["v"]]).float())
        with pytest.raises(CheckpointError, match="the checkpoint has no tensor nope"):
            ck.get("nope", torch.float32, cpu)
    data = (tmp_path / "b.safetensors").read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    last = max((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][1])
    (tmp_path / "b.safetensors").write_bytes(data[:-10])
    with Checkpoint(tmp_path) as ck, pytest.raises(CheckpointError, match="ends inside a tensor"):
        ck.get(last, every[last].dtype, cpu)
    single = tmp_path / "garbage"
    single.mkdir()
    (single / "model.safetensors").write_bytes((20).to_bytes(8, "little") + b"not json at all, no.")
    with pytest.raises(CheckpointError, match="model.safetensors is not a safetensors file"):
        Checkpoint(single)

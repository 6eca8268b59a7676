"""The Qwen3.5 family (Gated DeltaNet + gated attention) against transformers' own implementation, in both
checkpoint layouts, and the engine's promises for models with a recurrent state per sequence."""

from __future__ import annotations

import asyncio

import pytest
import torch

from qwen_inference.engine import SamplingParams
from qwen_inference.engine.cache import RecurrentStateSpec
from qwen_inference.engine.engine import TokenEvent
from qwen_inference.engine.models import load_model
from qwen_inference.engine.platform import Platform

from ..conftest import make_model
from .test_engine import make_engine, prompt_logits, run

LAYOUTS = {"multimodal": "tiny-qwen3.5", "text": "tiny-qwen3.5-text"}


def _hf(path, layout):
    from transformers import AutoModelForCausalLM, Qwen3_5ForConditionalGeneration

    cls = Qwen3_5ForConditionalGeneration if layout == "multimodal" else AutoModelForCausalLM
    m = cls.from_pretrained(str(path), dtype=torch.float32).eval()
    m.generation_config.suppress_tokens = None  # the engines under test suppress nothing either
    return m


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request):
    """Both published layouts: loading and logits. (The engine's behaviour is the same for both: the two tiny
    models hold the same language-model weights, so the tests below run on the multimodal one.)"""
    return request.param


@pytest.fixture(scope="module")
def layout_path(layout):
    return make_model(LAYOUTS[layout], "float32")


@pytest.fixture(scope="module")
def path():
    return make_model(LAYOUTS["multimodal"], "float32")


@pytest.fixture(scope="module")
def model(path):
    return load_model(path, Platform.cpu(torch.float32))


@pytest.fixture(scope="module")
def hf(path):
    return _hf(path, "multimodal")


def reference(hf, prompt, n):
    with torch.no_grad():
        return hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()


def prompts(count, base=1000):
    return [[248045] + list(range(base + 37 * i, base + 37 * i + 5 + 13 * i)) for i in range(count)]


@pytest.mark.parametrize("images", [True, False])
def test_the_language_model_and_the_vision_tower_are_read(layout_path, layout, images):
    """Every language-model tensor is loaded, once; the multimodal layout's vision tower (`model.visual.*`) too,
    unless images are off (it then stays on disk)."""
    import math

    from safetensors import safe_open

    model = load_model(layout_path, Platform.cpu(torch.float32), images=images)
    with safe_open(str(model.folder / "model.safetensors"), framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    visual = [k for k in shapes if k.startswith("model.visual.")]
    assert bool(visual) == (layout == "multimodal")
    skipped = ("mtp.",) if images else ("model.visual.", "mtp.")
    on_disk = sum(math.prod(s) for k, s in shapes.items() if not k.startswith(skipped))
    loaded = {id(t): t.numel() for t in model.tensors() if t is not None}
    assert sum(loaded.values()) == on_disk
    assert (model.image_token_id is not None) == (images and layout == "multimodal")
    assert {type(layer).__name__ for layer in model.layers} == {"DeltaNetLayer", "AttentionLayer"}


def test_prompt_logits_match_transformers(layout_path, layout):
    ids = list(range(500, 640))  # more than two 64-token chunks of the delta rule
    ours = prompt_logits(load_model(layout_path, Platform.cpu(torch.float32)), ids, state_slots=1)
    with torch.no_grad():
        ref = _hf(layout_path, layout)(torch.tensor([ids])).logits[0].float()
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()


async def test_greedy_matches_transformers_alone_and_eight_in_one_batch(model, hf):
    """Prompts longer than two prefill chunks too: the delta-rule state carries across chunk boundaries."""
    engine = make_engine(model, prefill_chunk=32)
    try:
        ps = prompts(8)
        assert max(len(p) for p in ps) > 2 * 32
        want = [reference(hf, p, 10) for p in ps]
        alone = [await run(engine, p, SamplingParams(max_tokens=10, temperature=0)) for p in ps[:2]]
        assert [t for t, _ in alone] == want[:2]
        together = await asyncio.gather(*(run(engine, p, SamplingParams(max_tokens=10, temperature=0), rid=str(i))
                                          for i, p in enumerate(ps)))
        assert [t for t, _ in together] == want
        assert all(f.reason == "length" and f.completion_tokens == 10 for _, f in together)
        assert engine.runner.caches.states.used == 0
    finally:
        engine.stop()


async def test_cancelled_stream_leaves_the_others_exact(model, hf):
    engine = make_engine(model, prefill_chunk=32)
    ps = prompts(4, base=3000)
    want = [reference(hf, p, 12) for p in ps]
    try:
        victim = engine.submit("victim", ps[0], SamplingParams(max_tokens=200, temperature=0), 60)

        async def cancel_after_three():
            seen = 0
            async for ev in victim.events():
                if isinstance(ev, TokenEvent):
                    seen += 1
                    if seen == 3:
                        victim.cancel()
                else:
                    return ev.reason, seen

        results = await asyncio.gather(cancel_after_three(),
                                       *(run(engine, p, SamplingParams(max_tokens=12, temperature=0), rid=str(i))
                                         for i, p in enumerate(ps[1:])))
        assert results[0][0] == "cancelled" and results[0][1] < 200
        assert [t for t, _ in results[1:]] == want[1:]
        assert engine.runner.caches.states.used == 0 and engine.allocator.used_blocks == 0
    finally:
        engine.stop()


async def test_a_reused_slot_starts_from_a_clean_state(model, hf):
    """One slot: the second sequence takes the state slot the first one left full, and must not see it."""
    engine = make_engine(model, max_concurrency=1, prefill_chunk=32)
    try:
        first, second = prompts(2, base=5000)
        await run(engine, first, SamplingParams(max_tokens=20, temperature=0))
        pool = engine.runner.caches.states
        assert pool.slots == 1 and any(t["ssm"].abs().sum() > 0 for t in pool.tensors.values())
        toks, _ = await run(engine, second, SamplingParams(max_tokens=10, temperature=0))
        assert toks == reference(hf, second, 10)
    finally:
        engine.stop()


def test_chunked_delta_rule_carries_state_across_any_split(model):
    """Our chunked rule, split at arbitrary points with the state handed on, equals transformers' recurrent
    rule over the whole sequence."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_recurrent_gated_delta_rule

    g = torch.Generator().manual_seed(0)
    n, H, D = 150, 4, 16
    q = torch.randn(n, H, D, generator=g)
    k = torch.nn.functional.normalize(torch.randn(n, H, D, generator=g), dim=-1)
    v = torch.randn(n, H, D, generator=g)
    beta = torch.rand(n, H, generator=g)
    decay = -torch.rand(n, H, generator=g)
    ref, ref_state = torch_recurrent_gated_delta_rule(q[None], k[None], v[None], decay[None], beta[None],
                                                      initial_state=None, output_final_state=True)
    q_scaled = q * D ** -0.5
    for cuts in ([150], [1, 149], [64, 64, 22], [37, 90, 23]):
        state, outs, at = torch.zeros(H, D, D), [], 0
        for c in cuts:
            o, state = model._chunked(q_scaled[at:at + c], k[at:at + c], v[at:at + c], decay[at:at + c],
                                      beta[at:at + c], state)
            outs.append(o)
            at += c
        assert torch.allclose(torch.cat(outs), ref[0], atol=1e-4), cuts
        assert torch.allclose(state, ref_state[0], atol=1e-4), cuts


def test_text_positions_make_the_multimodal_rotary_the_ordinary_one(model):
    """With text only, all three position sections are the token's position: transformers' interleaved
    multimodal rotary then equals the ordinary rotary embedding our attention applies."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding

    rotary = Qwen3_5TextRotaryEmbedding(config=model.text)
    positions = torch.tensor([0, 1, 2, 7, 100, 4095])
    cos, sin = rotary(torch.empty(0), positions[None, None].expand(3, 1, -1))
    ours_cos, ours_sin = model.rope(positions)
    assert cos.shape[-1] == model.rotary_dim == model.head_dim // 4
    assert torch.allclose(cos[0], ours_cos, atol=1e-6) and torch.allclose(sin[0], ours_sin, atol=1e-6)
    # and the sections really are interleaved: distinct positions per section would change the result
    mixed_cos, _ = rotary(torch.empty(0), torch.stack([positions, positions + 1, positions + 2])[:, None])
    assert not torch.allclose(mixed_cos[0], ours_cos)


def test_bfloat16_logits_stay_close_to_float32(path, hf):
    """The stated tolerance: our bf16 logits are no further from float32's than transformers' own bf16
    forward is (RMS error at most 1.25× its), and the top token agrees with float32's about as often as
    transformers' bf16 top token does (within 5 points). A random tiny model is far more sensitive to rounding
    than a trained one."""
    ids = list(range(700, 760))
    f32 = prompt_logits(load_model(path, Platform.cpu(torch.float32)), ids, state_slots=1)
    bf16 = prompt_logits(load_model(path, Platform.cpu(torch.bfloat16)), ids, state_slots=1)
    hf_bf16 = type(hf).from_pretrained(str(path), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        theirs = hf_bf16(torch.tensor([ids])).logits[0].float()

    def rms(x):
        return (x - f32).pow(2).mean().sqrt()

    def agree(x):
        return (x.argmax(-1) == f32.argmax(-1)).float().mean()

    assert rms(bf16) <= 1.25 * rms(theirs), (rms(bf16), rms(theirs))
    assert agree(bf16) >= agree(theirs) - 0.05, (agree(bf16), agree(theirs))


def test_int8_runs_every_projection_in_int8_and_tracks_the_float_model(path):
    """Every projection (DeltaNet in/out, attention, MLP, output layer) in int8. A random tiny hybrid model
    amplifies rounding far more than a trained one (its own bf16 forward moves the logits' cosine down to
    0.95 at worst), so the bound here is loose; make bench reports the accuracy cost at a real size."""
    from qwen_inference.engine.weights import Int8Weight

    ids = list(range(700, 764))
    f = load_model(path, Platform.cpu(torch.float32))
    a = prompt_logits(f, ids, state_slots=1)
    q = load_model(path, Platform.cpu(torch.float32, "int8"))
    for layer in q.layers:
        projections = (layer.w_in, layer.w_out) if hasattr(layer, "w_in") else (layer.w_qkv, layer.w_o)
        assert all(isinstance(w, Int8Weight) for w in (*projections, layer.mlp.w_gate_up, layer.mlp.w_down))
    assert isinstance(q.lm_head, Int8Weight) and q.weight_bytes() < 0.3 * f.weight_bytes()
    b = prompt_logits(q, ids, state_slots=1)
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).mean() > 0.9
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.4


def test_caches_are_sized_from_the_specs(model):
    from qwen_inference.engine.cache import CacheTooSmall, PagedAttentionSpec, plan_caches

    specs = model.cache_specs()
    attn = next(s for s in specs if isinstance(s, PagedAttentionSpec))
    state = next(s for s in specs if isinstance(s, RecurrentStateSpec))
    assert set(attn.layers) | set(state.layers) == set(range(model.num_layers))
    assert attn.layers == tuple(i for i, t in enumerate(model.layer_types) if t == "full_attention")
    per_seq = state.bytes_per_sequence()
    assert per_seq == len(state.layers) * 4 * (model.conv_dim * 3 + model.hv * model.dk * model.dv)
    plan = plan_caches(specs, budget=per_seq * 4 + attn.bytes_per_token() * 1000, max_concurrency=4,
                       max_model_len=512)
    assert plan.state_slots == 4 and plan.kv_tokens == 1000 and plan.state_bytes == 4 * per_seq
    assert plan.checkpoints == 0
    # checkpoints come out of the KV cache's share, as many as leave one whole sequence's KV cache
    budget = per_seq * 4 + attn.bytes_per_token() * 512 + per_seq * 2 + 100
    plan = plan_caches(specs, budget=budget, max_concurrency=4, max_model_len=512, checkpoints=8)
    assert plan.checkpoints == 2 and plan.kv_tokens == 512 and plan.state_bytes == 6 * per_seq
    plan = plan_caches(specs, budget=budget * 100, max_concurrency=4, max_model_len=512, checkpoints=8)
    assert plan.checkpoints == 8 and plan.kv_tokens == 4 * 512
    plan = plan_caches(specs, budget=budget, max_concurrency=4, max_model_len=512, kv_tokens=64, checkpoints=8)
    assert plan.checkpoints == 8 and plan.kv_tokens == 64  # sized by hand: as asked
    assert plan_caches([attn], budget=budget, max_concurrency=4, max_model_len=512, checkpoints=8).checkpoints == 0
    with pytest.raises(CacheTooSmall, match="max-concurrency"):
        plan_caches(specs, budget=per_seq * 4, max_concurrency=4, max_model_len=512)


def test_prefix_caching_is_off_without_state_checkpoints(model):
    """Blocks found in the cache are no use to a model with recurrent layers without the state at their end."""
    engine = make_engine(model, prefix_caching=True, state_checkpoints=0)
    try:
        assert engine.prefix_caching is False and engine.allocator.prefix_caching is False
        assert engine.runner.caches.states.checkpoints == 0
    finally:
        engine.stop()
    on = make_engine(model, prefix_caching=True, state_checkpoints=2)
    off = make_engine(model, prefix_caching=False, state_checkpoints=2)
    try:
        assert on.prefix_caching and on.runner.caches.states.checkpoints == 2
        assert not off.prefix_caching and off.runner.caches.states.checkpoints == 0  # no rows set aside for nothing
    finally:
        on.stop()
        off.stop()


def test_the_state_pool_keeps_checkpoints_least_recently_used_first():
    from qwen_inference.engine.cache import StatePool

    spec = RecurrentStateSpec((0, 2), (("conv", (3, 2)), ("ssm", (2, 2))), torch.float32)
    pool = StatePool(spec, 2, [torch.device("cpu")] * 3, checkpoints=2)
    assert pool.tensors[0]["ssm"].shape == (4, 2, 2) and pool.saved == 0

    def write(row, value):  # what the model does in the step that reaches the boundary
        for layer in (0, 2):
            pool[layer]["ssm"][row] = value + layer
            pool[layer]["conv"][row] = -value

    a, b = pool.acquire(), pool.acquire()
    ra = pool.claim(b"A")
    assert ra is not None and ra >= 2 and not pool.has_checkpoint(b"A")  # found only once committed
    write(ra, 1.0)
    pool.commit(b"A", ra)
    assert pool.claim(b"A") is None  # kept already: nothing to write
    rb = pool.claim(b"B")
    write(rb, 5.0)
    pool.commit(b"B", rb)
    assert pool.restore(b"A", b) and pool[2]["ssm"][b].eq(3.0).all() and pool[0]["conv"][b].eq(-1.0).all()
    rc = pool.claim(b"C")  # full: B, the least recently used, makes room ("A" was just restored)
    assert rc == rb and not pool.has_checkpoint(b"B")
    pool.abandon(rc)  # the step failed: the row holds nothing and C is not kept
    assert not pool.has_checkpoint(b"C") and pool.saved == 1
    assert not pool.restore(b"C", a) and pool[0]["ssm"][a].eq(0).all()  # a miss changes nothing
    # two prompts alike in one step: both claim (the second row is A's, the least recently used), one is kept
    r1, r2 = pool.claim(b"D"), pool.claim(b"D")
    assert r1 == rc and r2 == ra and not pool.has_checkpoint(b"A")
    write(r1, 7.0)
    write(r2, 7.0)
    pool.commit(b"D", r1)
    pool.commit(b"D", r2)
    assert pool.saved == 1 and pool.has_checkpoint(b"D")
    assert pool.claim(b"E") == r2 and pool.has_checkpoint(b"D")  # the other row went back: E evicts nothing
    assert StatePool(spec, 1, [torch.device("cpu")] * 3).claim(b"A") is None  # no checkpoint rows


async def test_a_batched_step_that_fails_in_the_model_ends_its_sequences_rather_than_run_them_twice(model, hf):
    """A step that fails once the model has run (its recurrent states moved on in place) cannot be run again
    sequence by sequence, as a step that failed before it can: every sequence in it ends with the error, the
    engine goes on, and later requests get transformers' replies."""
    engine = make_engine(model, prefill_chunk=64)
    execute = engine.runner.execute
    failed = []

    def fail_after_the_forward(chunks):
        logits = execute(chunks)
        if len(chunks) == 2 and all(len(c.tokens) == 1 for c in chunks) and not failed:  # two decode rows
            failed.append(1)
            raise RuntimeError("injected")
        return logits

    engine.runner.execute = fail_after_the_forward
    params = SamplingParams(max_tokens=6, temperature=0)
    a, b = prompts(2, base=6000)
    try:
        results = await asyncio.gather(run(engine, a, params, rid="a"), run(engine, b, params, rid="b"))
        assert failed and [fin.reason for _, fin in results] == ["error", "error"]
        assert all("injected" in fin.error for _, fin in results)
        assert engine.runner.caches.states.used == 0 and engine.allocator.used_blocks == 0
        toks, fin = await run(engine, b, params)
        assert fin.reason == "length" and toks == reference(hf, b, 6)
    finally:
        engine.stop()


async def test_checkpoints_under_load_give_the_same_replies_and_leak_nothing(model):
    """Many prompts at once from a few shared prefixes, with turns that carry on from earlier ones, through a pool of
    four checkpoints (claims and evictions side by side in one step, the same checkpoint claimed twice) and some
    requests cancelled: every reply that finishes equals the reply of an engine without prefix caching, and
    nothing is left held."""
    import random

    rng = random.Random(5)
    heads = [[248045] + list(range(7000 + 300 * i, 7000 + 300 * i + 70 + 20 * i)) for i in range(3)]
    ps = []
    for i in range(18):
        head = heads[i % 3]
        ps.append(head + [rng.randrange(1000, 9000) for _ in range(rng.randrange(5, 40))])
    ps[3] = ps[0]  # the same prompt twice in one step: one checkpoint claimed twice
    ps += [p[:-4] + list(range(9100, 9110)) for p in ps[:6]]  # the next turns of six of them
    params = SamplingParams(max_tokens=5, temperature=0)
    cached = make_engine(model, prefix_caching=True, state_checkpoints=4, max_concurrency=6, max_queue=32,
                         prefill_chunk=512)
    plain = make_engine(model, max_concurrency=6, prefill_chunk=512)
    try:
        want = [(await run(plain, p, params, rid=f"w{i}"))[0] for i, p in enumerate(ps)]

        async def one(i, p):
            h = cached.submit(f"r{i}", p, params, 60)
            toks, fin = [], None
            async for ev in h.events():
                if isinstance(ev, TokenEvent):
                    toks.append(ev.token_id)
                    if i % 7 == 3 and len(toks) == 2:
                        h.cancel()
                else:
                    fin = ev
            return toks, fin

        for batch in (range(0, 18), range(18, 24)):
            got = await asyncio.gather(*(one(i, ps[i]) for i in batch))
            for i, (toks, fin) in zip(batch, got):
                if fin.reason == "cancelled":
                    assert toks == want[i][:len(toks)]
                else:
                    assert toks == want[i], i
        stats = cached.stats()
        assert stats["prefix_cache_hit_tokens"] > 0 and stats["state_checkpoints"] == 4
        pool = cached.runner.caches.states
        assert pool.used == 0 and cached.allocator.used_blocks == 0 and cached.allocator.reserved == 0
        assert pool.saved + len(pool._spare) == pool.checkpoints  # every row either kept or spare
    finally:
        cached.stop()
        plain.stop()


async def test_a_failed_step_keeps_no_checkpoint_and_loses_no_row(model, hf):
    """The rows a failed step was to write go back unwritten: nothing is found under their names, and every row
    is there for the next prompt, which checkpoints and restores as usual."""
    engine = make_engine(model, prefix_caching=True, state_checkpoints=2, prefill_chunk=32)
    execute = engine.runner.execute

    def fail_when_saving(chunks):
        if any(c.save_state_to is not None for c in chunks):
            raise RuntimeError("injected")
        return execute(chunks)

    prompt = [248045] + list(range(2500, 2599))  # 100 tokens: a checkpoint at 80
    params = SamplingParams(max_tokens=4, temperature=0)
    try:
        engine.runner.execute = fail_when_saving
        _, fin = await run(engine, prompt, params)
        assert fin.reason == "error" and engine.stats()["state_checkpoints"] == 0
        pool = engine.runner.caches.states
        rows = [pool.claim(name) for name in (b"x", b"y")]
        assert sorted(rows) == [pool.slots, pool.slots + 1]  # both rows back
        for row in rows:
            pool.abandon(row)
        engine.runner.execute = execute
        for hit in (0, 80):
            toks, _ = await run(engine, prompt, params)
            assert toks == reference(hf, prompt, 4) and engine.stats()["prefix_cache_hit_tokens"] == hit
    finally:
        engine.stop()


async def test_state_checkpoints_let_prompts_start_past_a_cached_prefix_exactly(model, hf):
    """Greedy replies equal transformers' when a prompt starts from a restored checkpoint: a shared system
    prompt (the checkpoint made where a second prompt left the first), a repeated prompt, the next turn of a
    conversation (the prompt's end before its generation prompt); and with room for one checkpoint only, the
    deepest one still kept."""
    system = [248045] + list(range(2000, 2089))  # 90 tokens: 5 full blocks
    first = system + list(range(3000, 3030))  # 120 tokens
    second = system + list(range(3100, 3025 + 100))
    third = system + list(range(3200, 3212))
    turn = first[:-4] + list(range(3300, 3340))  # first's generation prompt (4 tokens) rendered otherwise
    params = SamplingParams(max_tokens=6, temperature=0)
    engine = make_engine(model, prefix_caching=True, state_checkpoints=4, prefill_chunk=32)
    try:
        hits = []
        for p in (first, second, third, first, turn):
            toks, fin = await run(engine, p, params)
            assert toks == reference(hf, p, 6) and fin.prompt_tokens == len(p)
            hits.append(engine.stats()["prefix_cache_hit_tokens"] - sum(hits))
        # first: nothing cached, checkpoint at 112 = (120 - 8) // 16 * 16. second: the system prompt's 5 blocks
        # are found, but no state at 80: computed again, checkpointed there. third: starts at 80. first again: its
        # 7 blocks and the checkpoint at 112. turn: the same 7 blocks
        assert hits == [0, 0, 80, 112, 112]
        assert engine.stats()["state_checkpoints"] == 4  # 112; 80 and 96 (second's end); 144 (turn's end)
        pool = engine.runner.caches.states
        assert pool.used == 0 and engine.allocator.used_blocks == 0 and engine.allocator.reserved == 0
    finally:
        engine.stop()
    small = make_engine(model, prefix_caching=True, state_checkpoints=2, prefill_chunk=32)
    try:
        for p in (first, second, first):
            toks, _ = await run(small, p, params)
            assert toks == reference(hf, p, 6)
        # second's checkpoints at 80 and 96 took both rows: first finds its 7 blocks and starts at 80
        assert small.stats()["prefix_cache_hit_tokens"] == 80 and small.stats()["state_checkpoints"] == 2
    finally:
        small.stop()


async def test_a_continuing_reply_lets_the_next_prompt_start_past_it_exactly(model, hf):
    """A tool call's turn: the next prompt repeats the prompt and the reply, then adds the tool's result. A reply
    that continues keeps its state at its last block boundary, so that prompt starts there (greedy replies equal
    transformers'); a reply that does not only leaves the prompt's checkpoint."""
    from qwen_inference.engine.engine import Request

    prompt = [248045] + list(range(4000, 4099))  # 100 tokens: the prompt's checkpoint at 80
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    engine = make_engine(model, prefix_caching=True, state_checkpoints=4, prefill_chunk=32)
    try:
        hits = []
        for continues, result in ((True, list(range(5000, 5030))), (False, list(range(5100, 5130)))):
            before = engine.stats()["prefix_cache_hit_tokens"]
            h = engine.submit("turn", prompt, params, 60, Request(continues=continues))
            reply = [ev.token_id async for ev in h.events() if isinstance(ev, TokenEvent)]
            assert reply == reference(hf, prompt, 40)
            nxt = prompt + reply + result
            toks, _ = await run(engine, nxt, SamplingParams(max_tokens=6, temperature=0))
            assert toks == reference(hf, nxt, 6)
            hits.append(engine.stats()["prefix_cache_hit_tokens"] - before)
            prompt = [248045] + list(range(4200, 4299))  # the second round on another prompt
        # the reply's 39 computed tokens reach 139: its state kept at 128; without, the prompt's at 80
        assert hits == [128, 80]
        pool = engine.runner.caches.states
        assert pool.used == 0 and engine._reply_rows == 0 and pool.saved + len(pool._spare) == pool.checkpoints
    finally:
        engine.stop()


async def test_continuing_replies_hold_at_most_half_the_rows_and_give_them_back(model, hf):
    """Five continuing replies at once through four checkpoint rows: two hold a row while they decode (the others
    go without); one that fails gives its row back unnamed, the others' are named when they end; no row is lost."""
    from qwen_inference.engine.engine import Request

    engine = make_engine(model, prefix_caching=True, state_checkpoints=4, prefill_chunk=64, max_concurrency=5)
    held = []
    keep = engine._keep_reply_state

    def watch(seq):
        keep(seq)
        held.append(engine._reply_rows)

    engine._keep_reply_state = watch

    def fail_late(seqs):
        if any(s.handle.request_id == "bad" and len(s.output_ids) == 30 for s in seqs):
            raise RuntimeError("injected")

    engine.fault_hook = fail_late
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    ps = [[248045] + list(range(6000 + 200 * i, 6000 + 200 * i + 70)) for i in range(5)]
    try:
        handles = [engine.submit("bad" if i == 0 else f"ok{i}", p, params, 60, Request(continues=True))
                   for i, p in enumerate(ps)]
        fins = []
        for h in handles:
            async for ev in h.events():
                if not isinstance(ev, TokenEvent):
                    fins.append(ev.reason)
        assert fins[0] == "error" and fins[1:] == ["length"] * 4
        assert held and max(held) == 2
        pool = engine.runner.caches.states
        assert engine._reply_rows == 0 and pool.used == 0
        assert pool.saved + len(pool._spare) == pool.checkpoints
    finally:
        engine.stop()

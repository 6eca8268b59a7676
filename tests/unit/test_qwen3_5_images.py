"""Qwen3.5 with images, end to end in the engine, against transformers' `Qwen3_5ForConditionalGeneration`:
greedy replies equal in float32, alone and batched, with several images, prompts cut into chunks inside an
image, and the prefix cache telling two images apart."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
import torch

from qwen_inference.engine import SamplingParams
from qwen_inference.engine.engine import Request, TokenEvent
from qwen_inference.engine.media import placeholder_runs, rope_positions
from qwen_inference.engine.models import load_model
from qwen_inference.engine.platform import Platform
from qwen_inference.engine.runner import ModelRunner
from qwen_inference.images import ImageProcessor
from qwen_inference.multimodal import BadImage, ImageInput

from ..conftest import make_model
from .test_engine import make_engine

VISION_START, IMAGE, VISION_END = 248053, 248056, 248054


@pytest.fixture(scope="module")
def path():
    return make_model("tiny-qwen3.5", "float32")


@pytest.fixture(scope="module")
def model(path):
    return load_model(path, Platform.cpu(torch.float32))


@pytest.fixture(scope="module")
def hf(path):
    from transformers import Qwen3_5ForConditionalGeneration

    m = Qwen3_5ForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
    m.generation_config.suppress_tokens = None
    return m


@pytest.fixture(scope="module")
def images(path, model):
    return ImageInput(ImageProcessor.from_folder(path), model.image_token_id, max_images=4, max_bytes=2**20)


def picture(width: int, height: int, seed: int) -> str:
    """A data URL of a PNG of random colours."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def prompt_with(images_in: int, base: int = 1000) -> list[int]:
    """Text, then each image between its vision markers, then more text."""
    ids = [248045] + list(range(base, base + 7))
    for i in range(images_in):
        ids += [VISION_START, IMAGE, VISION_END] + list(range(base + 20 + 5 * i, base + 23 + 5 * i))
    return ids + list(range(base + 50, base + 55))


def reference(hf, ids, media, n):
    kw = {}
    if media is not None:
        kw = dict(pixel_values=torch.cat(media.pixel_values), image_grid_thw=torch.tensor(media.grids),
                  mm_token_type_ids=(torch.tensor([ids]) == IMAGE).int())
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, **kw)
    return out[0, len(ids):].tolist()


async def _run(engine, ids, media, n, rid):
    h = engine.submit(rid, ids, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), 60.0,
                      Request(media=media))
    toks = [ev.token_id async for ev in h.events() if isinstance(ev, TokenEvent)]
    return toks, h


def run_all(engine, jobs, n=8):
    async def go():
        return await asyncio.gather(*(_run(engine, ids, media, n, f"r{i}") for i, (ids, media) in enumerate(jobs)))
    return asyncio.run(go())


def test_placeholders_widen_to_the_images_tokens_and_positions_follow_transformers(hf, images):
    ids, media = images.prepare(prompt_with(2), [("a", picture(64, 64, 1)), ("b", picture(128, 96, 2))])
    assert [n for _, n in media.spans] == [t * h * w // 4 for t, h, w in media.grids]
    assert len(ids) == len(prompt_with(2)) - 2 + sum(n for _, n in media.spans)
    ref, delta = hf.model.get_rope_index(torch.tensor([ids]), (torch.tensor([ids]) == IMAGE).int(),
                                         image_grid_thw=torch.tensor(media.grids))
    assert torch.equal(media.positions, ref[:, 0])
    assert media.delta == int(delta)
    assert media.delta < 0  # an image takes fewer positions than tokens


def test_replies_with_images_equal_transformers_alone_and_batched(model, hf, images):
    jobs = [images.prepare(prompt_with(1), [("a", picture(64, 64, 1))]),
            images.prepare(prompt_with(2, 1200), [("a", picture(96, 128, 2)), ("b", picture(64, 96, 3))]),
            (prompt_with(0, 1400), None)]
    expected = [reference(hf, ids, media, 8) for ids, media in jobs]
    engine = make_engine(model, prefill_chunk=512)
    try:
        alone = [run_all(engine, [job])[0][0] for job in jobs]
        together = [toks for toks, _ in run_all(engine, jobs)]
    finally:
        engine.stop()
    assert alone == expected
    assert together == expected


def test_a_prompt_cut_into_chunks_inside_an_image(model, hf, images):
    ids, media = images.prepare(prompt_with(1), [("a", picture(128, 128, 4))])
    start, n = media.spans[0]
    assert n > 8
    engine = make_engine(model, prefill_chunk=5)
    try:
        (toks, _), = run_all(engine, [(ids, media)])
    finally:
        engine.stop()
    assert toks == reference(hf, ids, media, 8)


def test_the_prefix_cache_tells_two_images_apart(path, hf, images):
    model = load_model(path, Platform.cpu(torch.float32))
    first = images.prepare(prompt_with(1) + list(range(2000, 2100)), [("a", picture(128, 128, 5))])
    other = images.prepare(prompt_with(1) + list(range(2000, 2100)), [("a", picture(128, 128, 6))])
    assert first[0] == other[0]  # the same ids: only the pixels differ
    engine = make_engine(model, prefix_caching=True, state_checkpoints=8, prefill_chunk=64)
    try:
        (a, _), = run_all(engine, [first])
        (again, h_again), = run_all(engine, [first])
        (b, h_other), = run_all(engine, [other])
    finally:
        engine.stop()
    assert a == again == reference(hf, *first, 8)
    assert b == reference(hf, *other, 8) and b != a
    image_start = first[1].spans[0][0]
    assert h_again.cached_tokens > image_start + first[1].spans[0][1]  # past the image
    assert h_other.cached_tokens <= image_start  # at most the text before it


def test_positions_of_text_alone_are_its_indices():
    positions, delta = rope_positions(10, [], [], 2)
    assert torch.equal(positions, torch.arange(10).expand(3, -1)) and delta == 0
    assert placeholder_runs([1, 7, 7, 2, 7], 7) == [(1, 2), (4, 1)]


def test_bad_images_are_refused_naming_the_field(images):
    with pytest.raises(BadImage, match="at most 4 images") as e:
        images.prepare(prompt_with(5), [(f"m.{i}", picture(64, 64, i)) for i in range(5)])
    assert e.value.param == "m.4"
    with pytest.raises(BadImage, match="2 image placeholders for 1 images"):
        images.prepare(prompt_with(2), [("a", picture(64, 64, 1))])
    with pytest.raises(BadImage) as e:
        images.prepare(prompt_with(1), [("messages.1.content.0.image_url.url", "https://example.com/cat.png")])
    assert e.value.param == "messages.1.content.0.image_url.url"


def test_a_model_without_images_refuses_image_rows(path):
    text_model = load_model(path, Platform.cpu(torch.float32), images=False)
    assert text_model.image_token_id is None and text_model.visual is None
    runner = ModelRunner(text_model, kv_tokens=256, state_slots=1)
    from qwen_inference.engine.runner import SeqChunk

    chunk = SeqChunk([1, 2], 0, [1], 0, logits=True, prompt=True, embeds=[(0, torch.zeros(1, 64))])
    with pytest.raises(ValueError, match="takes no images"):
        runner.execute([chunk])


def test_an_image_is_encoded_a_block_a_step_while_other_sequences_decode(path, hf, images):
    """The vision tower runs one block per engine step: a text request decoding beside it gets a token in each
    of those steps, and the image request's reply is still transformers'."""
    model = load_model(path, Platform.cpu(torch.float32))
    engine = make_engine(model, prefill_chunk=512)
    resumed: list[tuple[int, int]] = []  # (engine step, tokens the text request has) at each resumption
    text_tokens: list[int] = []
    encode = model.encode_image_steps

    def spying(pixel_values, grid):
        steps = encode(pixel_values, grid)
        while True:
            text = [s for s in engine._running if s.handle.request_id == "text"]
            resumed.append((engine.steps, len(text[0].output_ids) if text else -1))
            try:
                next(steps)
            except StopIteration as done:
                return done.value
            yield

    model.encode_image_steps = spying
    ids, media = images.prepare(prompt_with(1), [("a", picture(128, 96, 10))])

    async def go():
        text = engine.submit("text", prompt_with(0, 1500), SamplingParams(temperature=0.0, max_tokens=40,
                                                                          ignore_eos=True), 60.0)

        async def collect():
            async for ev in text.events():
                if isinstance(ev, TokenEvent):
                    text_tokens.append(ev.token_id)
                    if len(text_tokens) == 3:
                        started.set()
        started = asyncio.Event()
        task = asyncio.create_task(collect())
        await started.wait()
        reply, _ = await _run(engine, ids, media, 8, "image")
        await task
        return reply
    try:
        reply = asyncio.run(go())
    finally:
        engine.stop()
    assert reply == reference(hf, ids, media, 8)
    depth = len(model.visual.blocks)
    assert len(resumed) == depth + 1  # a resumption a block, and the last one returns the rows
    steps = [s for s, _ in resumed]
    assert steps == sorted(set(steps))  # one block a step, never two
    assert all(b[1] > a[1] for a, b in zip(resumed, resumed[1:]))  # the text request decoded in between


def test_an_image_that_fails_to_encode_fails_its_request_alone(path, images):
    model = load_model(path, Platform.cpu(torch.float32))

    def broken(pixel_values, grid):
        yield
        raise RuntimeError("out of memory")

    model.encode_image_steps = broken
    engine = make_engine(model, prefill_chunk=512)
    ids, media = images.prepare(prompt_with(1), [("a", picture(64, 64, 1))])
    try:
        (toks, h), = run_all(engine, [(ids, media)])
        finish = asyncio.run(_finish_of(engine, ids, media))
        (text, _), = run_all(engine, [(prompt_with(0), None)])
        alive = engine.alive
    finally:
        engine.stop()
    assert toks == [] and finish.reason == "error" and "encoding an image failed: out of memory" in finish.error
    assert len(text) == 8 and alive  # the engine goes on


async def _finish_of(engine, ids, media):
    h = engine.submit("again", ids, SamplingParams(temperature=0.0, max_tokens=4), 60.0, Request(media=media))
    return [ev async for ev in h.events()][-1]

"""Qwen3.5's vision tower against transformers' `Qwen3_5VisionModel`, the image processor against transformers' own,
and the decoding of the images clients send."""

from __future__ import annotations

import base64
import copy
import io
import json
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from qwen_inference.engine.models.qwen3_5_vision import VisionEncoder
from qwen_inference.engine.weights import Checkpoint, UnsupportedModel
from qwen_inference.images import (
    MAX_IMAGE_PIXELS,
    QWEN3_5_PREPROCESSOR,
    ImageProcessor,
    decode_base64,
    decode_data_url,
)
from qwen_inference.random_model import PRESETS

PREFIX = "model.visual."
PATCH_DIM = 3 * 2 * 16 * 16


# ---- the vision tower ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vision_config(tiny_qwen35_model):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(tiny_qwen35_model).vision_config


@pytest.fixture(scope="module")
def perturbed_folder(tiny_qwen35_model, tmp_path_factory) -> Path:
    """The tiny model's vision weights with random biases and norm weights (the random model's are 0 and 1)."""
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(1)
    tensors = {k: v for k, v in load_file(tiny_qwen35_model / "model.safetensors").items() if k.startswith(PREFIX)}
    for name, t in tensors.items():
        if name.endswith(".bias"):
            tensors[name] = torch.randn(t.shape, generator=gen) * 0.5
        elif "norm" in name:
            tensors[name] = 1.0 + torch.randn(t.shape, generator=gen) * 0.5
    out = tmp_path_factory.mktemp("perturbed-vision")
    save_file(tensors, str(out / "model.safetensors"))
    return out


@pytest.fixture(scope="module", params=["stored", "perturbed"])
def towers(request, tiny_qwen35_model, perturbed_folder, vision_config):
    """(ours, transformers') on the same weights, float32."""
    from safetensors.torch import load_file
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel

    folder = tiny_qwen35_model if request.param == "stored" else perturbed_folder
    ref = Qwen3_5VisionModel(vision_config).eval()
    state = {k[len(PREFIX):]: v for k, v in load_file(folder / "model.safetensors").items() if k.startswith(PREFIX)}
    ref.load_state_dict(state, strict=True)
    with Checkpoint(folder) as ckpt:
        ours = VisionEncoder(ckpt, PREFIX, vision_config, torch.float32, torch.device("cpu"))
    return ours, ref


def _compare(towers, grids: list[list[int]], seed: int = 0) -> torch.Tensor:
    ours, ref = towers
    grid_thw = torch.tensor(grids, dtype=torch.long)
    pixels = torch.randn(int(grid_thw.prod(dim=1).sum()), PATCH_DIM, generator=torch.Generator().manual_seed(seed))
    got = ours(pixels, grid_thw)
    with torch.no_grad():
        want = ref(pixels, grid_thw).pooler_output
    assert got.dtype == torch.float32
    assert got.shape == (pixels.shape[0] // 4, ours.out_hidden_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    return got


def test_one_image(towers):
    _compare(towers, [[1, 4, 4]])


def test_two_images_of_different_sizes(towers):
    both = _compare(towers, [[1, 4, 4], [1, 6, 8]])
    # each image attends only within itself: the first image's tokens are those it gets alone
    ours, _ = towers
    pixels = torch.randn(16 + 48, PATCH_DIM, generator=torch.Generator().manual_seed(0))
    alone = ours(pixels[:16], torch.tensor([[1, 4, 4]]))
    torch.testing.assert_close(both[:4], alone, rtol=1e-5, atol=1e-5)


def test_non_square_image(towers):
    _compare(towers, [[1, 4, 10]])
    _compare(towers, [[1, 14, 2]], seed=1)


def test_grid_larger_than_the_position_table_and_two_frames(towers):
    # the tiny tower's position table is 8x8: a 12x16 grid interpolates between its rows; t=2 is two segments
    _compare(towers, [[1, 12, 16], [2, 4, 6]])


def test_processed_images(towers, tiny_qwen35_model):
    ours, ref = towers
    processor = ImageProcessor.from_folder(tiny_qwen35_model)
    images = [_gradient(64, 64), _gradient(128, 96)]
    pixels, grid_thw = processor(images)
    got = ours(pixels, grid_thw)
    with torch.no_grad():
        want = ref(pixels, grid_thw).pooler_output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.shape[0] == sum(processor.tokens(row) for row in grid_thw)


def test_bfloat16_close_to_transformers(tiny_qwen35_model, perturbed_folder, vision_config):
    from safetensors.torch import load_file
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel

    ref = Qwen3_5VisionModel(vision_config).eval()
    state = {k[len(PREFIX):]: v for k, v in load_file(perturbed_folder / "model.safetensors").items()}
    ref.load_state_dict(state, strict=True)
    ref = ref.to(torch.bfloat16)
    with Checkpoint(perturbed_folder) as ckpt:
        ours = VisionEncoder(ckpt, PREFIX, vision_config, torch.bfloat16, torch.device("cpu"))
    grid_thw = torch.tensor([[1, 4, 4], [1, 6, 8]])
    pixels = torch.randn(64, PATCH_DIM, generator=torch.Generator().manual_seed(2))
    got = ours(pixels, grid_thw)
    with torch.no_grad():
        want = ref(pixels, grid_thw).pooler_output
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_tensors_are_every_vision_weight(tiny_qwen35_model, towers):
    ours, _ = towers
    with Checkpoint(tiny_qwen35_model) as ckpt:
        names = [n for n in ckpt.where if n.startswith(PREFIX)]
        stored = sum(ckpt.get(n, torch.float32, torch.device("cpu")).numel() for n in names)
    assert len(ours.tensors()) == len(names)
    assert sum(t.numel() for t in ours.tensors()) == stored
    assert ours.spatial_merge_size == 2 and ours.out_hidden_size == PRESETS["tiny-qwen3.5"].vision.out_hidden_size


def test_wrong_pixel_values_are_refused(towers):
    ours, _ = towers
    with pytest.raises(ValueError, match="do not match grid_thw"):
        ours(torch.zeros(15, PATCH_DIM), torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match="multiples of the merge size"):
        ours(torch.zeros(15, PATCH_DIM), torch.tensor([[1, 3, 5]]))


@pytest.mark.parametrize("field, value, message", [
    ("deepstack_visual_indexes", [1], "deepstack"),
    ("hidden_act", "quick_gelu", "hidden_act"),
])
def test_unsupported_configs_are_refused(tiny_qwen35_model, vision_config, field, value, message):
    config = copy.deepcopy(vision_config)
    setattr(config, field, value)
    with Checkpoint(tiny_qwen35_model) as ckpt, pytest.raises(UnsupportedModel, match=message):
        VisionEncoder(ckpt, PREFIX, config, torch.float32, torch.device("cpu"))


# ---- the image processor ------------------------------------------------------------------------------------

def _gradient(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """A deterministic picture with detail in every channel, so resizing and normalising show."""
    gen = torch.Generator().manual_seed(width * 1000 + height)
    pixels = torch.randint(0, 256, (height, width, len(mode)), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), mode)


def test_random_model_writes_the_preprocessor_config(tiny_qwen35_model, tiny_qwen35_text_model):
    config = json.loads((tiny_qwen35_model / "preprocessor_config.json").read_text())
    vision = PRESETS["tiny-qwen3.5"].vision
    assert (config["patch_size"], config["temporal_patch_size"], config["merge_size"]) == (16, 2, 2)
    assert config["size"] == {"shortest_edge": vision.min_pixels, "longest_edge": vision.max_pixels}
    assert not (tiny_qwen35_text_model / "preprocessor_config.json").exists()


def test_processor_matches_transformers(tiny_qwen35_model):
    from transformers import AutoImageProcessor

    ours = ImageProcessor.from_folder(tiny_qwen35_model)
    theirs = AutoImageProcessor.from_pretrained(str(tiny_qwen35_model))
    images = [_gradient(64, 64), _gradient(128, 96), _gradient(200, 50), _gradient(300, 300), _gradient(17, 23)]
    for imgs in [[im] for im in images] + [images]:
        pixels, grid_thw = ours(imgs)
        want = theirs(images=imgs, return_tensors="pt")
        assert pixels.dtype == torch.float32 and grid_thw.dtype == torch.long
        assert torch.equal(pixels, want["pixel_values"])
        assert torch.equal(grid_thw, want["image_grid_thw"])
    assert ours([images[0]])[1].tolist() == [[1, 4, 4]]
    assert ours([images[1]])[1].tolist() == [[1, 6, 8]]
    assert ours.tokens(torch.tensor([1, 4, 4])) == 4
    assert ours.tokens([1, 6, 8]) == 12


def test_processor_defaults_are_qwen3_5s(tmp_path):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ours = ImageProcessor.from_folder(tmp_path)
    assert ours.config == QWEN3_5_PREPROCESSOR
    theirs = Qwen2VLImageProcessorPil(**QWEN3_5_PREPROCESSOR)
    image = _gradient(64, 48)
    pixels, grid_thw = ours([image])
    want = theirs(images=[image], return_tensors="pt")
    assert torch.equal(pixels, want["pixel_values"]) and torch.equal(grid_thw, want["image_grid_thw"])
    assert int(grid_thw.prod()) * 16 * 16 >= 65536  # small images are scaled up to the minimum


# ---- decoding -----------------------------------------------------------------------------------------------

def _encoded(image: Image.Image, fmt: str, **kw) -> str:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return base64.b64encode(buf.getvalue()).decode()


def _huge_png_header(width: int, height: int) -> str:
    """A PNG that says it is width x height (its pixel data absent): opening it reads only the header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    return base64.b64encode(raw).decode()


def _via_url(data: str, media_type: str, max_bytes: int) -> Image.Image:
    return decode_data_url(f"data:{media_type};base64,{data}", max_bytes)


DECODERS = pytest.mark.parametrize("decode", [_via_url, decode_base64], ids=["data_url", "base64"])
PNG = _encoded(_gradient(8, 8), "PNG")


def test_not_a_data_url():
    with pytest.raises(ValueError, match="must be a data URL"):
        decode_data_url("https://example.com/cat.png", 1 << 20)
    with pytest.raises(ValueError, match="malformed data URL"):
        decode_data_url("data:image/png;base64" + PNG, 1 << 20)


def test_data_url_not_base64():
    with pytest.raises(ValueError, match="must be base64-encoded"):
        decode_data_url("data:image/png," + PNG, 1 << 20)


@DECODERS
def test_unsupported_media_type(decode):
    with pytest.raises(ValueError, match="unsupported image type 'image/bmp'"):
        decode(PNG, "image/bmp", 1 << 20)


@DECODERS
def test_bad_base64(decode):
    with pytest.raises(ValueError, match="not valid base64"):
        decode("iVBORw0KGgo!!!" + PNG, "image/png", 1 << 20)


@DECODERS
def test_too_many_bytes(decode):
    size = len(base64.b64decode(PNG))
    with pytest.raises(ValueError, match=f"the image is {size} bytes; at most {size - 1} are accepted"):
        decode(PNG, "image/png", size - 1)
    assert decode(PNG, "image/png", size).size == (8, 8)
    with pytest.raises(ValueError, match="at most 1000 are accepted"):  # refused before decoding
        decode("A" * 100_000, "image/png", 1000)


@DECODERS
def test_not_an_image(decode):
    with pytest.raises(ValueError, match="not a PNG, JPEG, WebP or GIF image"):
        decode(base64.b64encode(b"GIF89a but not really an image").decode(), "image/gif", 1 << 20)
    truncated = base64.b64encode(base64.b64decode(PNG)[:60]).decode()
    with pytest.raises(ValueError, match="not a PNG, JPEG, WebP or GIF image"):
        decode(truncated, "image/png", 1 << 20)
    with pytest.raises(ValueError, match="empty"):
        decode("", "image/png", 1 << 20)


@DECODERS
def test_decompression_bomb(decode):
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1
    with pytest.raises(ValueError, match="megapixels"):
        decode(_huge_png_header(side, side), "image/png", 1 << 20)
    with pytest.raises(ValueError, match="megapixels"):  # past Pillow's own limit too
        decode(_huge_png_header(20000, 20000), "image/png", 1 << 20)


@DECODERS
def test_png_with_alpha_is_composited_on_white(decode):
    image = Image.new("RGBA", (3, 1))
    image.putpixel((0, 0), (0, 0, 0, 0))
    image.putpixel((1, 0), (255, 0, 0, 255))
    image.putpixel((2, 0), (0, 0, 0, 128))
    out = decode(_encoded(image, "PNG"), "image/png", 1 << 20)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (255, 0, 0)
    assert all(126 <= c <= 128 for c in out.getpixel((2, 0)))
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 0, 0, 255])
    palette.putpixel((1, 0), 1)
    gif = decode(_encoded(palette, "GIF", transparency=0), "image/gif", 1 << 20)
    assert gif.mode == "RGB" and gif.getpixel((0, 0)) == (255, 255, 255) and gif.getpixel((1, 0)) == (0, 0, 255)


@DECODERS
def test_jpeg_and_webp(decode):
    image = Image.new("RGB", (40, 30), (10, 200, 30))
    out = decode(_encoded(image, "JPEG", quality=95), "image/jpeg", 1 << 20)
    assert out.mode == "RGB" and out.size == (40, 30)
    assert all(abs(a - b) <= 4 for a, b in zip(out.getpixel((20, 15)), (10, 200, 30)))
    grey = decode(_encoded(image.convert("L"), "JPEG"), "image/jpeg", 1 << 20)
    assert grey.mode == "RGB" and grey.size == (40, 30)
    webp = decode(_encoded(image, "WEBP", lossless=True), "image/webp", 1 << 20)
    assert webp.mode == "RGB" and webp.getpixel((0, 0)) == (10, 200, 30)

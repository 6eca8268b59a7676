"""Images for the multimodal models: decoding what clients send (data URLs, base64 sources) and the image
processor that turns pictures into the vision tower's patches.

The processor is transformers' own PIL one for the Qwen2-VL family (`Qwen2VLImageProcessorPil`, which Qwen3-VL and
Qwen3.5 use), configured from the model folder's `preprocessor_config.json`, so patches and grids are the reference
ones. Importing it pulls in most of transformers (about 1.5 s), so that happens on first use (or at `load()`).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import PIL.Image
    import torch

# Qwen3.5's published preprocessor_config.json (every size of it): used when a model folder has none
QWEN3_5_PREPROCESSOR: dict[str, Any] = {
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "merge_size": 2,
    "patch_size": 16,
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "temporal_patch_size": 2,
}

MEDIA_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP", "image/gif": "GIF"}
MAX_IMAGE_PIXELS = 50_000_000  # larger images are refused before decoding (decompression bombs)

_DATA_URL = re.compile(r"data:(?P<header>[^,]*),(?P<data>.*)", re.DOTALL)
_WHITESPACE = re.compile(r"\s+")


class ImageProcessor:
    """The model's image processor: PIL images -> (pixel_values, image_grid_thw) as transformers gives them."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = dict(config)
        self.patch_size = int(self.config.get("patch_size", 16))
        self.merge_size = int(self.config.get("merge_size", 2))
        self.temporal_patch_size = int(self.config.get("temporal_patch_size", 2))
        self._processor: Any = None
        self._lock = threading.Lock()

    @classmethod
    def from_folder(cls, folder: Path) -> "ImageProcessor":
        """The processor of a model folder (its preprocessor_config.json, else Qwen3.5's published one)."""
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            return cls(QWEN3_5_PREPROCESSOR)
        config = json.loads(path.read_text())
        if not isinstance(config, dict):
            raise ValueError(f"{path} does not hold a JSON object")
        return cls(config)

    def load(self) -> None:
        """Import and build transformers' processor now rather than at the first image."""
        with self._lock:
            if self._processor is None:
                from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

                self._processor = Qwen2VLImageProcessorPil.from_dict(self.config)

    def __call__(self, images: list[PIL.Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values `[patches, channels * temporal_patch * patch * patch]` float32 and image_grid_thw
        `[images, 3]` int64, the images' patches one after another."""
        if not images:
            raise ValueError("no images")
        self.load()
        out = self._processor(images=list(images), return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def tokens(self, grid_thw_row: Any) -> int:
        """Placeholder tokens an image of this grid (t, h, w) takes in the prompt."""
        t, h, w = (int(x) for x in grid_thw_row)
        return t * h * w // self.merge_size ** 2


def decode_data_url(url: str, max_bytes: int) -> PIL.Image.Image:
    """An image sent as `data:image/<png|jpeg|webp|gif>;base64,<data>`, as RGB. Raises ValueError with a message
    for the client when it is anything else, too large, or not a decodable image."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise ValueError("an image URL must be a data URL (data:image/png;base64,...); other URLs are not fetched")
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise ValueError("malformed data URL: expected data:image/<type>;base64,<data>")
    params = [p.strip() for p in match["header"].split(";")]
    if "base64" not in (p.lower() for p in params[1:]):
        raise ValueError("the image's data URL must be base64-encoded (data:image/<type>;base64,<data>)")
    return decode_base64(match["data"], params[0], max_bytes)


def decode_base64(data: str, media_type: str, max_bytes: int) -> PIL.Image.Image:
    """An image sent as base64 data of `media_type` (image/png, image/jpeg, image/webp or image/gif), as RGB.
    Raises ValueError with a message for the client when it is anything else, too large, or not decodable."""
    if not isinstance(media_type, str) or media_type.strip().lower() not in MEDIA_TYPES:
        raise ValueError(f"unsupported image type {media_type!r}: send image/png, image/jpeg, image/webp or "
                         f"image/gif")
    if not isinstance(data, str):
        raise ValueError("image data must be a base64 string")
    data = _WHITESPACE.sub("", data)
    estimate = len(data) // 4 * 3 - data[-2:].count("=")
    if estimate > max_bytes:
        raise ValueError(f"the image is {estimate} bytes; at most {max_bytes} are accepted")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the image data is not valid base64") from None
    if len(raw) > max_bytes:
        raise ValueError(f"the image is {len(raw)} bytes; at most {max_bytes} are accepted")
    if not raw:
        raise ValueError("the image data is empty")
    return _open(raw)


def _open(raw: bytes) -> PIL.Image.Image:
    """Decode image bytes (PNG, JPEG, WebP or GIF; a GIF's first frame), refusing decompression bombs."""
    import warnings

    from PIL import Image, ImageOps

    bomb = f"the image has more than {MAX_IMAGE_PIXELS // 1_000_000} megapixels; larger ones are not accepted"
    undecodable = "the data is not a PNG, JPEG, WebP or GIF image that can be decoded"
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(raw), formats=sorted(set(MEDIA_TYPES.values())))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ValueError(bomb) from None
        except Exception:  # Pillow's decoders raise many kinds of exception on bad data
            raise ValueError(undecodable) from None
        width, height = img.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ValueError(f"the image is {width}x{height} pixels, more than {MAX_IMAGE_PIXELS // 1_000_000} "
                             f"megapixels; larger ones are not accepted")
        if width < 1 or height < 1:
            raise ValueError("the image has no pixels")
        try:
            img.load()
            return _to_rgb(ImageOps.exif_transpose(img))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ValueError(bomb) from None
        except Exception:
            raise ValueError(undecodable) from None


def _to_rgb(img: PIL.Image.Image) -> PIL.Image.Image:
    """RGB; an image with transparency is composited on white."""
    from PIL import Image

    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")

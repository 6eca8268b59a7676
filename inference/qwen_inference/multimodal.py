"""Images in a chat request, from what the client sent to what the engine takes: each image decoded and
preprocessed as the model's image processor does, the one placeholder token the chat template writes for it
widened to as many tokens as the image takes, and the rotary positions of the whole prompt (`engine.media`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class BadImage(ValueError):
    """An image a request cannot have, with the request field at fault."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class ImageInput:
    processor: Any  # images.ImageProcessor
    token_id: int  # the placeholder the chat template writes once per image (<|image_pad|>)
    max_images: int
    max_bytes: int

    def describe(self) -> str:
        p = self.processor
        size = p.config.get("size") or {}
        return (f"{p.patch_size}-pixel patches merged {p.merge_size}x{p.merge_size}, "
                f"{size.get('shortest_edge')} to {size.get('longest_edge')} pixels an image")

    def prepare(self, prompt_ids: list[int], urls: list[tuple[str, str]]) -> tuple[list[int], Any]:
        """The prompt's ids with each image's placeholder widened, and the engine's `Media`; `urls` (request field,
        data URL) in the order the images come in the messages."""
        import torch

        from .engine.media import build
        from .images import decode_data_url

        if len(urls) > self.max_images:
            raise BadImage(urls[self.max_images][0], f"a request may hold at most {self.max_images} images "
                                                     "(--max-images)")
        found = [i for i, t in enumerate(prompt_ids) if t == self.token_id]
        if len(found) != len(urls):
            raise BadImage("messages", f"the rendered prompt has {len(found)} image placeholders for {len(urls)} "
                                       "images (an image token written in text?)")
        patches: list[torch.Tensor] = []
        grids: list[tuple[int, int, int]] = []
        for param, url in urls:
            try:
                pixel_values, grid_thw = self.processor([decode_data_url(url, self.max_bytes)])
            except ValueError as exc:  # not an image, too large, or a shape the processor refuses
                raise BadImage(param, str(exc)) from None
            patches.append(pixel_values)
            grids.append(tuple(int(x) for x in grid_thw[0].tolist()))
        merge = self.processor.merge_size
        out: list[int] = []
        at = 0
        for i, (t, h, w) in zip(found, grids):
            out += prompt_ids[at:i] + [self.token_id] * (t * h * w // merge**2)
            at = i + 1
        out += prompt_ids[at:]
        return out, build(out, self.token_id, patches, grids, merge)

"""The interface every model family implements, and the batch it is handed each step.

A family module owns its checkpoint layout, its weights, its caches (declared as specs, allocated by the
runner) and its forward over a mixed batch: single decode tokens of running sequences first, then prompt
chunks. The runner turns the scheduler's block tables and state slots into a `ForwardBatch`; the family never
sees a sequence, a block table or the scheduler.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..attention import AttentionMetadata
from ..cache import CacheSpec, Caches
from ..platform import KERNEL_ROWS, Platform
from ..weights import Checkpoint, tensor_bytes


@dataclass
class ForwardBatch:
    """One step's work. Rows `[0, num_decode)` are single tokens of running sequences; then each prompt
    chunk's tokens, contiguous, as listed in `segments` (first row, length)."""

    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    num_decode: int
    segments: list[tuple[int, int]]
    logit_rows: torch.Tensor  # [R] rows whose next-token logits are wanted
    attention: AttentionMetadata | None = None  # when the model has attention layers
    state_slots: torch.Tensor | None = None  # [num_decode + len(segments)] when it has recurrent layers
    # segment j -> row: after segment j, copy its sequence's recurrent state to that row of the pool (a checkpoint).
    # A sequence may have two segments in one step, in order: the second starts from the state the first left.
    state_saves: dict[int, int] = field(default_factory=dict)
    # images: rotary positions per section (time, height, width) `[3, T]` when a row has its own, and rows whose
    # input embeddings are an image's encoding in place of the placeholder token's: (first row, `[n, hidden]`)
    mrope: torch.Tensor | None = None
    embeds: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    _on: dict = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    def on(self, device: torch.device) -> "DeviceBatch":
        """This batch's index tensors on `device` (moved once per step and device)."""
        if device not in self._on:
            self._on[device] = DeviceBatch(
                positions=self.positions.to(device),
                attention=self.attention.to(device) if self.attention is not None else None,
                state_slots=self.state_slots.to(device) if self.state_slots is not None else None,
                mrope=self.mrope.to(device) if self.mrope is not None else None,
            )
        return self._on[device]


@dataclass
class DeviceBatch:
    positions: torch.Tensor
    attention: AttentionMetadata | None
    state_slots: torch.Tensor | None
    mrope: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # per-family values computed once per step and device


class CausalLM(ABC):
    """A decoder-only language model family. Subclasses list the `model_type`s they load."""

    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, folder: Path, config: Any, platform: Platform) -> None:
        self.folder = Path(folder)
        self.config = config
        self.platform = platform
        # the operators every family's layers call, as this platform runs them
        self.linear = platform.linear_fn()
        self.logits = platform.logits_fn()
        self.fused = platform.fused_small_ops()

    def _silu_mul(self, gu: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) * up over `gu` = [gate | up]: one fused operator for decode rows where the kernels run."""
        if self.fused and gu.shape[0] in KERNEL_ROWS and gu.dtype in (torch.bfloat16, torch.float32):
            return torch.ops.qwen.silu_mul(gu.contiguous())
        inter = gu.shape[-1] // 2
        return F.silu(gu[:, :inter]) * gu[:, inter:]

    # facts the engine and the loader need
    num_layers: int
    vocab_size: int
    max_position_embeddings: int
    layer_devices: list[torch.device]

    @property
    def dtype(self) -> torch.dtype:
        return self.platform.dtype

    @property
    def output_device(self) -> torch.device:
        return self.layer_devices[-1]

    def _load_output_layer(self, ckpt: "Checkpoint", tied: bool, dtype: torch.dtype) -> None:
        """`lm_head` from the checkpoint, or the embedding table (`self.embed`, loaded) when the two are tied or the
        checkpoint has none; quantized as the platform stores output layers, in which case a tied embedding table
        becomes the lm_head's int8 rows."""
        from ..weights import Int8Weight, release_memory

        first, last = self.platform.first_device, self.output_device
        if tied or not ckpt.has("lm_head.weight"):
            tied = True
            self.lm_head = self.embed if last == first else self.embed.to(last)
        else:
            self.lm_head = ckpt.get("lm_head.weight", dtype, last)
        release_memory()
        if self.platform.quantize != "none":
            self.lm_head = self.platform.quantize_weight(self.lm_head, output=True)
            if tied and isinstance(self.lm_head, Int8Weight):
                self.embed = None
            release_memory()

    # images: the placeholder token's id and the encoder, for a family whose checkpoint has a vision tower
    image_token_id: int | None = None

    def encode_image(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """One image's patches to the rows its placeholder tokens take, `[tokens, hidden]` (families with images)."""
        raise NotImplementedError(f"{type(self).__name__} takes no images")

    def encode_image_steps(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        """`encode_image` as a generator that yields between pieces of the work and returns the rows."""
        return self.encode_image(pixel_values, grid_thw)
        yield  # noqa: unreachable: makes this a generator

    @abstractmethod
    def cache_specs(self) -> list[CacheSpec]:
        """What this model keeps between steps, for the runner to allocate and the loader to size."""

    @abstractmethod
    def forward(self, batch: ForwardBatch, caches: Caches) -> torch.Tensor:
        """Run one step; return float32 logits `[R, vocab]` for `batch.logit_rows`, on `output_device`."""

    @abstractmethod
    def tensors(self) -> list:
        """Every weight (for counting bytes)."""

    def weight_bytes(self) -> int:
        return tensor_bytes(self.tensors())

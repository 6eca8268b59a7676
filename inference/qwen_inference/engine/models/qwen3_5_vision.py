"""Qwen3.5's vision tower (transformers' `Qwen3_5VisionModel`) in plain torch, without importing a modeling module.

A ViT over 16x16 patches of two (repeated) frames:
- the patch embedding (a Conv3d whose stride is its kernel: one matmul over each flattened patch);
- learned absolute positions: a square table bilinearly resampled (corners aligned) to each image's grid;
- blocks of LayerNorm -> attention with a 2D axial rotary embedding (rows on one quarter of each head's
  frequencies, columns on the next, the whole head rotated) -> residual, LayerNorm -> MLP -> residual, attention
  bidirectional within each frame of each image;
- the merger: LayerNorm per patch, then each 2x2 block of patches concatenated -> Linear -> GELU -> Linear into
  the language model's width.

Patches arrive as the image processor orders them, each 2x2 merge block's four patches consecutive, so the merged
tokens come out in the order of the prompt's image placeholders.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..weights import Checkpoint, UnsupportedModel

LAYER_NORM_EPS = 1e-6
# the block MLP's activation (the config's hidden_act); the merger always uses the exact GELU
ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}


@dataclass
class VisionBlock:
    norm1_w: torch.Tensor
    norm1_b: torch.Tensor
    qkv_w: torch.Tensor  # [3 * hidden, hidden]: q, k, v each head after head
    qkv_b: torch.Tensor
    proj_w: torch.Tensor
    proj_b: torch.Tensor
    norm2_w: torch.Tensor
    norm2_b: torch.Tensor
    fc1_w: torch.Tensor
    fc1_b: torch.Tensor
    fc2_w: torch.Tensor
    fc2_b: torch.Tensor


def _int(config, name: str) -> int:
    value = getattr(config, name)
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise UnsupportedModel(f"vision {name} {value} is not supported (only equal sizes are)")
        value = value[0]
    return int(value)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class VisionEncoder:
    """Qwen3.5's vision tower: image patches -> merged image tokens in the language model's width."""

    def __init__(self, ckpt: Checkpoint, prefix: str, config, dtype: torch.dtype, device: torch.device) -> None:
        deepstack = getattr(config, "deepstack_visual_indexes", None)
        if deepstack:
            raise UnsupportedModel(f"vision deepstack_visual_indexes {list(deepstack)} are not supported")
        act = getattr(config, "hidden_act", "gelu_pytorch_tanh")
        if act not in ACTIVATIONS:
            raise UnsupportedModel(f"vision hidden_act {act!r} is not supported ({', '.join(ACTIVATIONS)} are)")
        rope = dict(getattr(config, "rope_parameters", None) or {})
        if rope.get("rope_type", "axial") not in ("axial", "default"):
            raise UnsupportedModel(f"vision rope_type {rope['rope_type']!r} is not supported (axial is)")
        self.approximate = ACTIVATIONS[act]
        self.dtype, self.device = dtype, torch.device(device)
        self.hidden_size = int(config.hidden_size)
        self.num_heads = int(config.num_heads)
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise UnsupportedModel("vision head size must divide the width and be a multiple of 4")
        self.head_dim = self.hidden_size // self.num_heads
        self.depth = int(config.depth)
        self.patch_size = _int(config, "patch_size")
        self.temporal_patch_size = _int(config, "temporal_patch_size")
        self.in_channels = int(config.in_channels)
        self.spatial_merge_size = int(config.spatial_merge_size)
        self.out_hidden_size = int(config.out_hidden_size)
        self.num_position_embeddings = int(config.num_position_embeddings)
        self.grid_side = int(self.num_position_embeddings ** 0.5)
        if self.grid_side ** 2 != self.num_position_embeddings:
            raise UnsupportedModel(f"vision num_position_embeddings {self.num_position_embeddings} is not a square")
        # the axial rotary embedding's frequencies: a quarter of the head for rows, a quarter for columns
        theta = float(rope.get("rope_theta", 10000.0))
        spatial = self.head_dim // 2
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))

        def get(name: str) -> torch.Tensor:
            return ckpt.get(prefix + name, dtype, self.device)

        patch_dim = self.in_channels * self.temporal_patch_size * self.patch_size ** 2
        self.patch_w = get("patch_embed.proj.weight").reshape(self.hidden_size, patch_dim).contiguous()
        self.patch_b = get("patch_embed.proj.bias")
        self.pos_embed = get("pos_embed.weight")
        self.blocks = [
            VisionBlock(*(get(f"blocks.{i}.{n}") for n in (
                "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.linear_fc1.weight", "mlp.linear_fc1.bias",
                "mlp.linear_fc2.weight", "mlp.linear_fc2.bias")))
            for i in range(self.depth)
        ]
        self.merger_norm_w = get("merger.norm.weight")
        self.merger_norm_b = get("merger.norm.bias")
        self.merger_fc1_w = get("merger.linear_fc1.weight")
        self.merger_fc1_b = get("merger.linear_fc1.bias")
        self.merger_fc2_w = get("merger.linear_fc2.weight")
        self.merger_fc2_b = get("merger.linear_fc2.bias")

    def tensors(self) -> list[torch.Tensor]:
        """Every weight."""
        out = [self.patch_w, self.patch_b, self.pos_embed, self.merger_norm_w, self.merger_norm_b,
               self.merger_fc1_w, self.merger_fc1_b, self.merger_fc2_w, self.merger_fc2_b]
        for b in self.blocks:
            out += list(vars(b).values())
        return out

    # ---- the grid's positions --------------------------------------------------------------------------------
    def _positions(self, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per patch, in the processor's order: its (row, col) in its image `[n, 2]`, and the position table's
        rows `[n, 4]` and bilinear weights `[n, 4]` that make its absolute position embedding."""
        from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

        m = self.spatial_merge_size
        rows_cols = get_vision_position_ids(grid_thw, m)
        taps, weights = get_vision_interpolation_indices_and_weights(
            grid_thw, num_grid_per_side=self.grid_side, mode="bilinear", align_corners=True, spatial_merge_size=m)
        return rows_cols, taps, weights

    def _rotary(self, rows_cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin `[patches, head_dim]` float32 of the axial rotary embedding."""
        freqs = rows_cols[..., None].float() * self.inv_freq  # [n, 2, head_dim // 4]
        freqs = torch.cat((freqs[:, 0], freqs[:, 1]), dim=-1)
        freqs = torch.cat((freqs, freqs), dim=-1).to(self.device)
        return freqs.cos(), freqs.sin()

    # ---- the tower -------------------------------------------------------------------------------------------
    def __call__(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values `[patches, in_channels * temporal_patch * patch * patch]` (as the image processor gives
        them), grid_thw `[images, 3]` -> merged image tokens `[patches // merge**2, out_hidden_size]` in the
        weights' dtype, in the order the language model's image placeholders take them."""
        steps = self.steps(pixel_values, grid_thw)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def steps(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        """The tower as a generator that yields after each block and returns what `__call__` does: the engine runs
        one block a step, so the other sequences go on between them."""
        grid_thw = grid_thw.to(device="cpu", dtype=torch.long)
        if grid_thw.ndim != 2 or grid_thw.shape[1] != 3 or (grid_thw <= 0).any():
            raise ValueError("grid_thw must be [images, 3] of positive sizes")
        m = self.spatial_merge_size
        if (grid_thw[:, 1:] % m).any():
            raise ValueError(f"image grids must be multiples of the merge size {m}")
        n = int(grid_thw.prod(dim=1).sum())
        if pixel_values.ndim != 2 or pixel_values.shape != (n, self.patch_w.shape[1]):
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)} do not match grid_thw: expected "
                             f"({n}, {self.patch_w.shape[1]})")
        rows_cols, taps, weights = self._positions(grid_thw)
        x = F.linear(pixel_values.to(device=self.device, dtype=self.dtype), self.patch_w, self.patch_b)
        pos = (self.pos_embed[taps.to(self.device)] * weights.to(self.device)[:, :, None]).sum(1)
        x = x + pos.to(x.dtype)
        cos, sin = self._rotary(rows_cols)
        # attention segments: each frame of each image
        lengths = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0]).tolist()
        for block in self.blocks:
            yield
            x = x + self._attention(F.layer_norm(x, (self.hidden_size,), block.norm1_w, block.norm1_b,
                                                 LAYER_NORM_EPS), block, cos, sin, lengths)
            h = F.layer_norm(x, (self.hidden_size,), block.norm2_w, block.norm2_b, LAYER_NORM_EPS)
            h = F.gelu(F.linear(h, block.fc1_w, block.fc1_b), approximate=self.approximate)
            x = x + F.linear(h, block.fc2_w, block.fc2_b)
        x = F.layer_norm(x, (self.hidden_size,), self.merger_norm_w, self.merger_norm_b, LAYER_NORM_EPS)
        x = x.reshape(-1, self.hidden_size * m * m)
        x = F.gelu(F.linear(x, self.merger_fc1_w, self.merger_fc1_b))
        return F.linear(x, self.merger_fc2_w, self.merger_fc2_b)

    def _attention(self, x: torch.Tensor, block: VisionBlock, cos: torch.Tensor, sin: torch.Tensor,
                   lengths: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = F.linear(x, block.qkv_w, block.qkv_b).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        # rotary in float32, back to the weights' dtype
        c, s = cos[:, None, :], sin[:, None, :]
        qf, kf = q.float(), k.float()
        q = (qf * c + _rotate_half(qf) * s).to(x.dtype)
        k = (kf * c + _rotate_half(kf) * s).to(x.dtype)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [heads, n, head_dim]
        out = torch.cat([F.scaled_dot_product_attention(qs, ks, vs, scale=self.head_dim ** -0.5)
                         for qs, ks, vs in zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1))], dim=1)
        return F.linear(out.transpose(0, 1).reshape(n, self.hidden_size), block.proj_w, block.proj_b)

"""Dense decoders: Qwen2 / Qwen2.5, Qwen3 and Llama-style models.

Weights are fused per layer (q|k|v and gate|up) so each step does few, large matmuls over every token of the
batch together; every layer is attention over the paged KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..attention import paged_attention
from ..cache import Caches, PagedAttentionSpec
from ..platform import KERNEL_ROWS, Platform
from ..weights import Checkpoint, Quantized, UnsupportedModel, Weight
from .base import CausalLM, ForwardBatch
from .rope import RotaryEmbedding, max_positions


@dataclass
class DenseLayer:
    device: torch.device
    ln1: torch.Tensor
    wqkv: Weight
    bqkv: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    wo: Weight
    ln2: torch.Tensor
    w_gate_up: Weight
    w_down: Weight

    def quantize(self, platform: Platform) -> None:
        """Quantized weights for every projection (CPU): fewer bytes to read per token. Norm weights and biases keep
        their values, in the activations' dtype (float32 for int8), so that no step widens them again."""
        for name in ("wqkv", "wo", "w_gate_up", "w_down"):
            setattr(self, name, platform.quantize_weight(getattr(self, name)))
        if platform.compute_dtype(1) == torch.float32:
            for name in ("ln1", "ln2", "q_norm", "k_norm", "bqkv"):
                if getattr(self, name) is not None:
                    setattr(self, name, getattr(self, name).float())


def rope_tables(rotary, positions: torch.Tensor, dtypes) -> dict:
    """cos and sin for `positions`, `[T, 1, D]` per dtype, with rotate_half's sign folded into sin."""
    probe = torch.empty(0, dtype=torch.float32, device=positions.device)
    cos, sin = rotary(probe, positions[None])
    cos, sin = cos[0][:, None, :].float(), sin[0][:, None, :].float()
    half = sin.shape[-1] // 2
    sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return {dt: (cos.to(dt), sin.to(dt)) for dt in dtypes}


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin, with the sign of rotate_half folded into `sin_signed`."""
    half = x.shape[-1] // 2
    return torch.addcmul(x * cos, torch.cat((x[..., half:], x[..., :half]), dim=-1), sin_signed)


class DenseDecoder(CausalLM):
    model_types = ("qwen2", "qwen3", "llama")

    def __init__(self, folder: Path, config, platform: Platform) -> None:
        super().__init__(folder, config, platform)
        if getattr(config, "use_sliding_window", False):
            raise UnsupportedModel("sliding-window attention is not supported")
        dtype = platform.dtype
        self.hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or self.hidden // self.num_heads
        self.eps = config.rms_norm_eps
        self.vocab_size = config.vocab_size
        self.num_layers = config.num_hidden_layers
        self.max_position_embeddings = max_positions(config)
        self.layer_devices = platform.layer_devices(self.num_layers)
        first, last = platform.first_device, self.layer_devices[-1]
        tied = bool(getattr(config, "tie_word_embeddings", False))
        self.rotary = {d: RotaryEmbedding(config).to(d) for d in set(self.layer_devices)}
        quantized = platform.quantize != "none"
        with Checkpoint(folder) as ckpt:
            self.layers: list[DenseLayer] = []
            for i in range(self.num_layers):  # one layer at a time: the peak is one layer over the result
                layer = self._layer(ckpt, i, self.layer_devices[i])
                if quantized:
                    layer.quantize(platform)
                self.layers.append(layer)
            self.embed = ckpt.get("model.embed_tokens.weight", dtype, first)
            self.norm = ckpt.get("model.norm.weight", dtype, last)
            self._load_output_layer(ckpt, tied, dtype)

    def _layer(self, ckpt: Checkpoint, i: int, device: torch.device) -> DenseLayer:
        p = f"model.layers.{i}."
        dt = self.platform.dtype
        attn = [p + f"self_attn.{n}_proj" for n in "qkv"]
        return DenseLayer(
            device=device,
            ln1=ckpt.get(p + "input_layernorm.weight", dt, device),
            wqkv=ckpt.cat([n + ".weight" for n in attn], dt, device),
            bqkv=ckpt.cat([n + ".bias" for n in attn], dt, device) if ckpt.has(attn[0] + ".bias") else None,
            q_norm=ckpt.maybe(p + "self_attn.q_norm.weight", dt, device),
            k_norm=ckpt.maybe(p + "self_attn.k_norm.weight", dt, device),
            wo=ckpt.get(p + "self_attn.o_proj.weight", dt, device),
            ln2=ckpt.get(p + "post_attention_layernorm.weight", dt, device),
            w_gate_up=ckpt.cat([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], dt, device),
            w_down=ckpt.get(p + "mlp.down_proj.weight", dt, device),
        )

    def cache_specs(self) -> list[PagedAttentionSpec]:
        return [PagedAttentionSpec(tuple(range(self.num_layers)), self.kv_heads, self.head_dim, self.platform.dtype)]

    def tensors(self) -> list:
        out = [self.embed, self.norm, self.lm_head]
        for lw in self.layers:
            out += [lw.ln1, lw.wqkv, lw.bqkv, lw.q_norm, lw.k_norm, lw.wo, lw.ln2, lw.w_gate_up, lw.w_down]
        return out

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), w.float(), self.eps)  # one fused op
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * w

    def _add_rms(self, x: torch.Tensor, residual: torch.Tensor | None, w: torch.Tensor):
        """(RMSNorm of x + residual, x + residual): one fused operator for bf16 decode rows."""
        if residual is None:
            return self._rms(x, w), x
        if self.fused and x.shape[0] in KERNEL_ROWS and residual.dtype == x.dtype:
            if x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16:
                return torch.ops.qwen.add_rms_norm_bf16(x, residual.contiguous(), w, self.eps)
            if x.dtype == torch.float32 and w.dtype == torch.float32:  # int8's float32 rows: F.rms_norm's rounding
                return torch.ops.qwen.add_rms_norm_f32w(x, residual.contiguous(), w, self.eps)
        x = x + residual
        return self._rms(x, w), x

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.embed is None:
            return self.lm_head.rows(ids)
        return F.embedding(ids, self.embed)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, caches: Caches) -> torch.Tensor:
        T = batch.num_tokens
        act = self.platform.compute_dtype(T)
        x = self._embed(batch.token_ids.to(self.platform.first_device)).to(act)
        H, KV, D = self.num_heads, self.kv_heads, self.head_dim
        kv = caches.kv
        mlp_out = None  # each layer's MLP output, added to the residual stream by the next layer's first norm
        for li, lw in enumerate(self.layers):
            if x.device != lw.device:
                x = x.to(lw.device)
                mlp_out = mlp_out.to(lw.device) if mlp_out is not None else None
            m = batch.on(lw.device)
            if "rope" not in m.extra:
                m.extra["rope"] = rope_tables(self.rotary[lw.device], m.positions, {self.platform.dtype, torch.float32})
            cos, sin = m.extra["rope"][act]
            h, x = self._add_rms(x, mlp_out, lw.ln1)
            qkv = self.linear(h, lw.wqkv, lw.bqkv)
            v = qkv[:, (H + KV) * D:].view(T, KV, D)
            if lw.q_norm is not None:
                q = rotate(self._rms(qkv[:, : H * D].view(T, H, D), lw.q_norm), cos, sin)
                k = rotate(self._rms(qkv[:, H * D: (H + KV) * D].view(T, KV, D), lw.k_norm), cos, sin)
            else:  # queries and keys rotate together, in one pass
                qk = rotate(qkv[:, : (H + KV) * D].view(T, H + KV, D), cos, sin)
                q, k = qk[:, :H], qk[:, H:]
            out = paged_attention(q, k, v, kv.k[li], kv.v[li], m.attention)
            h, x = self._add_rms(x, self.linear(out, lw.wo), lw.ln2)
            mlp_out = self.linear(self._silu_mul(self.linear(h, lw.w_gate_up)), lw.w_down)
        x = x + mlp_out
        x = x.to(self.output_device)
        rows = batch.logit_rows.to(self.output_device)
        if isinstance(self.lm_head, Quantized):
            return self.linear(self._rms(x[rows], self.norm), self.lm_head).float()
        h = self._rms(x[rows].to(self.platform.dtype), self.norm)
        return self.logits(h, self.lm_head)

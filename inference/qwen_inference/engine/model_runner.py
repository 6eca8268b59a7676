"""The model's forward pass over a mixed batch: decode tokens of running sequences and prompt chunks.

Weights come from a transformers checkpoint (Qwen2, Qwen3 and Llama-style decoders), fused per layer
(q|k|v and gate|up) so each step does few, large matmuls over every token of the batch together. Attention
reads keys and values from the paged KV cache: all decode tokens in one batched call, each prompt chunk in
one call of its own. Grouped-query heads are folded into the query length, so no key is ever repeated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .kv_cache import KVCache

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = {"qwen2", "qwen3", "llama"}
UPCAST_MIN_TOKENS = 48


def _release_memory() -> None:
    """Hand freed heap memory back to the OS after loading, so the resident size is the weights' size."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class UnsupportedModel(ValueError):
    pass


@dataclass
class LayerWeights:
    device: torch.device
    ln1: torch.Tensor
    wqkv: torch.Tensor
    bqkv: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    wo: torch.Tensor
    ln2: torch.Tensor
    w_gate_up: torch.Tensor
    w_down: torch.Tensor


@dataclass
class PrefillSegment:
    start: int  # first row of the chunk in the batch
    length: int  # tokens in the chunk
    gather: torch.Tensor  # [L] cache slots of every position up to the chunk's end
    mask: torch.Tensor  # [groups * length, L] bool


@dataclass
class StepInput:
    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] cache slot each token's key and value go to
    num_decode: int  # the first num_decode rows are single decode tokens
    decode_gather: torch.Tensor | None  # [B, L]
    decode_mask: torch.Tensor | None  # [B, 1, 1, L] bool
    prefills: list[PrefillSegment]
    logit_rows: torch.Tensor  # [R] rows whose next-token logits are wanted


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        from ..sysinfo import cpu_has_fast_bf16

        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def resolve_devices(device: str) -> list[torch.device]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but no CUDA GPU is visible")
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [torch.device("cpu")]


class ModelRunner:
    def __init__(self, model_dir: Path, dtype: torch.dtype, devices: list[torch.device]) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(model_dir))
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModel(
                f"model type {config.model_type!r} is not supported (supported: {sorted(SUPPORTED_MODEL_TYPES)})"
            )
        if getattr(config, "use_sliding_window", False):
            raise UnsupportedModel("sliding-window attention is not supported")
        self.config = config
        self.dtype = dtype
        self.devices = devices
        self.hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or self.hidden // self.num_heads
        self.groups = self.num_heads // self.kv_heads
        self.eps = config.rms_norm_eps
        self.vocab_size = config.vocab_size
        self.num_layers = config.num_hidden_layers

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, low_cpu_mem_usage=True)
        model.eval()
        n_dev = len(devices)
        per = -(-self.num_layers // n_dev)
        self.layer_devices = [devices[min(i // per, n_dev - 1)] for i in range(self.num_layers)]
        self.first_device, self.last_device = devices[0], self.layer_devices[-1]
        inner = model.model
        self.layers: list[LayerWeights] = []
        with torch.no_grad():
            for i, layer in enumerate(inner.layers):
                self.layers.append(self._fuse(layer, self.layer_devices[i]))
                inner.layers[i] = torch.nn.Identity()  # let the original weights go
        # owned copies: nothing may keep the checkpoint's memory map (or its pages) alive
        tied = model.lm_head.weight.data_ptr() == inner.embed_tokens.weight.data_ptr()
        self.embed = inner.embed_tokens.weight.detach().to(self.first_device, copy=True)
        self.norm = inner.norm.weight.detach().to(self.last_device, copy=True)
        if tied and self.last_device == self.first_device:
            self.lm_head = self.embed
        else:
            self.lm_head = model.lm_head.weight.detach().to(self.last_device, copy=True)
        self.rotary = {d: self._rotary_for(inner.rotary_emb, d) for d in set(self.layer_devices)}
        del model, inner
        _release_memory()
        # On CPUs, bfloat16 matmuls win while memory-bound (decode) but lose to float32 once compute-bound:
        # on big steps (prompt chunks), weights are widened to float32 one layer at a time.
        self.upcast_min_tokens = UPCAST_MIN_TOKENS if (dtype == torch.bfloat16 and devices[0].type == "cpu") else None

    def _fuse(self, layer, device: torch.device) -> LayerWeights:
        att, mlp = layer.self_attn, layer.mlp
        wqkv = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]).to(device)
        bqkv = None
        if att.q_proj.bias is not None:
            bqkv = torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]).to(device)
        q_norm = getattr(att, "q_norm", None)
        k_norm = getattr(att, "k_norm", None)
        return LayerWeights(
            device=device,
            ln1=layer.input_layernorm.weight.detach().to(device),
            wqkv=wqkv.contiguous(),
            bqkv=bqkv,
            q_norm=q_norm.weight.detach().to(device) if q_norm is not None else None,
            k_norm=k_norm.weight.detach().to(device) if k_norm is not None else None,
            wo=att.o_proj.weight.detach().to(device).contiguous(),
            ln2=layer.post_attention_layernorm.weight.detach().to(device),
            w_gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).to(device).contiguous(),
            w_down=mlp.down_proj.weight.detach().to(device).contiguous(),
        )

    @staticmethod
    def _rotary_for(module, device: torch.device):
        import copy

        return copy.deepcopy(module).to(device)

    def weight_bytes(self) -> int:
        seen: set[int] = set()
        total = 0
        tensors = [self.embed, self.norm, self.lm_head]
        for lw in self.layers:
            tensors += [t for t in (lw.ln1, lw.wqkv, lw.bqkv, lw.q_norm, lw.k_norm, lw.wo, lw.ln2, lw.w_gate_up, lw.w_down) if t is not None]
        for t in tensors:
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        return total

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * w

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    @torch.inference_mode()
    def forward(self, step: StepInput, cache: KVCache) -> torch.Tensor:
        """Run one step; returns float32 logits `[R, vocab]` for `step.logit_rows`."""
        per_device: dict[torch.device, StepInput | dict] = {}

        def on(device: torch.device) -> dict:
            if device not in per_device:
                pos = step.positions.to(device)
                probe = torch.empty(0, dtype=self.dtype, device=device)
                cos, sin = self.rotary[device](probe, pos[None])
                per_device[device] = {
                    "cos": cos[0][:, None, :].to(self.dtype),
                    "sin": sin[0][:, None, :].to(self.dtype),
                    "slots": step.slot_mapping.to(device),
                    "dgather": step.decode_gather.to(device) if step.decode_gather is not None else None,
                    "dmask": step.decode_mask.to(device) if step.decode_mask is not None else None,
                    "prefills": [(p.start, p.length, p.gather.to(device), p.mask.to(device)) for p in step.prefills],
                }
            return per_device[device]

        x = F.embedding(step.token_ids.to(self.first_device), self.embed)
        T = x.shape[0]
        wide = self.upcast_min_tokens is not None and T >= self.upcast_min_tokens
        if wide:
            x = x.float()
        act = x.dtype

        def w(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.float() if wide and t is not None else t

        H, KV, D, G = self.num_heads, self.kv_heads, self.head_dim, self.groups
        B = step.num_decode
        for li, lw in enumerate(self.layers):
            if x.device != lw.device:
                x = x.to(lw.device)
            m = on(lw.device)
            h = self._rms(x, w(lw.ln1))
            qkv = F.linear(h, w(lw.wqkv), w(lw.bqkv))
            q = qkv[:, : H * D].view(T, H, D)
            k = qkv[:, H * D : (H + KV) * D].view(T, KV, D)
            v = qkv[:, (H + KV) * D :].view(T, KV, D)
            if lw.q_norm is not None:
                q = self._rms(q, w(lw.q_norm))
                k = self._rms(k, w(lw.k_norm))
            cos, sin = (m["cos"].to(act), m["sin"].to(act)) if wide else (m["cos"], m["sin"])
            q = self._rotate(q, cos, sin)
            k = self._rotate(k, cos, sin)
            kc, vc = cache.k[li], cache.v[li]
            kc.index_copy_(0, m["slots"], k.to(kc.dtype))
            vc.index_copy_(0, m["slots"], v.to(vc.dtype))
            out = torch.empty(T, H * D, dtype=act, device=x.device)
            if B:
                g = m["dgather"]
                qd = q[:B].view(B, KV, G, D)
                kd = kc[g].to(act).transpose(1, 2)
                vd = vc[g].to(act).transpose(1, 2)
                od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=m["dmask"])
                out[:B] = od.reshape(B, H * D)
            for start, n, gather, mask in m["prefills"]:
                qs = q[start : start + n].view(n, KV, G, D).permute(1, 2, 0, 3).reshape(1, KV, G * n, D)
                ks = kc[gather].to(act).transpose(0, 1)[None]
                vs = vc[gather].to(act).transpose(0, 1)[None]
                os_ = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)
                out[start : start + n] = os_.view(KV, G, n, D).permute(2, 0, 1, 3).reshape(n, H * D)
            x = x + F.linear(out, w(lw.wo))
            h = self._rms(x, w(lw.ln2))
            gu = F.linear(h, w(lw.w_gate_up))
            inter = gu.shape[-1] // 2
            x = x + F.linear(F.silu(gu[:, :inter]) * gu[:, inter:], w(lw.w_down))
        x = x.to(self.last_device)
        rows = step.logit_rows.to(self.last_device)
        h = self._rms(x[rows].to(self.dtype), self.norm)
        return F.linear(h, self.lm_head).float()

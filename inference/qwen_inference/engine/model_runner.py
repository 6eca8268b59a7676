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
from typing import Any

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


class _Checkpoint:
    """Tensors of a safetensors checkpoint (one file or shards), read one at a time into memory of our own,
    so no memory map outlives loading."""

    def __init__(self, folder: Path) -> None:
        import json

        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self.where = json.loads(index.read_text())["weight_map"]
        else:
            from safetensors import safe_open

            with safe_open(str(self.folder / "model.safetensors"), framework="pt") as f:
                self.where = {k: "model.safetensors" for k in f.keys()}
        self.files: dict[str, Any] = {}

    def __enter__(self) -> "_Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.files.clear()

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.where:
            raise UnsupportedModel(f"the checkpoint has no tensor {name}")
        shard = self.where[name]
        if shard not in self.files:
            self.files[shard] = safe_open(str(self.folder / shard), framework="pt")
        t = self.files[shard].get_tensor(name)
        return t.to(device=device, dtype=dtype, copy=True)


@dataclass
class QuantWeight:
    """An int8 weight with one float32 scale per output channel (symmetric)."""

    q: torch.Tensor  # [out, in] int8
    scale: torch.Tensor  # [out] float32

    @classmethod
    def of(cls, w: torch.Tensor) -> "QuantWeight":
        wf = w.float()
        scale = (wf.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q.contiguous(), scale.contiguous())

    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 4


def int8_linear(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T with x quantized per row (token) on the fly: int8 products, int32 sums, float32 out."""
    xf = x.float()
    sx = xf.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(127.0)
    xq = (xf / sx).round_().to(torch.int8)  # |x| / (max|x| / 127) never rounds past 127
    out = torch._int_mm(xq, w.q.t()).float()
    out.mul_(sx).mul_(w.scale)
    if bias is not None:
        out.add_(bias)
    return out


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
    def __init__(self, model_dir: Path, dtype: torch.dtype, devices: list[torch.device],
                 quantize: str = "none") -> None:
        from transformers import AutoConfig

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

        n_dev = len(devices)
        per = -(-self.num_layers // n_dev)
        self.layer_devices = [devices[min(i // per, n_dev - 1)] for i in range(self.num_layers)]
        self.first_device, self.last_device = devices[0], self.layer_devices[-1]
        tied = bool(getattr(config, "tie_word_embeddings", False))
        if quantize not in ("none", "int8"):
            raise ValueError(f"unknown quantization {quantize!r}")
        if quantize == "int8" and any(d.type != "cpu" for d in devices):
            raise ValueError("--quantize int8 runs on CPU only")
        self.quantize = quantize
        with _Checkpoint(model_dir) as ckpt:
            self.layers = []
            for i in range(self.num_layers):  # one layer at a time: the peak is one layer over the result
                lw = self._layer(ckpt, i, self.layer_devices[i])
                self.layers.append(self._quantize_layer(lw) if quantize == "int8" else lw)
            self.embed = ckpt.get("model.embed_tokens.weight", dtype, self.first_device)
            self.norm = ckpt.get("model.norm.weight", dtype, self.last_device)
            if tied or not ckpt.has("lm_head.weight"):
                tied = True
                self.lm_head = self.embed if self.last_device == self.first_device else self.embed.to(self.last_device)
            else:
                self.lm_head = ckpt.get("lm_head.weight", dtype, self.last_device)
        self.rotary = {d: self._rotary(config, d) for d in set(self.layer_devices)}
        _release_memory()
        # On CPUs, bfloat16 matmuls win while memory-bound (decode) but lose to float32 once compute-bound:
        # on big steps (prompt chunks), weights are widened to float32 one layer at a time.
        self.upcast_min_tokens = UPCAST_MIN_TOKENS if (dtype == torch.bfloat16 and devices[0].type == "cpu") else None
        if quantize == "int8":
            # the embedding table becomes the lm_head's int8 rows when the two are tied
            self.norm = self.norm.float()
            self.lm_head = QuantWeight.of(self.lm_head)
            if tied:
                self.embed = None
            _release_memory()

    @staticmethod
    def _quantize_layer(lw: LayerWeights) -> LayerWeights:
        """int8 weights for every matmul (CPU): half the bytes of bfloat16 to read per token, and integer
        products that run several times faster than float ones here."""
        for name in ("wqkv", "wo", "w_gate_up", "w_down"):
            setattr(lw, name, QuantWeight.of(getattr(lw, name)))
        for name in ("bqkv", "ln1", "ln2", "q_norm", "k_norm"):
            t = getattr(lw, name)
            if t is not None:
                setattr(lw, name, t.float())
        return lw

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.embed is None:
            return self.lm_head.q[ids].float() * self.lm_head.scale[ids][:, None]
        return F.embedding(ids, self.embed)

    def _linear(self, x: torch.Tensor, w, b: torch.Tensor | None, wide: bool) -> torch.Tensor:
        if isinstance(w, QuantWeight):
            return int8_linear(x, w, b)
        if wide:
            return F.linear(x, w.float(), b.float() if b is not None else None)
        return F.linear(x, w, b)

    def _layer(self, ckpt: "_Checkpoint", i: int, device: torch.device) -> LayerWeights:
        p = f"model.layers.{i}."
        dt = self.dtype

        def cat(*names: str) -> torch.Tensor:
            return torch.cat([ckpt.get(p + n, dt, device) for n in names]).contiguous()

        bias = ckpt.has(p + "self_attn.q_proj.bias")
        return LayerWeights(
            device=device,
            ln1=ckpt.get(p + "input_layernorm.weight", dt, device),
            wqkv=cat("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
            bqkv=cat("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias") if bias else None,
            q_norm=ckpt.get(p + "self_attn.q_norm.weight", dt, device) if ckpt.has(p + "self_attn.q_norm.weight") else None,
            k_norm=ckpt.get(p + "self_attn.k_norm.weight", dt, device) if ckpt.has(p + "self_attn.k_norm.weight") else None,
            wo=ckpt.get(p + "self_attn.o_proj.weight", dt, device),
            ln2=ckpt.get(p + "post_attention_layernorm.weight", dt, device),
            w_gate_up=cat("mlp.gate_proj.weight", "mlp.up_proj.weight"),
            w_down=ckpt.get(p + "mlp.down_proj.weight", dt, device),
        )

    @staticmethod
    def _rotary(config, device: torch.device):
        """The model's own rotary embedding (every rope scaling transformers knows), built without weights."""
        import importlib

        module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
        cls = next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))
        return cls(config=config).to(device)

    def weight_bytes(self) -> int:
        seen: set[int] = set()
        total = 0
        tensors = [self.embed, self.norm, self.lm_head]
        for lw in self.layers:
            tensors += [lw.ln1, lw.wqkv, lw.bqkv, lw.q_norm, lw.k_norm, lw.wo, lw.ln2, lw.w_gate_up, lw.w_down]
        for t in tensors:
            if t is None:
                continue
            if isinstance(t, QuantWeight):
                total += t.nbytes()
                continue
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        return total

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), w, self.eps)  # one fused op
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * w

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        """x·cos + rotate_half(x)·sin, with the sign of rotate_half folded into `sin_signed`."""
        half = x.shape[-1] // 2
        return torch.addcmul(x * cos, torch.cat((x[..., half:], x[..., :half]), dim=-1), sin_signed)

    @torch.inference_mode()
    def forward(self, step: StepInput, cache: KVCache) -> torch.Tensor:
        """Run one step; returns float32 logits `[R, vocab]` for `step.logit_rows`."""
        per_device: dict[torch.device, StepInput | dict] = {}

        def on(device: torch.device) -> dict:
            if device not in per_device:
                pos = step.positions.to(device)
                probe = torch.empty(0, dtype=self.dtype, device=device)
                cos, sin = self.rotary[device](probe, pos[None])
                cos, sin = cos[0][:, None, :].float(), sin[0][:, None, :].float()
                half = sin.shape[-1] // 2
                sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
                per_device[device] = {
                    "rope": {dt: (cos.to(dt), sin.to(dt)) for dt in {self.dtype, torch.float32}},
                    "slots": step.slot_mapping.to(device),
                    "dgather": step.decode_gather.to(device) if step.decode_gather is not None else None,
                    "dmask": step.decode_mask.to(device) if step.decode_mask is not None else None,
                    "prefills": [(p.start, p.length, p.gather.to(device), p.mask.to(device)) for p in step.prefills],
                }
            return per_device[device]

        x = self._embed(step.token_ids.to(self.first_device))
        T = x.shape[0]
        wide = self.quantize == "int8" or (self.upcast_min_tokens is not None and T >= self.upcast_min_tokens)
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
            qkv = self._linear(h, lw.wqkv, lw.bqkv, wide)
            v = qkv[:, (H + KV) * D :].view(T, KV, D)
            cos, sin = m["rope"][act]
            if lw.q_norm is not None:
                q = self._rotate(self._rms(qkv[:, : H * D].view(T, H, D), w(lw.q_norm)), cos, sin)
                k = self._rotate(self._rms(qkv[:, H * D : (H + KV) * D].view(T, KV, D), w(lw.k_norm)), cos, sin)
            else:  # queries and keys rotate together, in one pass
                qk = self._rotate(qkv[:, : (H + KV) * D].view(T, H + KV, D), cos, sin)
                q, k = qk[:, :H], qk[:, H:]
            kc, vc = cache.k[li], cache.v[li]
            kc.index_copy_(0, m["slots"], k.to(kc.dtype))
            vc.index_copy_(0, m["slots"], v.to(vc.dtype))
            decode_only = B == T
            out = None if decode_only else torch.empty(T, H * D, dtype=act, device=x.device)
            if B:
                g = m["dgather"]
                qd = q[:B].reshape(B, KV, G, D)
                kd = kc[g].to(act).transpose(1, 2)
                vd = vc[g].to(act).transpose(1, 2)
                od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=m["dmask"]).reshape(B, H * D)
                if decode_only:
                    out = od
                else:
                    out[:B] = od
            for start, n, gather, mask in m["prefills"]:
                qs = q[start : start + n].reshape(n, KV, G, D).permute(1, 2, 0, 3).reshape(1, KV, G * n, D)
                ks = kc[gather].to(act).transpose(0, 1)[None]
                vs = vc[gather].to(act).transpose(0, 1)[None]
                os_ = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)
                out[start : start + n] = os_.view(KV, G, n, D).permute(2, 0, 1, 3).reshape(n, H * D)
            x = x + self._linear(out, lw.wo, None, wide)
            h = self._rms(x, w(lw.ln2))
            gu = self._linear(h, lw.w_gate_up, None, wide)
            inter = gu.shape[-1] // 2
            x = x + self._linear(F.silu(gu[:, :inter]) * gu[:, inter:], lw.w_down, None, wide)
        x = x.to(self.last_device)
        rows = step.logit_rows.to(self.last_device)
        if isinstance(self.lm_head, QuantWeight):
            return int8_linear(self._rms(x[rows], self.norm), self.lm_head, None)
        h = self._rms(x[rows].to(self.dtype), self.norm)
        return F.linear(h, self.lm_head).float()

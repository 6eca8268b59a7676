"""Qwen3.5: a hybrid decoder of Gated DeltaNet (linear attention) layers and gated full-attention layers.

Three of every four layers (as `layer_types` says) are Gated DeltaNet: a causal depthwise convolution over
the fused q|k|v projection, then the gated delta rule, whose state is one `[heads, key_dim, value_dim]`
matrix per sequence whatever its length. The others are full attention with an output gate, q/k norms and
rotary embeddings on a quarter of each head. Every RMSNorm but the DeltaNet output norm is zero-centred
(the weight stores scale - 1).

Per sequence, the model keeps paged K/V for the attention layers and, in a pool of state slots, the
convolution window and the delta-rule matrix of each DeltaNet layer. In one step:
- decode rows (one token each) run the recurrent update, batched over every running sequence, in place in the
  state pool (`delta_net_decode`: on CPUs with the engine's kernels one operator a layer);
- each prompt chunk runs the chunked delta rule (UT transform inside 64-token chunks, a scan across them),
  starting from the state its previous chunk left, so long prompts prefill in pieces.

Both checkpoint layouts load: the published multimodal one (`Qwen3_5ForConditionalGeneration`, language
model under `model.language_model.*`, the vision tower under `model.visual.*`) and the
text-only one (`Qwen3_5ForCausalLM`, under `model.*`). Multi-token-prediction weights (`mtp.*`) are ignored.
The vision tower (`qwen3_5_vision`), where the checkpoint has one, encodes each image into the rows of its
placeholder tokens. With text only, the interleaved multimodal rotary embedding gives every section the same
position, so it is the ordinary rotary embedding of the token's position; an image's tokens take their row and
column as the height's and width's positions (`rope_sections`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cache import Caches, PagedAttentionSpec, RecurrentStateSpec
from ..platform import KERNEL_ROWS, Platform
from ..weights import Checkpoint, CheckpointError, Quantized, UnsupportedModel, Weight
from .base import CausalLM, DeviceBatch, ForwardBatch
from .rope import RotaryEmbedding, max_positions

DELTA_CHUNK = 64  # tokens per chunk of the chunked delta rule


@dataclass
class MLP:
    w_gate_up: Weight
    w_down: Weight


@dataclass
class DeltaNetLayer:
    device: torch.device
    ln1: torch.Tensor  # 1 + weight, float32
    ln2: torch.Tensor
    w_in: Weight  # q|k|v (conv channels), z (output gate), b (beta), a (decay) fused
    conv: torch.Tensor  # [conv_dim, kernel] float32
    neg_a: torch.Tensor  # -exp(A_log) [Hv] float32
    dt_bias: torch.Tensor  # [Hv] float32
    norm: torch.Tensor  # [Dv] gated RMSNorm weight (not zero-centred)
    w_out: Weight
    mlp: MLP


@dataclass
class AttentionLayer:
    device: torch.device
    ln1: torch.Tensor
    ln2: torch.Tensor
    w_qkv: Weight  # per head q|gate interleaved, then k, then v
    b_qkv: torch.Tensor | None
    q_norm: torch.Tensor  # 1 + weight, float32
    k_norm: torch.Tensor
    w_o: Weight
    mlp: MLP


def _zc_norm(x: torch.Tensor, w1: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3.5's zero-centred RMSNorm: computed in float32, scaled by (1 + weight), back to x's dtype."""
    return (F.rms_norm(x.float(), (x.shape[-1],), eps=eps) * w1).to(x.dtype)


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6)


def split_heads(qkv: torch.Tensor, hk: int, dk: int, hv: int, dv: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    """Convolution output `[n, 2*Hk*Dk + Hv*Dv]` (float32) to l2-normed, scaled queries and keys repeated to the
    value heads, and values: `[n, Hv, Dk]`, `[n, Hv, Dk]`, `[n, Hv, Dv]`."""
    n, kd, r = qkv.shape[0], hk * dk, hv // hk
    q = _l2norm(qkv[:, :kd].reshape(n, hk, dk))
    k = _l2norm(qkv[:, kd: 2 * kd].reshape(n, hk, dk))
    if r > 1:
        q, k = q.repeat_interleave(r, dim=1), k.repeat_interleave(r, dim=1)
    v = qkv[:, 2 * kd:].reshape(n, hv, dv)
    return q * dk ** -0.5, k, v


def gated_norm(core: torch.Tensor, z: torch.Tensor, norm: torch.Tensor, eps: float) -> torch.Tensor:
    """The DeltaNet output's gated RMSNorm per head: norm(core) * weight * silu(z), in z's dtype. `core` `[n, Hv,
    Dv]` float32, `z` `[n, Hv*Dv]` -> `[n, Hv*Dv]`."""
    n, hv, dv = core.shape
    normed = F.rms_norm(core, (dv,), eps=eps).to(z.dtype) * norm.to(z.dtype)
    return (normed.float() * F.silu(z.float().view(n, hv, dv))).to(z.dtype).reshape(n, hv * dv)


def delta_net_decode(proj: torch.Tensor, conv_state: torch.Tensor, conv_w: torch.Tensor, ssm: torch.Tensor,
                     slots: torch.Tensor, neg_a: torch.Tensor, dt_bias: torch.Tensor, norm_w: torch.Tensor,
                     key_heads: int, eps: float) -> torch.Tensor:
    """A Gated DeltaNet layer's decode rows (one token per sequence), from its input projection `proj` `[B, C +
    Hv*Dv + 2*Hv]` (the convolution's q|k|v channels, the output gate z, beta's and the decay's logits) to the gated,
    normed output `[B, Hv*Dv]`: the convolution window `conv_state` `[S, C, K-1]` and the delta rule's state `ssm`
    `[S, Hv, Dk, Dv]` of each row's slot are updated in place. torch's operators; on CPUs with the engine's kernels
    `torch.ops.qwen.delta_net_decode` does the same in one operator."""
    hv, dk, dv = ssm.shape[1:]
    C, vd = conv_w.shape[0], hv * dv
    beta = torch.sigmoid(proj[:, C + vd: C + vd + hv].float())
    g = neg_a * F.softplus(proj[:, C + vd + hv:].float() + dt_bias)  # log of the per-token decay, <= 0
    window = torch.cat((conv_state[slots], proj[:, :C].float()[:, :, None]), dim=-1)  # [B, C, K]
    conv_state.index_copy_(0, slots, window[:, :, 1:])
    q, k, v = split_heads(F.silu((window * conv_w[None]).sum(-1)), key_heads, dk, hv, dv)
    s = ssm[slots]
    # decay the state, write the delta-rule correction, read with the query
    s.mul_(g.exp()[..., None, None])
    kv_mem = (s * k[..., None]).sum(dim=-2)
    delta = (v - kv_mem) * beta[..., None]
    s.add_(k[..., None] * delta[..., None, :])
    core = (s * q[..., None]).sum(dim=-2)
    ssm.index_copy_(0, slots, s)
    return gated_norm(core, proj[:, C: C + vd], norm_w, eps)


def _delta_decode_fn(platform: Platform):
    """`delta_net_decode` as this platform runs it: the engine's fused operator on CPUs where its kernels load
    (float32 and bf16 rows), torch's operators elsewhere."""
    if not platform.cpu_kernels():
        return delta_net_decode
    op = torch.ops.qwen.delta_net_decode

    def fused(proj: torch.Tensor, *args) -> torch.Tensor:
        if proj.dtype in (torch.float32, torch.bfloat16):
            return op(proj.contiguous(), *args)
        return delta_net_decode(proj, *args)

    return fused


class Qwen3_5Decoder(CausalLM):
    model_types = ("qwen3_5", "qwen3_5_text")

    def __init__(self, folder: Path, config, platform: Platform) -> None:
        super().__init__(folder, config, platform)
        self.delta_decode = _delta_decode_fn(platform)
        text = config.get_text_config() if config.model_type == "qwen3_5" else config
        self.text = text
        self.prefix = "model.language_model." if config.model_type == "qwen3_5" else "model."
        dt = platform.dtype
        self.hidden = text.hidden_size
        self.num_layers = text.num_hidden_layers
        self.vocab_size = text.vocab_size
        self.max_position_embeddings = max_positions(text)
        self.eps = text.rms_norm_eps
        self.layer_types = list(text.layer_types)
        if len(self.layer_types) != self.num_layers or set(self.layer_types) - {"linear_attention", "full_attention"}:
            raise UnsupportedModel(f"unexpected layer_types {sorted(set(self.layer_types))}")
        if text.hidden_act != "silu":
            raise UnsupportedModel(f"hidden_act {text.hidden_act!r} is not supported (silu is)")
        # full attention
        self.num_heads = text.num_attention_heads
        self.kv_heads = text.num_key_value_heads
        self.head_dim = text.head_dim
        rope = dict(text.rope_parameters or {})
        self.rotary_dim = int(self.head_dim * rope.get("partial_rotary_factor", 0.25))
        self.rotary = RotaryEmbedding(text)  # the rope type is checked here, before any weight is read
        self.mrope_section = list(rope.get("mrope_section") or (11, 11, 10))
        # Gated DeltaNet
        self.hk, self.hv = text.linear_num_key_heads, text.linear_num_value_heads
        self.dk, self.dv = text.linear_key_head_dim, text.linear_value_head_dim
        if self.hv % self.hk:
            raise UnsupportedModel("linear_num_value_heads must be a multiple of linear_num_key_heads")
        self.key_dim, self.value_dim = self.hk * self.dk, self.hv * self.dv
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.kernel = text.linear_conv_kernel_dim

        self.layer_devices = platform.layer_devices(self.num_layers)
        first, last = platform.first_device, self.layer_devices[-1]
        quantized = platform.quantize != "none"
        tied = bool(getattr(config, "tie_word_embeddings", False))
        with Checkpoint(folder) as ckpt:
            self.layers: list[DeltaNetLayer | AttentionLayer] = []
            for i, kind in enumerate(self.layer_types):
                device = self.layer_devices[i]
                layer = self._delta_layer(ckpt, i, device) if kind == "linear_attention" else \
                    self._attention_layer(ckpt, i, device)
                if quantized:
                    self._quantize(layer, platform)
                self.layers.append(layer)
            self.embed = ckpt.get(self.prefix + "embed_tokens.weight", dt, first)
            self.norm = 1.0 + ckpt.get(self.prefix + "norm.weight", torch.float32, last)
            self._load_output_layer(ckpt, tied, dt)
            self.visual = None
            if config.model_type == "qwen3_5" and getattr(config, "vision_config", None) is not None \
                    and ckpt.has("model.visual.patch_embed.proj.weight"):
                from .qwen3_5_vision import VisionEncoder

                self.visual = VisionEncoder(ckpt, "model.visual.", config.vision_config, dt, first)
                self.image_token_id = int(config.image_token_id)

    # ---- loading -----------------------------------------------------------------------------------
    def _mlp(self, ckpt: Checkpoint, p: str, device: torch.device) -> MLP:
        dt = self.platform.dtype
        return MLP(ckpt.cat([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], dt, device),
                   ckpt.get(p + "mlp.down_proj.weight", dt, device))

    def _norms(self, ckpt: Checkpoint, p: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return (1.0 + ckpt.get(p + "input_layernorm.weight", torch.float32, device),
                1.0 + ckpt.get(p + "post_attention_layernorm.weight", torch.float32, device))

    def _delta_layer(self, ckpt: Checkpoint, i: int, device: torch.device) -> DeltaNetLayer:
        p = f"{self.prefix}layers.{i}."
        a = p + "linear_attn."
        dt = self.platform.dtype
        ln1, ln2 = self._norms(ckpt, p, device)
        conv = ckpt.get(a + "conv1d.weight", torch.float32, device)
        if conv.shape != (self.conv_dim, 1, self.kernel):
            raise CheckpointError(f"{a}conv1d.weight has shape {tuple(conv.shape)}, expected "
                                   f"{(self.conv_dim, 1, self.kernel)}")
        return DeltaNetLayer(
            device=device, ln1=ln1, ln2=ln2,
            w_in=ckpt.cat([a + n + ".weight" for n in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")],
                          dt, device),
            conv=conv[:, 0, :].contiguous(),
            neg_a=-ckpt.get(a + "A_log", torch.float32, device).exp(),
            dt_bias=ckpt.get(a + "dt_bias", torch.float32, device),
            norm=ckpt.get(a + "norm.weight", dt, device),
            w_out=ckpt.get(a + "out_proj.weight", dt, device),
            mlp=self._mlp(ckpt, p, device),
        )

    def _attention_layer(self, ckpt: Checkpoint, i: int, device: torch.device) -> AttentionLayer:
        p = f"{self.prefix}layers.{i}."
        a = p + "self_attn."
        dt = self.platform.dtype
        ln1, ln2 = self._norms(ckpt, p, device)
        names = [a + f"{n}_proj" for n in "qkv"]
        return AttentionLayer(
            device=device, ln1=ln1, ln2=ln2,
            w_qkv=ckpt.cat([n + ".weight" for n in names], dt, device),
            b_qkv=ckpt.cat([n + ".bias" for n in names], dt, device) if ckpt.has(names[0] + ".bias") else None,
            q_norm=1.0 + ckpt.get(a + "q_norm.weight", torch.float32, device),
            k_norm=1.0 + ckpt.get(a + "k_norm.weight", torch.float32, device),
            w_o=ckpt.get(a + "o_proj.weight", dt, device),
            mlp=self._mlp(ckpt, p, device),
        )

    @staticmethod
    def _quantize(layer: DeltaNetLayer | AttentionLayer, platform: Platform) -> None:
        """Quantized weights for every projection (CPU); norms, convolution and decay parameters stay."""
        names = ("w_in", "w_out") if isinstance(layer, DeltaNetLayer) else ("w_qkv", "w_o")
        for name in names:
            setattr(layer, name, platform.quantize_weight(getattr(layer, name)))
        layer.mlp = MLP(platform.quantize_weight(layer.mlp.w_gate_up), platform.quantize_weight(layer.mlp.w_down))

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin `[T, rotary_dim]` (float32) of text positions."""
        cos, sin = self.rotary(torch.empty(0, device=positions.device), positions[None])
        return cos[0], sin[0]

    def rope_sections(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin `[T, rotary_dim]` (float32) of positions per section `[3, T]` (time, height, width: an
        image's tokens), interleaved as Qwen3.5's multimodal rotary embedding does: frequency i takes the height's
        position where i % 3 == 1, the width's where i % 3 == 2 (within their sections), else the time's."""
        freqs = positions[..., None].float() * self.rotary.inv_freq.to(positions.device)  # [3, T, R/2]
        mixed = freqs[0].clone()
        for dim in (1, 2):
            idx = slice(dim, self.mrope_section[dim] * 3, 3)
            mixed[..., idx] = freqs[dim, ..., idx]
        emb = torch.cat((mixed, mixed), dim=-1)
        return emb.cos() * self.rotary.attention_scaling, emb.sin() * self.rotary.attention_scaling

    def encode_image(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        if self.visual is None:
            return super().encode_image(pixel_values, grid_thw)
        return self.visual(pixel_values.to(self.platform.first_device), grid_thw)

    def encode_image_steps(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        if self.visual is None:
            return super().encode_image(pixel_values, grid_thw)
        return (yield from self.visual.steps(pixel_values.to(self.platform.first_device), grid_thw))

    # ---- caches ------------------------------------------------------------------------------------
    def cache_specs(self) -> list:
        attn = tuple(i for i, t in enumerate(self.layer_types) if t == "full_attention")
        delta = tuple(i for i, t in enumerate(self.layer_types) if t == "linear_attention")
        specs: list = []
        if attn:
            specs.append(PagedAttentionSpec(attn, self.kv_heads, self.head_dim, self.platform.dtype))
        if delta:
            specs.append(RecurrentStateSpec(
                delta, (("conv", (self.conv_dim, self.kernel - 1)), ("ssm", (self.hv, self.dk, self.dv))),
                self.platform.state_dtype))
        return specs

    def tensors(self) -> list:
        out = [self.embed, self.norm, self.lm_head] + (self.visual.tensors() if self.visual is not None else [])
        for layer in self.layers:
            out += [getattr(layer, f) for f in layer.__dataclass_fields__ if f not in ("device", "mlp")]
            out += [layer.mlp.w_gate_up, layer.mlp.w_down]
        return out

    # ---- forward -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, caches: Caches) -> torch.Tensor:
        T = batch.num_tokens
        act = self.platform.compute_dtype(T)
        if self.embed is None:
            x = self.lm_head.rows(batch.token_ids.to(self.platform.first_device)).to(act)
        else:
            x = F.embedding(batch.token_ids.to(self.platform.first_device), self.embed).to(act)
        for row, e in batch.embeds:  # an image's encoding in place of its placeholder tokens
            x[row: row + e.shape[0]] = e.to(device=x.device, dtype=x.dtype)
        mlp_out = None  # each layer's MLP output, added to the residual stream by the next layer's first norm
        for li, layer in enumerate(self.layers):
            if x.device != layer.device:
                x = x.to(layer.device)
                mlp_out = mlp_out.to(layer.device) if mlp_out is not None else None
            m = batch.on(layer.device)
            h, x = self._add_norm(x, mlp_out, layer.ln1)
            if isinstance(layer, DeltaNetLayer):
                mixed = self._delta_net(h, layer, caches.states[li], batch, m)
            else:
                mixed = self._attention(h, layer, caches.kv.k[li], caches.kv.v[li], m)
            h, x = self._add_norm(x, mixed, layer.ln2)
            mlp_out = self.linear(self._silu_mul(self.linear(h, layer.mlp.w_gate_up)), layer.mlp.w_down)
        x = (x + mlp_out).to(self.output_device)
        rows = batch.logit_rows.to(self.output_device)
        h = _zc_norm(x[rows], self.norm, self.eps)
        if isinstance(self.lm_head, Quantized):
            return self.linear(h, self.lm_head).float()
        return self.logits(h.to(self.platform.dtype), self.lm_head)

    def _add_norm(self, x: torch.Tensor, residual: torch.Tensor | None, w1: torch.Tensor):
        """(zero-centred RMSNorm of x + residual, x + residual): one fused operator for decode rows."""
        if self.fused and x.shape[0] in KERNEL_ROWS and x.dtype in (torch.bfloat16, torch.float32):
            return torch.ops.qwen.add_rms_norm_f32w(x, None if residual is None else residual.contiguous(), w1,
                                                    self.eps)
        if residual is not None:
            x = x + residual
        return _zc_norm(x, w1, self.eps), x

    def _attention(self, h: torch.Tensor, layer: AttentionLayer, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   m: DeviceBatch) -> torch.Tensor:
        from ..attention import paged_attention

        T = h.shape[0]
        H, KV, D = self.num_heads, self.kv_heads, self.head_dim
        qkv = self.linear(h, layer.w_qkv, layer.b_qkv)
        qg = qkv[:, : 2 * H * D].view(T, H, 2 * D)
        q, gate = qg[..., :D], qg[..., D:].reshape(T, H * D)
        k = qkv[:, 2 * H * D: (2 * H + KV) * D].view(T, KV, D)
        v = qkv[:, (2 * H + KV) * D:].view(T, KV, D)
        q = _zc_norm(q, layer.q_norm, self.eps)
        k = _zc_norm(k, layer.k_norm, self.eps)
        if "rope" not in m.extra:
            m.extra["rope"] = self.rope(m.positions) if m.mrope is None else self.rope_sections(m.mrope)
        cos, sin = m.extra["rope"]
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        out = paged_attention(q, k, v, k_cache, v_cache, m.attention)
        return self.linear(out * torch.sigmoid(gate), layer.w_o)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding on the first `rotary_dim` dimensions of each head; the rest pass through."""
        R = self.rotary_dim
        rot = x[..., :R].float()
        half = R // 2
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        out = rot * cos[:, None, :] + rotated * sin[:, None, :]
        return torch.cat((out.to(x.dtype), x[..., R:]), dim=-1)

    def _delta_net(self, h: torch.Tensor, layer: DeltaNetLayer, state: dict[str, torch.Tensor],
                   batch: ForwardBatch, m: DeviceBatch) -> torch.Tensor:
        proj = self.linear(h, layer.w_in)
        conv_state, ssm = state["conv"], state["ssm"]
        slots = m.state_slots
        B = batch.num_decode
        parts = []
        if B:
            parts.append(self.delta_decode(proj[:B], conv_state, layer.conv, ssm, slots[:B], layer.neg_a,
                                           layer.dt_bias, layer.norm, self.hk, self.eps))
        if batch.segments:
            parts.append(self._delta_prompts(proj, layer, conv_state, ssm, batch, slots))
        return self.linear(parts[0] if len(parts) == 1 else torch.cat(parts), layer.w_out)

    def _delta_prompts(self, proj: torch.Tensor, layer: DeltaNetLayer, conv_state: torch.Tensor, ssm: torch.Tensor,
                       batch: ForwardBatch, slots: torch.Tensor) -> torch.Tensor:
        """The prompt chunks of a step (rows after the decode rows): each by the chunked delta rule from the state
        its previous chunk left. Returns their gated, normed outputs `[rows, Hv*Dv]`."""
        B, T = batch.num_decode, proj.shape[0]
        C, vd, hv = self.conv_dim, self.value_dim, self.hv
        rows = proj[B:]
        beta = torch.sigmoid(rows[:, C + vd: C + vd + hv].float())
        g = layer.neg_a * F.softplus(rows[:, C + vd + hv:].float() + layer.dt_bias)  # log of the per-token decay
        core = torch.empty(T - B, hv, self.dv, dtype=torch.float32, device=proj.device)
        for j, (start, n) in enumerate(batch.segments):
            slot = slots[B + j: B + j + 1]
            seq = torch.cat((conv_state[slot][0], proj[start: start + n, :C].float().t()), dim=-1)  # [C, K-1+n]
            conv_state[slot] = seq[:, -(self.kernel - 1):][None]
            qkv = F.silu(F.conv1d(seq[None], layer.conv[:, None, :], groups=C)[0].t())  # [n, C]
            q, k, v = split_heads(qkv, self.hk, self.dk, hv, self.dv)
            at = start - B
            core[at: at + n], s = self._chunked(q, k, v, g[at: at + n], beta[at: at + n], ssm[slot][0])
            ssm[slot] = s[None]
            row = batch.state_saves.get(j)
            if row is not None:  # a checkpoint of this layer's state where the segment ends
                conv_state[row] = conv_state[slot][0]
                ssm[row] = s
        return gated_norm(core, rows[:, C: C + vd], layer.norm, self.eps)

    @staticmethod
    def _chunked(q, k, v, g, beta, state: torch.Tensor, chunk: int = DELTA_CHUNK):
        """The gated delta rule over one sequence's `n` tokens from `state` `[Hv, Dk, Dv]`: within chunks of 64
        tokens by the UT transform, across chunks by a scan. Returns `[n, Hv, Dv]` and the final state."""
        n = q.shape[0]
        q, k, v = (x.transpose(0, 1) for x in (q, k, v))  # [H, n, D]
        beta, g = beta.t(), g.t()  # [H, n]
        pad = (chunk - n % chunk) % chunk
        if pad:
            q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
            beta, g = F.pad(beta, (0, pad)), F.pad(g, (0, pad))
        H = q.shape[0]
        nc = q.shape[1] // chunk
        v_beta = v * beta[..., None]
        k_beta = k * beta[..., None]
        q, k, k_beta, v_beta = (x.reshape(H, nc, chunk, x.shape[-1]) for x in (q, k, k_beta, v_beta))
        g = g.reshape(H, nc, chunk).cumsum(dim=-1)
        upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
        decay = (g[..., :, None] - g[..., None, :]).masked_fill(upper, float("-inf")).exp()
        ut = (k_beta @ k.transpose(-1, -2)) * decay
        intra = (q @ k.transpose(-1, -2)) * decay
        new_v = torch.linalg.solve_triangular(ut, v_beta, upper=False, unitriangular=True)
        k_cum = torch.linalg.solve_triangular(ut, k_beta * g.exp()[..., None], upper=False, unitriangular=True)
        q = q * g.exp()[..., None]
        k = k * (g[..., -1:] - g).exp()[..., None]
        chunk_decay = g[..., -1].exp()[..., None, None]
        out = torch.empty_like(new_v)
        s = state
        for i in range(nc):
            vi = new_v[:, i] - k_cum[:, i] @ s
            out[:, i] = q[:, i] @ s + intra[:, i] @ vi
            s = s * chunk_decay[:, i] + k[:, i].transpose(-1, -2) @ vi
        return out.reshape(H, nc * chunk, -1)[:, :n].transpose(0, 1), s

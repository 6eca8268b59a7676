"""`qwen-model make-random`: random-weight models of Qwen2.5's exact architectures, with a byte-level BPE
tokenizer that has Qwen's special tokens at Qwen's ids and the Qwen2.5 chat template.

Weights are written tensor by tensor into safetensors shards, so even the 7B preset never needs its whole
size in memory. Every regular token decodes to visible text; ids that would not (lone bytes, control
characters, unused embedding rows) are listed in `generation_config.json`'s `suppress_tokens`, which the
engine honours, so a random model's replies are always printable.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from .templates import QWEN25_CHAT_TEMPLATE

# Qwen2's own special tokens, at Qwen2's ids.
QWEN_FIRST_SPECIAL_ID = 151643
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
# which of them are "special" (skipped when decoding with skip_special_tokens), as in Qwen's tokenizer
QWEN_NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"}
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645

QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    default_dtype: str


PRESETS: dict[str, Preset] = {
    "tiny": Preset(64, 2, 4, 2, 128, 151936, True, 4096, "float32"),
    "qwen2.5-0.5b": Preset(896, 24, 14, 2, 4864, 151936, True, 32768, "bfloat16"),
    "qwen2.5-1.5b": Preset(1536, 28, 12, 2, 8960, 151936, True, 32768, "bfloat16"),
    "qwen2.5-7b": Preset(3584, 28, 28, 4, 18944, 152064, False, 32768, "bfloat16"),
}

SHARD_BYTES = 2 * 1024**3


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-character map used by byte-level BPE (Qwen's too)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_vocab(n_regular: int, seed: int = 0) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary of `n_regular` tokens: the 256 bytes, then pairs and triples of
    printable ASCII (optionally after a space), each merge built from tokens made by earlier merges."""
    b2u = bytes_to_unicode()
    vocab: dict[str, int] = {}
    for b in range(256):
        vocab[b2u[b]] = len(vocab)
    merges: list[tuple[str, str]] = []
    space = b2u[ord(" ")]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    printable = [b2u[c] for c in range(33, 127)]
    rng = random.Random(seed)

    def add(left: str, right: str) -> None:
        tok = left + right
        if tok not in vocab and len(vocab) < n_regular:
            vocab[tok] = len(vocab)
            merges.append((left, right))

    # level 2: space+char, char+char
    for c in printable:
        add(space, c)
    pairs = [(a, b) for a in printable for b in printable]
    rng.shuffle(pairs)
    for a, b in pairs:
        add(a, b)
    # level 3+: extend existing tokens by a letter until the vocabulary is full
    frontier = [t for t in vocab if len(t) == 2]
    while len(vocab) < n_regular:
        rng.shuffle(frontier)
        grown = []
        for tok in frontier:
            for c in rng.sample(letters, 8):
                if len(vocab) >= n_regular:
                    break
                before = len(vocab)
                add(tok, c)
                if len(vocab) > before:
                    grown.append(tok + c)
            if len(vocab) >= n_regular:
                break
        frontier = grown
    return vocab, merges


def _visible(text: str) -> bool:
    if not text.strip() or "\ufffd" in text:
        return False
    return all(unicodedata.category(ch)[0] != "C" for ch in text)


def make_tokenizer(out: Path, vocab_size: int, max_len: int) -> list[int]:
    """Write a Qwen2-style tokenizer into `out`; return the ids that do not decode to visible text."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import AddedToken as TkAddedToken
    from transformers import PreTrainedTokenizerFast

    vocab, merges = build_vocab(QWEN_FIRST_SPECIAL_ID)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [TkAddedToken(t, special=t not in QWEN_NOT_SPECIAL, normalized=False) for t in QWEN_SPECIAL_TOKENS]
    )
    for i, t in enumerate(QWEN_SPECIAL_TOKENS):
        assert tok.token_to_id(t) == QWEN_FIRST_SPECIAL_ID + i, t
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=max_len,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    fast.chat_template = QWEN25_CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    # Qwen's tokenizer class, so AutoTokenizer behaves as with the real models
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg["errors"] = "replace"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))

    suppressed = [i for i in range(QWEN_FIRST_SPECIAL_ID) if not _visible(tok.decode([i]))]
    n_special = len(QWEN_SPECIAL_TOKENS)
    # special tokens other than the end markers, and embedding rows past the last token, never decode to text
    suppressed += [QWEN_FIRST_SPECIAL_ID + i for i in range(n_special) if QWEN_FIRST_SPECIAL_ID + i not in (ENDOFTEXT_ID, IM_END_ID)]
    suppressed += list(range(QWEN_FIRST_SPECIAL_ID + n_special, vocab_size))
    return suppressed


def _config(preset: Preset, dtype: str) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "attention_dropout": 0.0,
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": IM_END_ID,
        "hidden_act": "silu",
        "hidden_size": preset.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": preset.intermediate_size,
        "max_position_embeddings": preset.max_position_embeddings,
        "max_window_layers": preset.num_hidden_layers,
        "num_attention_heads": preset.num_attention_heads,
        "num_hidden_layers": preset.num_hidden_layers,
        "num_key_value_heads": preset.num_key_value_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "use_sliding_window": False,
        "tie_word_embeddings": preset.tie_word_embeddings,
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
        "vocab_size": preset.vocab_size,
    }


def _tensor_shapes(preset: Preset) -> list[tuple[str, tuple[int, ...]]]:
    h, i = preset.hidden_size, preset.intermediate_size
    hd = h // preset.num_attention_heads
    kv = preset.num_key_value_heads * hd
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (preset.vocab_size, h))]
    for n in range(preset.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.q_proj.bias", (h,)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.k_proj.bias", (kv,)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.bias", (kv,)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    shapes.append(("model.norm.weight", (h,)))
    if not preset.tie_word_embeddings:
        shapes.append(("lm_head.weight", (preset.vocab_size, h)))
    return shapes


def _write_weights(out: Path, preset: Preset, dtype: str, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    tdtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    shapes = _tensor_shapes(preset)
    itemsize = torch.tensor([], dtype=tdtype).element_size()
    total = sum(_numel(s) for _, s in shapes) * itemsize
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = _numel(shape) * itemsize
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    shape_of = dict(shapes)
    weight_map: dict[str, str] = {}
    single = len(shards) == 1
    for idx, names in enumerate(shards):
        fname = "model.safetensors" if single else f"model-{idx + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            shape = shape_of[name]
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=torch.float32)
            elif name.endswith("embed_tokens.weight") or name.endswith("lm_head.weight") or name.endswith(".bias"):
                t = torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02
            else:
                # projections at 1/sqrt(fan_in): every layer moves the residual stream, so a random model's
                # next token depends on the whole context instead of echoing the last embedding
                t = torch.randn(shape, generator=gen, dtype=torch.float32) * shape[-1] ** -0.5
            tensors[name] = t.to(tdtype)
            weight_map[name] = fname
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        os.chmod(out / fname, 0o644)
        del tensors
    if not single:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def make_random_model(preset_name: str, out: Path, dtype: str | None = None, seed: int = 0) -> Path:
    """Write a random-weight model of `preset_name` into `out` (made atomically: a temporary folder renamed)."""
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
        suppressed = make_tokenizer(tmp, preset.vocab_size, preset.max_position_embeddings)
        (tmp / "config.json").write_text(json.dumps(_config(preset, dtype), indent=2))
        gen_cfg = {
            "bos_token_id": ENDOFTEXT_ID,
            "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
            "pad_token_id": ENDOFTEXT_ID,
            "suppress_tokens": suppressed,
        }
        (tmp / "generation_config.json").write_text(json.dumps(gen_cfg))
        _write_weights(tmp, preset, dtype, seed)
        (tmp / "RANDOM_WEIGHTS.md").write_text(
            f"Random weights in the {preset_name} architecture, made by `qwen-model make-random`. "
            "Its replies are random tokens: use it to test and to benchmark, not to chat.\n"
        )
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

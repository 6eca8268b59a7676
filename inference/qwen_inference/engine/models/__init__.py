"""Model families, one module each, behind one interface (`base.CausalLM`), found by `model_type`.

A new architecture is a new module here and a line in `FAMILIES`, with its parity test against transformers.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from ..platform import Platform
from ..weights import UnsupportedModel
from .base import CausalLM, ForwardBatch
from .rope import scale

# model_type -> "module:Class"
FAMILIES: dict[str, str] = {
    "qwen2": "dense:DenseDecoder",
    "qwen3": "dense:DenseDecoder",
    "llama": "dense:DenseDecoder",
    "qwen3_5": "qwen3_5:Qwen3_5Decoder",
    "qwen3_5_text": "qwen3_5:Qwen3_5Decoder",
}
# known to exist, refused with a reason rather than "unknown"
REFUSED: dict[str, str] = {
    "qwen3_5_moe": "Qwen3.5 mixture-of-experts models are not supported yet (the dense Qwen3.5 sizes are)",
    "qwen3_moe": "Qwen3 mixture-of-experts models are not supported yet (the dense Qwen3 sizes are)",
    "qwen2_moe": "Qwen2 mixture-of-experts models are not supported",
}


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def model_type_of(folder: Path) -> str:
    path = Path(folder) / "config.json"
    try:
        return str(json.loads(path.read_text())["model_type"])
    except FileNotFoundError:
        raise UnsupportedModel(f"{folder} has no config.json") from None
    except (ValueError, KeyError, TypeError):
        raise UnsupportedModel(f"{path} is not a model configuration (no model_type)") from None


def family(model_type: str) -> type[CausalLM]:
    supported = f"supported: {', '.join(supported_model_types())}"
    if model_type in REFUSED:
        raise UnsupportedModel(f"model type {model_type!r}: {REFUSED[model_type]} ({supported})")
    if model_type not in FAMILIES:
        raise UnsupportedModel(f"model type {model_type!r} is not supported ({supported})")
    module, cls = FAMILIES[model_type].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def load_model(folder: Path, platform: Platform, rope_scaling: dict | None = None, images: bool = True) -> CausalLM:
    """Read the model in `folder` onto `platform` with the family its `model_type` names; `rope_scaling` (transformers'
    rope parameters: rope_type, factor, ...) replaces the scaling its config.json gives, if any. `images` False:
    a vision tower is not read (the model then takes text only)."""
    from transformers import AutoConfig

    cls = family(model_type_of(folder))  # before transformers reads a config it may not know
    platform.use_huge_pages()  # before the weights are allocated
    config = AutoConfig.from_pretrained(str(folder))
    if rope_scaling:
        scale(config.get_text_config(), rope_scaling)
    if not images and getattr(config, "vision_config", None) is not None:
        config.vision_config = None
    return cls(Path(folder), config, platform)


__all__ = ["CausalLM", "FAMILIES", "ForwardBatch", "UnsupportedModel", "family", "load_model",
           "supported_model_types"]

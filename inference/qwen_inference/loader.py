"""Loading a model into an engine: resolve the folder, pick device, dtype and threads, size the KV cache."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .settings import ServeSettings

log = logging.getLogger("qwen_inference.loader")

DEFAULT_MAX_MODEL_LEN = 8192


@dataclass
class LoadedModel:
    path: Path
    tokenizer: Any
    engine: Any
    max_model_len: int
    dtype: str
    device: str
    eos_token_ids: set[int]
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    images: Any = None  # `images.ImageInput` for a model that reads images (and --max-images above 0)


def _generation_config(path: Path) -> dict[str, Any]:
    p = path / "generation_config.json"
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        log.warning("ignoring unreadable %s", p)
        return {}


def _ids(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


def load(settings: ServeSettings, metrics=None) -> LoadedModel:
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    from .engine import Engine
    from .engine.cache import plan_caches
    from .engine.models import family, load_model, model_type_of
    from .engine.platform import Platform
    from .modelcache import ModelCacheError, resolve

    threads = settings.effective_threads
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set in this process
    def supported(folder: Path) -> None:  # an unsupported architecture fails first, before anything is read
        if (folder / "config.json").is_file():
            family(model_type_of(folder))

    path = resolve(settings.model, settings.model_cache_dir, settings.revision, check=supported)
    platform = Platform.resolve(settings.device, settings.dtype, settings.quantize)
    log.info("loading %s from %s on %s (%s, %d threads%s; %s)", settings.model, path,
             ",".join(str(d) for d in platform.devices), platform.dtype_name(), threads,
             ", 2 MiB pages" if platform.use_huge_pages() else "", platform.kernels_in_use())
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001: a tokenizer file that does not parse, or does not describe a tokenizer
        raise ModelCacheError(f"{path}: the tokenizer does not load ({type(exc).__name__}: {exc})") from None
    if not getattr(tokenizer, "chat_template", None):
        from .templates import QWEN25_CHAT_TEMPLATE

        log.warning("the tokenizer has no chat template; using Qwen2.5's ChatML template")
        tokenizer.chat_template = QWEN25_CHAT_TEMPLATE
    scaling = settings.rope_scaling.parameters() if settings.rope_scaling is not None else None
    model = load_model(path, platform, scaling, images=settings.max_images > 0)
    images = None
    if model.image_token_id is not None:
        from .images import ImageProcessor
        from .multimodal import ImageInput

        images = ImageInput(ImageProcessor.from_folder(path), model.image_token_id, settings.max_images,
                            settings.max_image_bytes)
        log.info("images: up to %d a request (%s)", settings.max_images, images.describe())
        # the image processor's import takes a second or more: in the background, not before the model serves
        threading.Thread(target=images.processor.load, name="image-processor", daemon=True).start()
    if scaling is not None:
        log.info("rope scaling %s: the model takes %d positions", json.dumps(scaling), model.max_position_embeddings)
    model_max = model.max_position_embeddings or DEFAULT_MAX_MODEL_LEN
    if settings.max_model_len is not None and settings.max_model_len > model_max:
        raise ValueError(f"--max-model-len {settings.max_model_len} exceeds the model's {model_max} positions")
    max_model_len = settings.max_model_len or min(model_max, DEFAULT_MAX_MODEL_LEN)

    checkpoints = settings.state_checkpoints if settings.state_checkpoints is not None else settings.max_concurrency
    plan = plan_caches(model.cache_specs(), budget=platform.cache_budget(), max_concurrency=settings.max_concurrency,
                       max_model_len=max_model_len, kv_tokens=settings.kv_cache_tokens,
                       checkpoints=checkpoints if settings.prefix_caching else 0)
    log.info("caches: KV %d tokens (%.1f MiB), recurrent state %d sequences and %d checkpoints (%.1f MiB)",
             plan.kv_tokens, plan.kv_bytes / 2**20, plan.state_slots, plan.checkpoints, plan.state_bytes / 2**20)

    gen = _generation_config(path)
    eos = _ids(gen.get("eos_token_id")) | _ids(tokenizer.eos_token_id)
    defaults = {k: gen[k] for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty") if k in gen}
    if gen.get("do_sample") is False:
        defaults["temperature"] = 0.0
    engine = Engine(
        model,
        max_concurrency=settings.max_concurrency,
        max_queue=settings.max_queue,
        max_model_len=max_model_len,
        kv_cache_tokens=plan.kv_tokens,
        prefill_chunk=settings.prefill_chunk,
        eos_token_ids=eos,
        suppress_token_ids=gen.get("suppress_tokens") or None,
        default_seed=settings.seed,
        metrics=metrics,
        prefix_caching=settings.prefix_caching,
        state_checkpoints=plan.checkpoints,
    )
    return LoadedModel(
        path=path,
        tokenizer=tokenizer,
        engine=engine,
        max_model_len=max_model_len,
        dtype=platform.dtype_name(),
        device=platform.describe(),
        eos_token_ids=eos,
        generation_defaults=defaults,
        images=images,
    )

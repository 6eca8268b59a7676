"""The engine's rotary embedding against each model's own rotary class in transformers, for every rope type, and
through whole models with rope scaling in their config.json (as the Qwen model cards tell users to add it)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from qwen_inference.engine.models import load_model
from qwen_inference.engine.models.rope import RotaryEmbedding, max_positions, scale
from qwen_inference.engine.platform import Platform
from qwen_inference.engine.weights import CheckpointError, UnsupportedModel

from .test_engine import prompt_logits

MAX_POSITIONS = 64
ROPE_TYPES = {
    "default": {},
    "linear": {"factor": 2.0},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": MAX_POSITIONS // 4},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": MAX_POSITIONS // 4},
}
CHANGING = {  # refused: their frequencies change with each call's length
    "dynamic": {"factor": 2.0},
    "longrope": {"short_factor": [1.0] * 8, "long_factor": [1.0 + i for i in range(8)],
                 "original_max_position_embeddings": MAX_POSITIONS // 4},
}
# within the positions, past them, further on, back
POSITION_RUNS = [(0, 10), (0, 3 * MAX_POSITIONS), (2 * MAX_POSITIONS, 4 * MAX_POSITIONS), (0, 20)]


def _model_class(model_type):
    if model_type == "qwen2":
        from transformers import Qwen2Config as Config
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding as Rotary
    elif model_type == "qwen3":
        from transformers import Qwen3Config as Config
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding as Rotary
    else:
        from transformers import LlamaConfig as Config
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as Rotary
    return Config, Rotary


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "llama"])
@pytest.mark.parametrize("rope_type", list(ROPE_TYPES))
def test_tables_equal_the_models_own_rotary_class(model_type, rope_type):
    Config, Rotary = _model_class(model_type)
    config = Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    max_position_embeddings=MAX_POSITIONS,
                    rope_parameters={"rope_type": rope_type, "rope_theta": 10000.0, **ROPE_TYPES[rope_type]})
    ours, theirs = RotaryEmbedding(config), Rotary(config)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.zeros(1, dtype=dtype)
        for lo, hi in POSITION_RUNS:
            positions = torch.arange(lo, hi)[None]
            cos, sin = ours(x, positions)
            ref_cos, ref_sin = theirs(x, positions)
            assert cos.dtype == dtype and cos.shape == (1, hi - lo, 16)
            assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin), (rope_type, lo, hi)


def test_a_rope_type_transformers_does_not_know_is_refused_by_name():
    from transformers import Qwen2Config

    config = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config.rope_parameters = {"rope_type": "spiral", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(UnsupportedModel, match="rope type 'spiral' is not one transformers knows .*yarn"):
        RotaryEmbedding(config)


@pytest.mark.parametrize("rope_type", list(CHANGING))
def test_the_rope_types_that_change_with_each_call_are_refused(rope_type):
    """Their frequencies follow the length of each call (transformers': one per sequence), which prompt chunks and
    batches would change: a reply would depend on its neighbours. Refused, the way out named."""
    from transformers import Qwen2Config

    config = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=MAX_POSITIONS,
                         rope_parameters={"rope_type": rope_type, "rope_theta": 10000.0, **CHANGING[rope_type]})
    with pytest.raises(UnsupportedModel, match=f"rope type '{rope_type}' is not supported: .*--rope-scaling"):
        RotaryEmbedding(config)


@pytest.mark.parametrize("rope", [{"rope_type": "default"}, {"rope_type": "yarn", "factor": 4.0,
                                                               "original_max_position_embeddings": 1024}])
def test_qwen3_5_frequencies_equal_its_own_rotary_class(rope):
    """Qwen3.5 rotates a quarter of each head: the same frequencies and scaling as its own class, over that part."""
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding

    config = Qwen3_5TextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                               max_position_embeddings=4096,
                               rope_parameters={"rope_theta": 1e7, "partial_rotary_factor": 0.25,
                                                "mrope_section": [3, 3, 2], "mrope_interleaved": True, **rope})
    ours, theirs = RotaryEmbedding(config), Qwen3_5TextRotaryEmbedding(config)
    assert ours.inv_freq.shape == (8,) and torch.equal(ours.inv_freq, theirs.inv_freq)
    assert ours.attention_scaling == theirs.attention_scaling
    assert (ours.attention_scaling != 1.0) == (rope["rope_type"] == "yarn")


def edited(model, folder, change):
    """`model` in `folder` (its weights linked, not copied) with `change(config)` applied to its config.json."""
    for f in model.iterdir():
        if f.name != "config.json":
            (folder / f.name).symlink_to(f)
    config = json.loads((model / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module", params=["yarn", "linear"])
def scaled_model(request, tiny_model, tmp_path_factory):
    """The tiny model with rope scaling added to its config.json, 32 positions."""
    def change(config):
        config["max_position_embeddings"] = 32
        config["rope_scaling"] = {"rope_type": request.param, "factor": 4.0,
                                  **({"original_max_position_embeddings": 8} if request.param == "yarn" else {})}
    return edited(tiny_model, tmp_path_factory.mktemp(f"tiny-{request.param}"), change)


def test_scaled_models_prompt_logits_match_transformers(scaled_model):
    """A prompt past the model's 32 positions gives transformers' logits."""
    from transformers import AutoModelForCausalLM

    ours = load_model(scaled_model, Platform.cpu(torch.float32))
    assert ours.rotary[torch.device("cpu")].rope_type == json.loads((scaled_model / "config.json").read_text())[
        "rope_scaling"]["rope_type"]
    hf = AutoModelForCausalLM.from_pretrained(str(scaled_model), dtype=torch.float32).eval()
    ids = list(range(700, 748))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    got = prompt_logits(ours, ids)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}


@pytest.mark.parametrize("preset", ["tiny_model", "tiny_qwen35_text_model"])
def test_an_override_gives_the_logits_of_a_config_that_says_so(preset, request, tmp_path):
    """`--rope-scaling` on a model equals transformers on the same model whose config.json says so, and it changes
    the logits (the override reaches the rotary tables)."""
    from transformers import AutoModelForCausalLM

    model = request.getfixturevalue(preset)
    slots = 1 if "qwen35" in preset else 0

    def change(config):
        if "rope_parameters" in config:  # Qwen3.5: its sections and rotated quarter stay
            config["rope_parameters"] = {**config["rope_parameters"], **YARN}
        else:
            config["rope_scaling"] = YARN

    said = edited(model, tmp_path, change)
    ours = load_model(model, Platform.cpu(torch.float32), dict(YARN))
    plain = load_model(model, Platform.cpu(torch.float32))
    assert ours.max_position_embeddings == 64 and plain.max_position_embeddings == 4096
    hf = AutoModelForCausalLM.from_pretrained(str(said), dtype=torch.float32).eval()
    ids = list(range(900, 948))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    got = prompt_logits(ours, ids, state_slots=slots)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()
    assert not torch.allclose(prompt_logits(plain, ids, state_slots=slots), ref, atol=1e-3, rtol=1e-3)


def test_positions_under_each_scaling():
    from transformers import Qwen3Config

    def positions(**rope):
        config = Qwen3Config(max_position_embeddings=40960, rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
        if rope:
            scale(config, rope)
        return max_positions(config)

    assert positions() == 40960
    assert positions(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768) == 131072  # Qwen3's card
    assert positions(rope_type="yarn", factor=2.0) == 81920
    assert positions(rope_type="linear", factor=2.0) == 81920
    assert positions(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0) == 40960


@pytest.mark.parametrize("preset", ["tiny_model", "tiny_qwen35_text_model"])
def test_a_model_whose_config_says_dynamic_is_refused_before_its_weights_are_read(preset, request, tmp_path):
    def change(config):
        if "rope_parameters" in config:
            config["rope_parameters"] = {**config["rope_parameters"], "rope_type": "dynamic", "factor": 2.0}
        else:
            config["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}

    folder = edited(request.getfixturevalue(preset), tmp_path, change)
    for f in folder.glob("*.safetensors"):
        f.unlink()  # nothing to read: the refusal comes first
    with pytest.raises(UnsupportedModel, match="rope type 'dynamic' is not supported"):
        load_model(folder, Platform.cpu(torch.float32))
    # --rope-scaling serves it in its place: the weights are read (and found missing) only then
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        load_model(folder, Platform.cpu(torch.float32), {"rope_type": "yarn", "factor": 2.0})


def test_loading_a_model_imports_no_modeling_module(tiny_model, tiny_qwen35_model):
    """Loading a model (weights, rotary tables) imports no model's modeling module from transformers, which would
    add about two seconds to every server's start. (`auto.modeling_auto`, a table of names, imports none.)"""
    code = (
        "import sys, torch\n"
        "from qwen_inference.engine.models import load_model\n"
        "from qwen_inference.engine.platform import Platform\n"
        "for m in sys.argv[1:]:\n"
        "    load_model(m, Platform.cpu(torch.float32))\n"
        "print([m for m in sys.modules if m.startswith('transformers.models.') and '.modeling_' in m\n"
        "       and not m.startswith('transformers.models.auto.')])\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tiny_model), str(tiny_qwen35_model)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"

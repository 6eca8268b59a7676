from __future__ import annotations

import json

import pytest
import torch

from qwen_inference.random_model import (
    IM_END_ID,
    IM_START_ID,
    ENDOFTEXT_ID,
    PRESETS,
    _config,
    _tensor_shapes,
    make_random_model,
)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_tensor_shapes_match_transformers_qwen2(preset):
    """The shards we write have exactly the parameters transformers' Qwen2 has for that config."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    p = PRESETS[preset]
    cfg = Qwen2Config(**{k: v for k, v in _config(p, "float32").items() if k not in ("architectures", "dtype", "torch_dtype")})
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if p.tie_word_embeddings:
        expected.pop("lm_head.weight")
    assert dict(_tensor_shapes(p)) == expected


def test_qwen25_05b_preset_is_the_real_architecture():
    p = PRESETS["qwen2.5-0.5b"]
    assert (p.hidden_size, p.num_hidden_layers, p.num_attention_heads, p.num_key_value_heads,
            p.intermediate_size, p.vocab_size, p.tie_word_embeddings) == (896, 24, 14, 2, 4864, 151936, True)
    n = sum(torch.Size(s).numel() for _, s in _tensor_shapes(p))
    assert 490e6 < n < 500e6


def test_tokenizer_has_qwens_special_tokens_and_template(tiny_tokenizer):
    assert tiny_tokenizer.convert_ids_to_tokens([ENDOFTEXT_ID, IM_START_ID, IM_END_ID]) == [
        "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    text = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                              add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                    "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == IM_START_ID and tiny_tokenizer.decode(ids) == text


def test_every_unsuppressed_id_decodes_to_visible_text(tiny_model, tiny_tokenizer):
    suppressed = set(json.loads((tiny_model / "generation_config.json").read_text())["suppress_tokens"])
    vocab = json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    allowed = [i for i in range(vocab) if i not in suppressed]
    assert len(allowed) > 150000
    for i in allowed[::97] + [ENDOFTEXT_ID, IM_END_ID]:
        text = tiny_tokenizer.decode([i], skip_special_tokens=False)
        assert text.strip() and "\ufffd" not in text, i


def test_refuses_a_non_empty_folder_and_bad_names(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("keep me")
    with pytest.raises(FileExistsError):
        make_random_model("tiny", tmp_path / "x")
    assert (tmp_path / "x" / "file").read_text() == "keep me"
    with pytest.raises(ValueError, match="unknown preset"):
        make_random_model("huge", tmp_path / "y")
    with pytest.raises(ValueError, match="unknown dtype"):
        make_random_model("tiny", tmp_path / "z", dtype="int4")
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()

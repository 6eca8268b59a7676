"""Constrained decoding over Qwen's real vocabularies: random and adversarial logits, masked, always give
output that validates."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
import torch

from bench import qwen_vocab
from bench.grammar import PROBES
from qwen_inference.detokenizer import IncrementalDetokenizer
from qwen_inference.reasoning import Thinking
from qwen_inference.structured import (
    Grammars,
    StructuredOutputError,
    allocate_bitmask,
    apply_bitmask,
    not_enforced,
)
from qwen_inference.toolcalls import OutputParser, parse_output, parse_tool_calls


@pytest.fixture(scope="module")
def qwen3():
    tok = qwen_vocab.load("qwen3")
    return tok, Grammars(tok, qwen_vocab.model_vocab_size("qwen3"))


@pytest.fixture(scope="module")
def qwen35():
    tok = qwen_vocab.load("qwen3.5")
    return tok, Grammars(tok, qwen_vocab.model_vocab_size("qwen3.5"))


def allowed_ids(bitmask_row: torch.Tensor, vocab: int) -> np.ndarray:
    bits = np.unpackbits(bitmask_row.numpy().view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)


class Sampler:
    """Random logits over every embedding row (a different shift of a pool of noise vectors each step), with
    padded rows and special tokens made the most likely, plus an optional bias; masked, then the argmax."""

    def __init__(self, tok, grammars: Grammars, seed: int, bias: torch.Tensor | None = None) -> None:
        self.g = grammars
        gen = torch.Generator().manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.pool = torch.randn(8, grammars.vocab_size, generator=gen)
        self.base = torch.zeros(grammars.vocab_size)
        self.base[len(tok):] = 50.0  # padded rows
        for i, t in tok.added_tokens_decoder.items():
            if t.special and i not in grammars.stop_token_ids:
                self.base[i] = 40.0  # special tokens that decoding would drop
        if bias is not None:
            self.base += bias

    def run(self, constraint, max_steps: int = 600, force: dict[int, int] | None = None) -> tuple[list[int], bool]:
        bitmask = allocate_bitmask(2, self.g.vocab_size)
        logits = torch.zeros(2, self.g.vocab_size)
        ids: list[int] = []
        try:
            for step in range(max_steps):
                noise = self.pool[self.rng.integers(len(self.pool))]
                torch.add(noise.roll(int(self.rng.integers(self.g.vocab_size))), self.base, out=logits[1])
                if force and step in force:
                    logits[1, force[step]] = 1e4
                constraint.fill_bitmask(bitmask, 1)
                apply_bitmask(logits, bitmask, [1])
                token = int(torch.argmax(logits[1]))
                assert torch.isfinite(logits[1, token]), "every token masked out"
                assert constraint.accept(token), token
                ids.append(token)
                if constraint.is_terminated() or token in self.g.stop_token_ids:
                    return ids, constraint.is_terminated()
            return ids, False
        finally:
            assert torch.equal(logits[0], torch.zeros(self.g.vocab_size))  # the other row is left alone


def text_of(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=True)


def structural_bias(tok, vocab: int, weight: float = 4.0) -> torch.Tensor:
    """Favour tokens that close strings and structures, so that unbounded strings end."""
    bias = torch.zeros(vocab)
    for i in range(len(tok)):
        piece = tok.decode([i])
        if any(c in piece for c in '"}],'):
            bias[i] = weight
    return bias


BOUNDED = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "status": {"enum": ["new", "open", "closed"]},
        "active": {"type": "boolean"},
        "born": {"type": "string", "format": "date"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city"],
        },
        "note": {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}]},
    },
    "required": ["id", "name", "age", "status", "address"],
}
REFS = {
    "$defs": {
        "item": {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[a-z]{3}$"},
                                                  "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                 "required": ["sku", "qty"]},
        "cat": {"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer", "maximum": 9,
                                                                                    "minimum": 0}},
                "required": ["kind", "lives"]},
        "dog": {"type": "object", "properties": {"kind": {"const": "dog"}, "good": {"type": "boolean"}},
                "required": ["kind", "good"]},
    },
    "type": "object",
    "properties": {
        "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1, "maxItems": 3},
        "pet": {"oneOf": [{"$ref": "#/$defs/cat"}, {"$ref": "#/$defs/dog"}]},
    },
    "required": ["items", "pet"],
}


@pytest.mark.parametrize("schema", [BOUNDED, REFS], ids=["bounded", "refs"])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_logits_answer_json_that_validates(qwen3, schema, seed):
    tok, g = qwen3
    factory = g.for_json_schema(schema, strict=True)
    assert factory.not_enforced == ()
    ids, terminated = Sampler(tok, g, seed).run(factory.new())
    assert terminated
    jsonschema.validate(json.loads(text_of(tok, ids)), schema)


def test_unbounded_strings_and_json_object_with_structure_seeking_logits(qwen3):
    tok, g = qwen3
    bias = structural_bias(tok, g.vocab_size)
    schema = {"type": "object", "properties": {"title": {"type": "string"}, "body": {"type": "string"},
                                               "n": {"type": "number"}}, "required": ["title", "body", "n"]}
    for factory, check in ((g.for_json_schema(schema), schema), (g.for_json_object(), {"type": "object"})):
        ids, terminated = Sampler(tok, g, 3, bias).run(factory.new())
        assert terminated
        jsonschema.validate(json.loads(text_of(tok, ids)), check)


def test_response_format(qwen3):
    tok, g = qwen3
    assert g.for_response_format({"type": "text"}) is None
    rf = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": BOUNDED}}
    ids, terminated = Sampler(tok, g, 5).run(g.for_response_format(rf).new())
    assert terminated
    jsonschema.validate(json.loads(text_of(tok, ids)), BOUNDED)
    factory = g.for_response_format({"type": "json_object"})
    assert factory.kind == "json_object"


def test_structured_outputs_regex_choice_grammar(qwen3):
    tok, g = qwen3
    factory = g.for_structured_outputs({"regex": r"[a-z]{2,6}-\d{2,4}( [A-Z]{1,5})?"})
    ids, terminated = Sampler(tok, g, 0).run(factory.new())
    assert terminated and re.fullmatch(r"[a-z]{2,6}-\d{2,4}( [A-Z]{1,5})?", text_of(tok, ids))

    factory = g.for_structured_outputs({"choice": ["red", "green", "blue", "green tea"]})
    for seed in range(3):
        ids, terminated = Sampler(tok, g, seed).run(factory.new())
        assert terminated and text_of(tok, ids) in {"red", "green", "blue", "green tea"}

    ebnf = 'root ::= expr\nexpr ::= term ("+" term){0,3}\nterm ::= [1-9] [0-9]{0,2} | "(" expr ")"'
    lark = 'start: expr\nexpr: term ("+" term)~0..3\nterm: /[1-9][0-9]{0,2}/ | "(" expr ")"'
    bias = torch.zeros(g.vocab_size)
    bias[tok.convert_tokens_to_ids("(")] = -5.0  # keep the nesting shallow
    for grammar in (ebnf, lark):
        ids, terminated = Sampler(tok, g, 1, bias).run(g.for_structured_outputs({"grammar": grammar}).new())
        text = text_of(tok, ids)
        assert terminated
        # a valid expression: balanced, numbers joined by +
        assert re.fullmatch(r"[0-9+()]+", text) and text.count("(") == text.count(")")
        eval(compile(text, "<expr>", "eval"), {})  # noqa: S307 - digits, + and parentheses only (checked above)

    ids, terminated = Sampler(tok, g, 2, structural_bias(tok, g.vocab_size)).run(
        g.for_structured_outputs({"json": json.dumps({"type": "array", "items": {"type": "integer"}})}).new())
    assert terminated and all(isinstance(x, int) for x in json.loads(text_of(tok, ids)))


WEATHER = {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 14}, "hourly": {"type": "boolean"}},
    "required": ["city", "unit"]}}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "properties": {"query": {"type": "string", "maxLength": 20},
                                     "limit": {"type": "integer", "minimum": 1, "maximum": 50}},
    "required": ["query"]}}}
NOW = {"type": "function", "function": {"name": "now"}}
TOOLS = [WEATHER, SEARCH, NOW]
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object", "properties": {},
                                                                    "additionalProperties": False}) for t in TOOLS}


def check_calls(calls, names):
    assert calls and all(c.name in names for c in calls)
    for c in calls:
        jsonschema.validate(json.loads(c.arguments), SCHEMAS[c.name])


@pytest.mark.parametrize(("vocab", "style"), [("qwen3", "hermes"), ("qwen35", "qwen3_5_xml"), ("qwen35", "hermes")])
@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_calls_in_the_models_format(request, vocab, style, parallel):
    tok, g = request.getfixturevalue(vocab)
    factory = g.for_tools(TOOLS, "required", parallel, style)
    ids, terminated = Sampler(tok, g, int(parallel)).run(factory.new())
    assert terminated
    # the markers are the single special tokens
    assert ids[0] == g.tool_call_start_id and g.tool_call_end_id in ids
    assert ids.count(g.tool_call_start_id) == ids.count(g.tool_call_end_id)
    content, calls = parse_tool_calls(text_of(tok, ids), style, TOOLS)
    assert content == ""
    check_calls(calls, {"get_weather", "search", "now"})
    if not parallel:
        assert len(calls) == 1


@pytest.mark.parametrize(("vocab", "style"), [("qwen3", "hermes"), ("qwen35", "qwen3_5_xml")])
def test_named_function(request, vocab, style):
    tok, g = request.getfixturevalue(vocab)
    factory = g.for_tools(TOOLS, {"type": "function", "function": {"name": "get_weather"}}, False, style)
    ids, terminated = Sampler(tok, g, 7).run(factory.new())
    content, calls = parse_tool_calls(text_of(tok, ids), style, TOOLS)
    assert terminated and content == "" and len(calls) == 1
    check_calls(calls, {"get_weather"})


def test_parallel_calls_go_on_until_the_model_stops(qwen3):
    tok, g = qwen3
    constraint = g.for_tools(TOOLS, "required", True).new()
    # after a complete call another may follow: not terminated; a stop token ends it
    call = tok.encode('<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>', add_special_tokens=False)
    assert all(constraint.accept(t) for t in call)
    assert not constraint.is_terminated()
    bitmask = allocate_bitmask(1, g.vocab_size)
    constraint.fill_bitmask(bitmask, 0)
    allowed = set(allowed_ids(bitmask[0], g.vocab_size))
    assert set(g.stop_token_ids) <= allowed and g.tool_call_start_id not in allowed  # "\n" comes first
    assert constraint.accept(g.stop_token_ids[0]) and constraint.is_terminated()
    assert not constraint.accept(0)


@pytest.mark.parametrize("style", ["hermes", "qwen3_5_xml"])
def test_tool_calls_after_thinking_with_the_output_parser(qwen35, style):
    tok, g = qwen35
    factory = g.for_tools(TOOLS, "required", True, style, thinking=Thinking.IN_PROMPT)
    # a short reasoning, then </think> (forced at step 6)
    ids, terminated = Sampler(tok, g, 4).run(factory.new(), force={6: g.think_end_id})
    assert terminated and ids[6] == g.think_end_id
    text = tok.decode(ids, skip_special_tokens=True)
    out = parse_output(text, Thinking.IN_PROMPT, style, TOOLS)
    assert out.reasoning is not None and out.content == ""
    check_calls(out.tool_calls, {"get_weather", "search", "now"})
    # streamed as the engine would: token by token through the detokenizer, calls sent as they are written
    detok = IncrementalDetokenizer(tok)
    parser = OutputParser(Thinking.IN_PROMPT, style, TOOLS, incremental=True)
    reasoning, content, deltas = "", "", []
    for piece in [detok.add(t) for t in ids] + [detok.flush()]:
        d = parser.feed(piece)
        reasoning, content, deltas = reasoning + d.reasoning, content + d.content, deltas + d.tool_calls
    d = parser.flush()
    reasoning, content, deltas = reasoning + d.reasoning, content + d.content, deltas + d.tool_calls
    assert (reasoning, content) == (out.reasoning, "")
    names, args = {}, {}
    for d in deltas:
        if d.id is not None:
            assert d.index not in names and d.arguments == ""
            names[d.index] = d.name
        args[d.index] = args.get(d.index, "") + d.arguments
    assert [(names[i], args[i]) for i in sorted(names)] == [(c.name, c.arguments) for c in out.tool_calls]
    assert len([d for d in deltas if d.id is None]) >= len(names)  # arguments came in pieces


def test_thinking_phases(qwen3):
    tok, g = qwen3
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    bitmask = allocate_bitmask(1, g.vocab_size)
    # in the prompt: inside the reasoning any text but no stop token, no <think>, no padded row or special
    c = g.for_json_schema(schema, thinking=Thinking.IN_PROMPT).new()
    assert c.in_reasoning
    c.fill_bitmask(bitmask, 0)
    allowed = set(allowed_ids(bitmask[0], g.vocab_size))
    assert g.think_end_id in allowed and tok.convert_tokens_to_ids("Hello") in allowed
    assert not allowed & set(g.stop_token_ids) and g.think_start_id not in allowed
    assert max(allowed) < len(tok) and tok.convert_tokens_to_ids("<|im_start|>") not in allowed
    assert not c.accept(g.stop_token_ids[0]) and not c.is_terminated()
    for t in tok.encode("I think so.\n", add_special_tokens=False) + [g.think_end_id]:
        assert c.accept(t)
    assert not c.in_reasoning
    for t in tok.encode('\n\n{"ok": true}', add_special_tokens=False):
        assert c.accept(t)
    assert c.is_terminated()
    # by the model: <think> or the grammar's first token
    c = g.for_json_schema(schema, thinking=Thinking.BY_MODEL).new()
    c.fill_bitmask(bitmask, 0)
    allowed = set(allowed_ids(bitmask[0], g.vocab_size))
    assert g.think_start_id in allowed and tok.convert_tokens_to_ids("{") in allowed
    assert tok.convert_tokens_to_ids("Hello") not in allowed
    assert not c.accept(tok.convert_tokens_to_ids("Hello"))  # refused: <think> is still allowed after it
    c.fill_bitmask(bitmask, 0)
    assert g.think_start_id in set(allowed_ids(bitmask[0], g.vocab_size))
    assert c.accept(tok.convert_tokens_to_ids("{")) and not c.in_reasoning
    c.reset()
    assert c.accept(g.think_start_id) and c.in_reasoning
    assert c.accept(g.think_end_id) and c.accept(tok.convert_tokens_to_ids("{"))


def test_reasoning_budget(qwen3):
    """After `budget` reasoning tokens only </think> may follow, with a grammar after it or free text; the count
    starts where the reasoning does (in the prompt, or at the model's <think>)."""
    tok, g = qwen3
    bitmask = allocate_bitmask(1, g.vocab_size)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    words = tok.encode("one two three four five six", add_special_tokens=False)
    assert g.with_budget(None, Thinking.IN_PROMPT, None) is None  # no budget: no constraint
    assert g.with_budget(None, Thinking.OFF, 3) is None  # no reasoning: nothing to limit
    grammar = g.for_json_schema(schema, thinking=Thinking.IN_PROMPT)
    assert g.with_budget(grammar, Thinking.OFF, 3) is grammar
    for kind, factory in (("free", g.with_budget(None, Thinking.IN_PROMPT, 3)),
                          ("json_schema", g.with_budget(grammar, Thinking.IN_PROMPT, 3))):
        assert factory.budget == 3 and factory.kind == kind and grammar.budget is None
        c = factory.new()
        for t in words[:3]:
            c.fill_bitmask(bitmask, 0)
            assert t in set(allowed_ids(bitmask[0], g.vocab_size)) and c.accept(t)
        c.fill_bitmask(bitmask, 0)
        assert list(allowed_ids(bitmask[0], g.vocab_size)) == [g.think_end_id]
        assert not c.accept(words[3]) and c.in_reasoning  # refused, the state unchanged
        assert c.accept(g.think_end_id) and not c.in_reasoning
        after = tok.encode('\n\n{"ok": true}', add_special_tokens=False)
        for t in after:
            assert c.accept(t)
        if factory.kind == "free":  # free text: anything with text, and the end of the reply
            c.fill_bitmask(bitmask, 0)
            allowed = set(allowed_ids(bitmask[0], g.vocab_size))
            assert set(g.stop_token_ids) <= allowed and tok.convert_tokens_to_ids("Hello") in allowed
            assert g.think_start_id not in allowed and not c.is_terminated()
            assert c.accept(words[4]) and c.accept(g.stop_token_ids[0])
        else:
            assert c.is_terminated()
        c.reset()  # a fresh count
        assert all(c.accept(t) for t in words[:3]) and not c.accept(words[3])
    # by the model: nothing is counted before <think>; a reply that does not open with it is free
    c = g.with_budget(None, Thinking.BY_MODEL, 2).new()
    c.fill_bitmask(bitmask, 0)
    assert g.think_start_id in set(allowed_ids(bitmask[0], g.vocab_size))
    assert c.accept(g.think_start_id) and c.accept(words[0]) and c.accept(words[1]) and not c.accept(words[2])
    assert c.accept(g.think_end_id) and c.accept(words[2])
    c.reset()
    assert c.accept(words[0]) and not c.in_reasoning and all(c.accept(t) for t in words[1:])
    assert not c.accept(g.think_start_id)  # after the first token the reply cannot open reasoning


def test_masks_never_allow_padded_rows_or_dropped_specials(qwen35):
    tok, g = qwen35
    c = g.for_json_schema({"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}).new()
    for t in tok.encode('{"s": "', add_special_tokens=False):
        assert c.accept(t)
    bitmask = allocate_bitmask(1, g.vocab_size)
    c.fill_bitmask(bitmask, 0)
    allowed = allowed_ids(bitmask[0], g.vocab_size)
    assert len(allowed) > 200_000  # inside a string nearly anything goes...
    assert allowed.max() < len(tok)  # ...but never a padded row
    dropped = [i for i, t in tok.added_tokens_decoder.items() if t.special]
    assert not set(allowed) & set(dropped)  # nor <|im_start|>, <|endoftext|>, <|im_end|>...
    assert tok.convert_tokens_to_ids("<tool_call>") in set(allowed)  # text like any other
    assert not c.accept(len(tok) + 5) and not c.accept(tok.convert_tokens_to_ids("<|im_start|>"))


def test_rejected_token_leaves_the_state_alone(qwen3):
    tok, g = qwen3
    c = g.for_choice(["yes", "no"]).new()
    bitmask = allocate_bitmask(1, g.vocab_size)
    c.fill_bitmask(bitmask, 0)
    before = bitmask.clone()
    assert not c.accept(tok.convert_tokens_to_ids("maybe"))
    c.fill_bitmask(bitmask, 0)
    assert torch.equal(before, bitmask)
    assert c.accept(tok.convert_tokens_to_ids("yes")) and c.is_terminated()
    c.reset()
    assert not c.is_terminated() and c.accept(tok.convert_tokens_to_ids("no"))


# --- apply_bitmask ----------------------------------------------------------------------------------------------


def reference_apply(logits, bitmask, rows):
    out = logits.clone()
    for r in rows:
        for j in range(logits.shape[1]):
            if not (int(bitmask[r, j // 32]) >> (j % 32)) & 1:
                out[r, j] = float("-inf")
    return out


@pytest.mark.parametrize("rows", [None, [1], [0, 2]])
def test_apply_bitmask_matches_the_bit_layout(rows):
    gen = torch.Generator().manual_seed(0)
    vocab = 1000  # not a multiple of 32
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, (vocab + 31) // 32), dtype=torch.int32, generator=gen)
    logits = torch.randn(3, vocab, generator=gen)
    expected = reference_apply(logits, bitmask, rows if rows is not None else [0, 1, 2])
    apply_bitmask(logits, bitmask, rows)
    assert torch.equal(logits, expected)


def test_apply_bitmask_other_dtypes_and_errors():
    bitmask = allocate_bitmask(2, 70)
    bitmask[0] = 0
    bitmask[0, 0] = 0b101  # tokens 0 and 2 only
    logits = torch.zeros(2, 70, dtype=torch.bfloat16)
    apply_bitmask(logits, bitmask, [0])
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [0, 2]
    assert torch.isfinite(logits[1]).all()
    with pytest.raises(ValueError, match="covers 64 tokens"):
        apply_bitmask(torch.zeros(1, 100), allocate_bitmask(1, 64))
    with pytest.raises(ValueError):
        apply_bitmask(torch.zeros(100), allocate_bitmask(1, 100))


# --- errors and strictness ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message", "param"),
    [
        (lambda g: g.for_json_schema({"type": "foo"}, param="s"), "not a valid JSON schema", "s"),
        (lambda g: g.for_json_schema({"required": "a"}), "not a valid JSON schema", "schema"),
        (lambda g: g.for_json_schema([1]), "must be a JSON schema object", "schema"),
        (lambda g: g.for_json_schema({"type": "string", "pattern": "(["}), "not a valid JSON schema at /pattern",
         "schema"),
        (lambda g: g.for_json_schema({"type": "string", "pattern": "(?<=a)b"}), "cannot compile.*[Ll]ookbehind",
         "schema"),
        (lambda g: g.for_json_schema({"$ref": "#/$defs/missing"}), "cannot compile", "schema"),
        (lambda g: g.for_regex("a(b"), "cannot compile", "regex"),
        (lambda g: g.for_regex(""), "non-empty string", "regex"),
        (lambda g: g.for_grammar("root ::= undefined_rule"), "cannot compile", "grammar"),
        (lambda g: g.for_choice([]), "non-empty list", "choice"),
        (lambda g: g.for_response_format({"type": "xml"}), "response_format.type must be", "response_format.type"),
        (lambda g: g.for_response_format({"type": "json_object", "schema": {}}), "not supported",
         "response_format.schema"),
        (lambda g: g.for_response_format({"type": "json_schema", "json_schema": {"name": "x"}}), "is required",
         "response_format.json_schema.schema"),
        (lambda g: g.for_response_format({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}),
         "name must be", "response_format.json_schema.name"),
        (lambda g: g.for_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": {},
                                                                                 "strict": "yes"}}),
         "strict must be a boolean", "response_format.json_schema.strict"),
        (lambda g: g.for_structured_outputs({}), "exactly one", "structured_outputs"),
        (lambda g: g.for_structured_outputs({"regex": "a", "choice": ["a"]}), "exactly one", "structured_outputs"),
        (lambda g: g.for_structured_outputs({"json": "{not json"}), "not valid JSON", "structured_outputs.json"),
        (lambda g: g.for_structured_outputs({"regex": "a", "whitespace_pattern": " "}), "not supported",
         "structured_outputs.whitespace_pattern"),
        (lambda g: g.for_tools(TOOLS, {"type": "function", "function": {"name": "nope"}}, True), "not among the tools",
         "tool_choice"),
        (lambda g: g.for_tools([], "required", True), "needs at least one tool", "tool_choice"),
        (lambda g: g.for_tools(TOOLS, "sometimes", True), "tool_choice must be", "tool_choice"),
        (lambda g: g.for_tools([NOW, NOW], "required", True), "defined twice", "tools[1].function.name"),
        (lambda g: g.for_tools([{"type": "retrieval"}], "required", True), "must be", "tools[0]"),
        (lambda g: g.for_tools([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
                               "required", True), "of an object", "tools[0].function.parameters"),
        (lambda g: g.for_tools([{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
            "type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}], "required", True),
         "strict mode cannot enforce", "tools[0].function.parameters"),
        (lambda g: g.for_tools(TOOLS, "required", "yes"), "must be a boolean", "parallel_tool_calls"),
    ],
)
def test_errors_are_clear(qwen3, call, message, param):
    _, g = qwen3
    with pytest.raises(StructuredOutputError, match=message) as e:
        call(g)
    assert e.value.param == param
    assert "/project/cpp" not in str(e.value)


def test_tool_choice_auto_and_none_need_no_grammar(qwen3):
    _, g = qwen3
    assert g.for_tools(TOOLS, "auto", True) is None
    assert g.for_tools(TOOLS, "none", True) is None
    assert g.for_tools(TOOLS, None, True) is None


UNENFORCEABLE = {
    "type": "object",
    "properties": {
        "a": {"type": "string", "format": "credit-card"},
        "b": {"type": "array", "uniqueItems": True},
        "c": {"type": "number", "multipleOf": 0.5},
        "d": {"not": {"type": "null"}},
        "e": {"allOf": [{"type": "integer"}, {"minimum": 1}]},
        "f": {"oneOf": [{"type": "integer"}, {"type": "number"}]},
        "g": {"if": {"type": "string"}, "then": {"minLength": 1}},
    },
    "dependentRequired": {"a": ["b"]},
}


def test_strict_refuses_what_the_grammar_cannot_enforce(qwen3):
    _, g = qwen3
    with pytest.raises(StructuredOutputError) as e:
        g.for_response_format({"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                                                      "schema": UNENFORCEABLE}})
    msg = str(e.value)
    for where in ("/properties/a: format 'credit-card'", "/properties/b: 'uniqueItems'", "/properties/c: 'multipleOf'",
                  "/properties/d: 'not'", "/properties/e: 'allOf'", "/properties/f: 'oneOf'", "/properties/g: 'if'",
                  "/: 'dependentRequired'"):
        assert where in msg, where
    assert "strict to false" in msg


def test_not_strict_compiles_and_says_what_it_leaves_out(qwen3):
    tok, g = qwen3
    factory = g.for_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": UNENFORCEABLE}})
    assert len(factory.not_enforced) == 8 and factory.not_enforced == tuple(not_enforced(UNENFORCEABLE))


def test_disjoint_one_of_is_enforced(qwen3):
    # types apart, or a required const apart (through $ref): oneOf is exact; overlapping types are not
    assert not_enforced({"oneOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]}) == []
    assert not_enforced(REFS) == []
    assert not_enforced({"oneOf": [{"type": "integer"}, {"type": "number"}]}) != []
    assert not_enforced({"oneOf": [{"properties": {"k": {"const": 1}}}, {"properties": {"k": {"const": 2}}}]}) != []


# patterns are matched whole: a value that only contains a match is refused (stricter, never looser)
ANCHORED = {"patternProperties"}


@pytest.mark.parametrize("name", list(PROBES))
def test_what_strict_accepts_is_enforced(qwen3, name):
    """The strict promise, feature by feature: a schema that `not_enforced` passes must refuse its invalid
    instance. Catches a grammar-library upgrade that stops enforcing something."""
    tok, g = qwen3
    schema, good, bad = PROBES[name]

    def passes(factory, value) -> bool:
        c = factory.new()
        ids = tok.encode(json.dumps(value, ensure_ascii=False), add_special_tokens=False)
        return all(c.accept(t) for t in ids) and c.accept(g.stop_token_ids[0]) and c.is_terminated()

    if not_enforced(schema):
        with pytest.raises(StructuredOutputError, match="strict mode cannot enforce"):
            g.for_json_schema(schema, strict=True)
        factory = g.for_json_schema(schema)  # best effort
        assert factory.not_enforced and passes(factory, good) in (True, name in ANCHORED)
        return
    factory = g.for_json_schema(schema, strict=True)
    assert not passes(factory, bad)
    assert passes(factory, good) or name in ANCHORED


def test_the_random_models_tokenizer(tiny_tokenizer):
    # Qwen2.5's layout: <tool_call> but no <think>; it marks <tool_call> special, which Qwen's does not: the
    # markers keep their text for the grammar all the same
    g = Grammars(tiny_tokenizer, 151936)
    assert g.think_start_id is None and g.tool_call_start_id == 151657
    assert g.stop_token_ids == [151645, 151643]
    c = g.for_tools([NOW], "required", False).new()
    bitmask = allocate_bitmask(1, g.vocab_size)
    c.fill_bitmask(bitmask, 0)
    assert list(allowed_ids(bitmask[0], g.vocab_size)) == [151657]
    call = [151657] + tiny_tokenizer.encode('\n{"name": "now", "arguments": {}}\n', add_special_tokens=False) + [151658]
    assert all(c.accept(t) for t in call) and c.is_terminated()
    assert not c.accept(tiny_tokenizer.convert_tokens_to_ids("<|im_start|>"))
    with pytest.raises(StructuredOutputError, match="no <think>"):
        g.for_json_object(thinking=Thinking.IN_PROMPT)


def test_cache_is_keyed_by_the_constraint_and_bounded(qwen3):
    tok, _ = qwen3
    g = Grammars(tok, qwen_vocab.model_vocab_size("qwen3"), cache_bytes=1)
    a = {"type": "object", "properties": {"x": {"type": "integer"}}}
    b = {"type": "object", "properties": {"y": {"type": "integer"}}}
    g.for_json_schema(a)
    g.for_json_schema(json.loads(json.dumps(a)))  # an equal schema is a hit
    assert g.cache_info()["hits"] == 1 and g.cache_info()["misses"] == 1
    g.for_json_schema(b)  # over the byte budget: the oldest goes
    info = g.cache_info()
    assert info["entries"] == 1 and info["misses"] == 2
    g.for_json_schema(a)
    assert g.cache_info()["misses"] == 3
    # the thinking variant is a different grammar
    g.for_json_schema(a, thinking=Thinking.IN_PROMPT)
    assert g.cache_info()["misses"] == 4

"""Constrained decoding: JSON schemas, regular expressions, choices, grammars and tool calls compiled into a
token mask per sequence, on xgrammar (chosen by measurement: bench/README.md, "Structured output: choice of
grammar library").

For the engine, the whole surface is library-free:

    grammars = Grammars(tokenizer, vocab_size)                    # once per model (a few seconds)
    factory = grammars.for_response_format(body["response_format"], thinking=mode)   # per request; cached
    constraint = factory.new()                                   # per generated sequence
    bitmask = allocate_bitmask(max_rows, vocab_size)             # once; int32 [rows, ceil(V/32)], CPU
    # every step, for the constrained rows of the batch:
    constraint.fill_bitmask(bitmask, row)
    apply_bitmask(logits, bitmask, rows)                         # logits [B, V]: -inf where disallowed
    ... sample ...
    if not constraint.accept(token): ...                         # cannot happen after apply_bitmask
    if constraint.is_terminated(): ...                           # only EOS may follow: finish the sequence

Masks cover every embedding row (`vocab_size`, which may exceed the tokenizer's length): padded rows, and
special tokens that decoding would drop (`<|im_start|>`…), are never allowed; the stop tokens are allowed
exactly where the grammar may end. Tokens that Qwen's tokenizers do not mark special (`<tool_call>`,
`<think>`) are text like any other, and tool-call grammars require the single `<tool_call>`/`</tool_call>`
tokens themselves.

**Thinking.** With `Thinking.IN_PROMPT` (the prompt ends inside `<think>`) the constraint starts inactive:
any token but the stop tokens and `<think>` may follow, until `</think>`; from there the grammar holds, after
at most a few whitespace characters (Qwen writes `</think>\\n\\n`). With `Thinking.BY_MODEL` the first token
may be `<think>` (then as above) or the grammar's first token (then no reasoning block). The reasoning itself
is never constrained, and the stop tokens are refused inside it, so a reply cannot end before its answer.

**Strictness.** A JSON schema is checked against its metaschema first (an invalid schema is an error). Some
keywords cannot be enforced by the grammar (`not`, `if`/`then`/`else`, `allOf`, `uniqueItems`,
`dependentRequired`, `contains`, `multipleOf` on non-integers, unknown `format`s, `oneOf` whose branches may
overlap…: `not_enforced()` lists them with their place). With `strict: true` such a schema is refused with
an error that names them; otherwise it is compiled without them (the output follows everything else in the
schema) and the factory lists them in `not_enforced`. Objects with declared properties get no undeclared
ones, and `pattern`s are matched whole (as if anchored); both are stricter than the schema, never looser.
Whitespace between JSON tokens is capped (`max_whitespace`, 16 characters in a row), so that a model cannot
pad forever; a string's length is not capped unless its schema says so.

**Tool calls.** `for_tools` makes the model call tools in its own format (`style`): Qwen2.5/Qwen3's Hermes
JSON in a `<tool_call>` block, or Qwen3.5's XML parameters, the arguments valid against each tool's
`parameters` (with the tool's `strict` flag as above), one call or (`parallel`) one or more separated by a
newline, nothing else. `toolcalls.OutputParser` reads them back.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .reasoning import Thinking

TOOL_STYLES = ("hermes", "qwen3_5_xml")
DEFAULT_MAX_WHITESPACE = 16
DEFAULT_CACHE_BYTES = 256 * 1024**2
# string formats the grammar enforces (measured on xgrammar 0.2.9; see bench/grammar.py's probes)
SUPPORTED_FORMATS = frozenset({
    "date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "uuid", "uri",
    "uri-reference", "uri-template", "json-pointer", "relative-json-pointer",
})
_AFTER_THINK_WS = r"[ \t\r\n]{0,4}"
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class _Clock:
    """Seconds spent on constrained decoding by the threads that decode (the engine's): filling and applying
    token masks and advancing grammars. Read by the server's metrics (qwen_structured_output_seconds_total)."""

    __slots__ = ("seconds",)

    def __init__(self) -> None:
        self.seconds = 0.0


GRAMMAR_TIME = _Clock()


class StructuredOutputError(ValueError):
    """A constraint the request asked for cannot be built: the message is for the client (HTTP 400), `param`
    names the request field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# --- bitmasks --------------------------------------------------------------------------------------------------


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """A packed token bitmask, int32 [rows, ceil(vocab_size / 32)] on the CPU, all tokens allowed. Bit j of
    word w stands for token 32 * w + j."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | None = None) -> None:
    """Set to -inf, in place, the logits of tokens whose bit is 0. `logits` [B, V] (CPU or accelerator);
    `bitmask` [>= B, ceil(V/32)] int32 on the CPU, row i for logits row i; `rows`: the rows to mask (None:
    all of them)."""
    started = time.perf_counter()
    try:
        _apply_bitmask(logits, bitmask, rows)
    finally:
        GRAMMAR_TIME.seconds += time.perf_counter() - started


def _apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | None) -> None:
    if logits.dim() != 2 or bitmask.dim() != 2 or bitmask.dtype != torch.int32:
        raise ValueError("apply_bitmask wants logits [B, V] and an int32 bitmask [rows, ceil(V/32)]")
    vocab = logits.shape[1]
    if bitmask.shape[1] * 32 < vocab:
        raise ValueError(f"the bitmask covers {bitmask.shape[1] * 32} tokens, the logits {vocab}")
    if rows is not None and not rows:
        return
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and sys.byteorder == "little" \
            and not logits.requires_grad:
        # numpy unpacks the bits and writes -inf in one pass: ~12x faster on CPU than xgrammar's own CPU
        # kernel at 16 x 151 936 (bench/README.md)
        out = logits.numpy()
        masks = bitmask.numpy()
        if rows is None:
            allowed = np.unpackbits(masks[: logits.shape[0]].view(np.uint8), axis=1, bitorder="little")
            np.copyto(out, -np.inf, where=~allowed[:, :vocab].view(np.bool_))
        else:
            for r in rows:
                allowed = np.unpackbits(masks[r].view(np.uint8), bitorder="little")[:vocab].view(np.bool_)
                np.copyto(out[r], -np.inf, where=~allowed)
        return
    import xgrammar as xgr

    mask = bitmask.to(logits.device, non_blocking=True) if logits.device.type != "cpu" else bitmask
    xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=vocab, indices=rows)


# --- JSON-schema checks ----------------------------------------------------------------------------------------

_ALWAYS_UNENFORCED = {
    "not": "'not' is not enforced",
    "if": "'if'/'then'/'else' are not enforced",
    "then": "'if'/'then'/'else' are not enforced",
    "else": "'if'/'then'/'else' are not enforced",
    "allOf": "'allOf' is not enforced",
    "dependentRequired": "'dependentRequired' is not enforced",
    "dependentSchemas": "'dependentSchemas' is not enforced",
    "dependencies": "'dependencies' is not enforced",
    "contains": "'contains' is not enforced",
    "minContains": "'minContains' is not enforced",
    "maxContains": "'maxContains' is not enforced",
    "unevaluatedProperties": "'unevaluatedProperties' is not enforced",
    "unevaluatedItems": "'unevaluatedItems' is not enforced",
    "$dynamicRef": "'$dynamicRef' is not supported",
    "$recursiveRef": "'$recursiveRef' is not supported",
}
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_ONE = ("additionalProperties", "contains", "propertyNames", "not", "if", "then", "else",
               "unevaluatedProperties", "unevaluatedItems", "additionalItems")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")


def not_enforced(schema) -> list[str]:
    """What in `schema` the grammar does not enforce, each as 'JSON pointer: reason'."""
    notes: list[str] = []

    def walk(node, path: str) -> None:
        if not isinstance(node, dict):
            return
        for key, reason in _ALWAYS_UNENFORCED.items():
            if key in node:
                notes.append(f"{path or '/'}: {reason}")
        here = path or "/"
        if node.get("uniqueItems") is True:
            notes.append(f"{here}: 'uniqueItems' is not enforced")
        if "multipleOf" in node and (node.get("type") != "integer" or _RANGE & node.keys()):
            notes.append(f"{here}: 'multipleOf' is enforced on integers without a minimum or maximum only")
        fmt = node.get("format")
        if isinstance(fmt, str) and fmt not in SUPPORTED_FORMATS:
            notes.append(f"{here}: format '{fmt}' is not enforced (enforced: {', '.join(sorted(SUPPORTED_FORMATS))})")
        if ("pattern" in node or "format" in node) and ("minLength" in node or "maxLength" in node):
            notes.append(f"{here}: 'minLength'/'maxLength' beside a 'pattern' or 'format' are not enforced")
        pattern = node.get("pattern")
        if isinstance(pattern, str) and ("(?=" in pattern or "(?!" in pattern):
            notes.append(f"{here}: lookahead in 'pattern' is not enforced")
        if ("enum" in node or "const" in node) and not _values_fit(node):
            notes.append(f"{here}: 'enum'/'const' values that break the keywords beside them would be allowed")
        if isinstance(node.get("oneOf"), list) and not _disjoint(node["oneOf"], schema):
            notes.append(f"{path or '/'}: 'oneOf' whose branches may overlap is enforced as 'anyOf'")
        ref = node.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            notes.append(f"{path or '/'}: remote '$ref' {ref!r} is not supported")
        for key in _SCHEMA_MAPS:
            sub = node.get(key)
            if isinstance(sub, dict):
                for name, s in sub.items():
                    walk(s, f"{path}/{key}/{_escape(name)}")
        for key in _SCHEMA_ONE:
            walk(node.get(key), f"{path}/{key}")
        items = node.get("items")
        if isinstance(items, list):
            for i, s in enumerate(items):
                walk(s, f"{path}/items/{i}")
        else:
            walk(items, f"{path}/items")
        for key in _SCHEMA_LISTS:
            sub = node.get(key)
            if isinstance(sub, list):
                for i, s in enumerate(sub):
                    walk(s, f"{path}/{key}/{i}")

    walk(schema, "")
    return list(dict.fromkeys(notes))


_RANGE = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
_ANNOTATIONS = {"title", "description", "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly",
                "$id", "$schema", "$anchor", "enum", "const"}


def _values_fit(node: dict) -> bool:
    """Whether every enum/const value meets the node's other keywords (the grammar enforces the values
    alone)."""
    import jsonschema

    rest = {k: v for k, v in node.items() if k not in _ANNOTATIONS}
    if not rest:
        return True
    values = [node["const"]] if "const" in node else node.get("enum")
    if not isinstance(values, list):
        return True
    try:
        validator = jsonschema.validators.validator_for(rest)(rest)
        return all(validator.is_valid(v) for v in values)
    except Exception:  # noqa: BLE001 - e.g. a $ref beside the enum that cannot be resolved here: not proven
        return False


def _escape(name: str) -> str:
    return str(name).replace("~", "~0").replace("/", "~1")


def _resolve(node, root, depth: int = 0):
    ref = node.get("$ref") if isinstance(node, dict) else None
    if not isinstance(ref, str) or not ref.startswith("#") or depth > 16:
        return node
    target = root
    for part in ref[1:].split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(target, dict) or part not in target:
            return node
        target = target[part]
    return _resolve(target, root, depth + 1)


def _types(node, root) -> set[str] | None:
    node = _resolve(node, root)
    if not isinstance(node, dict):
        return None
    t = node.get("type")
    if isinstance(t, str):
        types = {t}
    elif isinstance(t, list) and all(isinstance(x, str) for x in t):
        types = set(t)
    elif "const" in node or "enum" in node:
        values = [node["const"]] if "const" in node else list(node.get("enum") or [])
        types = {_json_type(v) for v in values}
    elif "properties" in node:
        types = {"object"}
    else:
        return None
    if "integer" in types:
        types.add("number")
    if "number" in types:
        types.add("integer")
    return types


def _json_type(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    return "array" if isinstance(v, list) else "object"


def _discriminators(node, root) -> dict[str, set[str]] | None:
    node = _resolve(node, root)
    if not isinstance(node, dict) or not isinstance(node.get("properties"), dict):
        return None
    required = set(node.get("required") or [])
    out = {}
    for name, prop in node["properties"].items():
        prop = _resolve(prop, root)
        if name in required and isinstance(prop, dict):
            if "const" in prop:
                out[name] = {json.dumps(prop["const"], sort_keys=True)}
            elif isinstance(prop.get("enum"), list):
                out[name] = {json.dumps(v, sort_keys=True) for v in prop["enum"]}
    return out


def _disjoint(branches: list, root) -> bool:
    """Whether no value can match two of the branches: their types differ, or a required property with a
    const/enum tells them apart."""
    types = [_types(b, root) for b in branches]
    if all(t is not None for t in types) and all(
            not (types[i] & types[j]) for i in range(len(types)) for j in range(i + 1, len(types))):
        return True
    discs = [_discriminators(b, root) for b in branches]
    if any(d is None for d in discs):
        return False
    for name in set.intersection(*(set(d) for d in discs)) if discs else set():
        values = [d[name] for d in discs]
        if all(not (values[i] & values[j]) for i in range(len(values)) for j in range(i + 1, len(values))):
            return True
    return False


def check_json_schema(schema, *, strict: bool, param: str) -> list[str]:
    """Refuse an invalid schema, and under `strict` one the grammar cannot enforce whole; return what is not
    enforced."""
    if not isinstance(schema, dict):
        raise StructuredOutputError(f"{param} must be a JSON schema object", param)
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/" + "/".join(str(p) for p in e.absolute_path) if e.absolute_path else "its root"
        raise StructuredOutputError(f"{param} is not a valid JSON schema at {where}: {e.message}", param) from None
    notes = not_enforced(schema)
    if strict and notes:
        raise StructuredOutputError(
            f"{param}: strict mode cannot enforce this schema: " + "; ".join(notes[:8])
            + (f"; and {len(notes) - 8} more" if len(notes) > 8 else "")
            + ". Remove these keywords, or set strict to false to have them left unenforced.", param)
    return notes


# --- constraints -----------------------------------------------------------------------------------------------

_THINK, _START, _GRAMMAR = 0, 1, 2


class TokenConstraint:
    """The grammar state of one generated sequence, and its reasoning budget: once `budget` tokens of reasoning
    are written, only the end of reasoning may follow. Without a grammar (a factory of kind "free") the text
    after the reasoning is free. Used by one thread (the engine's)."""

    __slots__ = ("_factory", "_matcher", "_phase", "_only_stop", "_done", "_thought")

    def __init__(self, factory: ConstraintFactory) -> None:
        self._factory = factory
        self._matcher = None
        self.reset()

    def reset(self) -> None:
        f = self._factory
        if f.thinking == Thinking.IN_PROMPT:
            self._phase = _THINK
            self._matcher = self._new_matcher(f._after_think)
        elif f.thinking == Thinking.BY_MODEL:
            self._phase = _START
            self._matcher = self._new_matcher(f._plain)
        else:
            self._phase = _GRAMMAR
            self._matcher = self._new_matcher(f._plain)
        self._only_stop = False
        self._done = False
        self._thought = 0  # reasoning tokens written

    @staticmethod
    def _new_matcher(compiled):
        if compiled is None:  # free text
            return None
        import xgrammar as xgr

        return xgr.GrammarMatcher(compiled)

    @property
    def in_reasoning(self) -> bool:
        return self._phase == _THINK

    def _spent(self) -> bool:
        budget = self._factory.budget
        return budget is not None and self._thought >= budget

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        started = time.perf_counter()
        try:
            self._fill(bitmask, row)
        finally:
            GRAMMAR_TIME.seconds += time.perf_counter() - started

    def _fill(self, bitmask: torch.Tensor, row: int) -> None:
        g = self._factory._grammars
        if self._phase == _THINK:
            if self._spent():
                bitmask[row].zero_()
                bitmask[row, g.think_end_id // 32] = _bit(g.think_end_id)
            else:
                bitmask[row].copy_(g._free_mask)
            return
        if self._matcher is None:
            bitmask[row].copy_(g._free_mask)
            bitmask[row] |= g._stop_bits
        else:
            self._matcher.fill_next_token_bitmask(bitmask, row)
        if self._phase == _START:
            t = g.think_start_id
            bitmask[row, t // 32] |= _bit(t)

    def accept(self, token_id: int) -> bool:
        """Advance by the sampled token; False if the grammar does not allow it (the state is unchanged)."""
        started = time.perf_counter()
        try:
            return self._accept(token_id)
        finally:
            GRAMMAR_TIME.seconds += time.perf_counter() - started

    def _accept(self, token_id: int) -> bool:
        if self._done:
            return False
        g = self._factory._grammars
        if self._phase == _THINK:
            if token_id == g.think_end_id:
                self._phase = _GRAMMAR
                return True
            if self._spent() or not g.free_text_allows(token_id):
                return False
            self._thought += 1
            return True
        if self._phase == _START and token_id == g.think_start_id:
            self._phase = _THINK
            self._matcher = self._new_matcher(self._factory._after_think)
            return True
        if self._matcher is None:
            if not (g.free_text_allows(token_id) or token_id in g.stop_token_ids):
                return False
            self._phase = _GRAMMAR
            return True
        if not 0 <= token_id < g.vocab_size or not self._matcher.accept_token(token_id):
            return False
        self._phase = _GRAMMAR
        if self._matcher.is_terminated():
            self._done = True
        elif self._matcher.is_completed():
            self._only_stop = g.only_stop_allowed(self._matcher)
        return True

    def is_terminated(self) -> bool:
        """The grammar is complete and nothing but a stop token may follow (or one was accepted)."""
        return self._phase == _GRAMMAR and (self._done or self._only_stop)


def _bit(token_id: int) -> int:
    """The bit of a token inside its int32 word, as a Python int that fits int32."""
    b = 1 << (token_id % 32)
    return b - (1 << 32) if b >= 1 << 31 else b


@dataclass(frozen=True)
class ConstraintFactory:
    """A compiled constraint for one request; `new()` (or calling it) gives each sequence its own state."""

    kind: str  # "free": no grammar, a reasoning budget only
    thinking: Thinking
    not_enforced: tuple[str, ...]
    _grammars: Grammars = field(repr=False)
    _plain: object = field(repr=False, default=None)
    _after_think: object = field(repr=False, default=None)
    budget: int | None = None  # the most reasoning tokens a sequence may write (None: no limit)

    def new(self) -> TokenConstraint:
        return TokenConstraint(self)

    __call__ = new


# --- the compiler ----------------------------------------------------------------------------------------------


class Grammars:
    """Compiles constraints for one tokenizer and vocabulary, with an LRU cache of compiled grammars keyed by
    the constraint (bounded in bytes). Thread-safe; compiling takes tens to hundreds of milliseconds, so call
    the `for_*` methods off the event loop and off the engine's thread."""

    def __init__(self, tokenizer, vocab_size: int, *, stop_token_ids: list[int] | None = None,
                 max_whitespace: int = DEFAULT_MAX_WHITESPACE, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 max_threads: int | None = None) -> None:
        import xgrammar as xgr

        self.vocab_size = vocab_size
        self.max_whitespace = max_whitespace
        self.cache_bytes = cache_bytes
        vocab = tokenizer.get_vocab()
        if stop_token_ids is None:
            stop_token_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            for t in ("<|im_end|>", "<|endoftext|>"):
                if t in vocab and vocab[t] not in stop_token_ids:
                    stop_token_ids.append(vocab[t])
        if not stop_token_ids:
            raise ValueError("no stop token: pass stop_token_ids")
        self.stop_token_ids = list(stop_token_ids)

        def single(token: str) -> int | None:
            i = vocab.get(token)
            return i if i is not None and i < vocab_size else None

        self.think_start_id = single("<think>")
        self.think_end_id = single("</think>")
        self.tool_call_start_id = single("<tool_call>")
        self.tool_call_end_id = single("</tool_call>")

        # the vocabulary as xgrammar sees it: special tokens that decoding drops have no text, so no grammar
        # can produce them; the stop tokens are known by id
        encoded = [""] * vocab_size
        for text, i in vocab.items():
            if i < vocab_size:
                encoded[i] = text
        stops = set(self.stop_token_ids)
        # the markers keep their text even where a tokenizer marks them special (Qwen's own do not)
        keep = stops | {self.think_start_id, self.think_end_id, self.tool_call_start_id, self.tool_call_end_id}
        for i, added in tokenizer.added_tokens_decoder.items():
            if added.special and i < vocab_size and i not in keep:
                encoded[i] = ""
        try:
            meta = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer.backend_tokenizer.to_str())
            vocab_type, prefix_space = meta["vocab_type"], meta["add_prefix_space"]
        except Exception:  # noqa: BLE001 - private helper; the public path gives the same answer, slower
            base = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                      stop_token_ids=self.stop_token_ids)
            vocab_type, prefix_space = base.vocab_type, base.add_prefix_space
        self._info = xgr.TokenizerInfo(encoded, vocab_type, vocab_size=vocab_size,
                                       stop_token_ids=self.stop_token_ids, add_prefix_space=prefix_space)
        self._compiler = xgr.GrammarCompiler(self._info, max_threads=max_threads or min(8, os.cpu_count() or 1),
                                             cache_enabled=False)
        # free text (reasoning): every token with text, but not the stop tokens nor <think>
        free = np.array([bool(t) for t in encoded], dtype=bool)
        free[list(stops)] = False
        if self.think_start_id is not None:
            free[self.think_start_id] = False
        self._free = free
        packed = np.packbits(np.concatenate([free, np.zeros((-vocab_size) % 32, dtype=bool)]), bitorder="little")
        self._free_mask = torch.from_numpy(packed.view(np.int32).copy())
        self._stop_bits = allocate_bitmask(1, vocab_size)[0].zero_()
        for t in stops:
            self._stop_bits[t // 32] |= _bit(t)
        self._scratch = threading.local()
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._cache_size = 0
        self.hits = self.misses = 0

    # helpers used by TokenConstraint ----------------------------------------------------------------------
    def free_text_allows(self, token_id: int) -> bool:
        return 0 <= token_id < self.vocab_size and bool(self._free[token_id])

    def only_stop_allowed(self, matcher) -> bool:
        row = getattr(self._scratch, "row", None)
        if row is None:
            row = self._scratch.row = allocate_bitmask(1, self.vocab_size)
        matcher.fill_next_token_bitmask(row, 0)
        return not bool((row[0] & ~self._stop_bits).any())

    def cache_info(self) -> dict:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "entries": len(self._cache), "bytes": self._cache_size}

    # compiling ---------------------------------------------------------------------------------------------
    def _compiled(self, key: str, build):
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return hit
            self.misses += 1
        compiled = build()
        size = compiled.memory_size_bytes
        with self._lock:
            if key not in self._cache:
                self._cache[key] = compiled
                self._cache_size += size
                while self._cache_size > self.cache_bytes and len(self._cache) > 1:
                    _, old = self._cache.popitem(last=False)
                    self._cache_size -= old.memory_size_bytes
        return compiled

    def _factory(self, kind: str, content_key, make_format, thinking: Thinking, notes=(),
                 param: str | None = None) -> ConstraintFactory:
        from xgrammar.structural_tag import RegexFormat, SequenceFormat, StructuralTag

        if thinking != Thinking.OFF and (self.think_start_id is None or self.think_end_id is None):
            raise StructuredOutputError("this model's vocabulary has no <think> and </think> tokens")

        def compile_variant(after_think: bool):
            key = json.dumps([kind, content_key, self.max_whitespace, after_think], sort_keys=True)

            def build():
                fmt = make_format()
                if after_think:
                    fmt = SequenceFormat(elements=[RegexFormat(pattern=_AFTER_THINK_WS), fmt])
                try:
                    return self._compiler.compile_structural_tag(StructuralTag(format=fmt))
                except (RuntimeError, ValueError) as e:
                    raise StructuredOutputError(f"cannot compile the {kind.replace('_', ' ')}: {_clean(e)}",
                                                param) from None

            return self._compiled(key, build)

        plain = compile_variant(False) if thinking != Thinking.IN_PROMPT else None
        after = compile_variant(True) if thinking != Thinking.OFF else None
        return ConstraintFactory(kind, thinking, tuple(notes), self, plain, after)

    def _json_format(self, schema, **extra):
        from xgrammar.structural_tag import JSONSchemaFormat

        return JSONSchemaFormat(json_schema=schema, max_whitespace_cnt=self.max_whitespace, **extra)

    # the public constraints ---------------------------------------------------------------------------------
    def for_json_schema(self, schema, *, strict: bool = False, thinking: Thinking = Thinking.OFF,
                        param: str = "schema") -> ConstraintFactory:
        notes = check_json_schema(schema, strict=strict, param=param)
        return self._factory("json_schema", schema, lambda: self._json_format(schema), thinking, notes, param)

    def with_budget(self, factory: ConstraintFactory | None, thinking: Thinking,
                    budget: int | None) -> ConstraintFactory | None:
        """`factory` (a grammar, or None for free text) with at most `budget` tokens of reasoning; unchanged
        when there is no budget or no reasoning to limit."""
        if budget is None or thinking == Thinking.OFF or self.think_end_id is None:
            return factory
        if factory is None:
            return ConstraintFactory("free", thinking, (), self, budget=budget)
        return replace(factory, budget=budget)

    def for_json_object(self, *, thinking: Thinking = Thinking.OFF) -> ConstraintFactory:
        return self._factory("json_object", None, lambda: self._json_format({"type": "object"}), thinking)

    def for_regex(self, pattern: str, *, thinking: Thinking = Thinking.OFF, param: str = "regex") -> ConstraintFactory:
        from xgrammar.structural_tag import RegexFormat

        if not isinstance(pattern, str) or not pattern:
            raise StructuredOutputError(f"{param} must be a non-empty string", param)
        return self._factory("regex", pattern, lambda: RegexFormat(pattern=pattern), thinking, param=param)

    def for_choice(self, choices, *, thinking: Thinking = Thinking.OFF, param: str = "choice") -> ConstraintFactory:
        from xgrammar.structural_tag import ConstStringFormat, OrFormat

        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise StructuredOutputError(f"{param} must be a non-empty list of non-empty strings", param)
        return self._factory("choice", choices,
                             lambda: OrFormat(elements=[ConstStringFormat(value=c) for c in choices]), thinking,
                             param=param)

    def for_grammar(self, grammar: str, *, thinking: Thinking = Thinking.OFF,
                    param: str = "grammar") -> ConstraintFactory:
        """An EBNF grammar (GBNF style, root rule `root`) or, without `::=`, a Lark grammar (rule `start`)."""
        from xgrammar.structural_tag import GrammarFormat

        if not isinstance(grammar, str) or not grammar.strip():
            raise StructuredOutputError(f"{param} must be a non-empty string", param)
        syntax = "ebnf" if "::=" in grammar else "lark"
        return self._factory("grammar", [syntax, grammar], lambda: GrammarFormat(grammar=grammar, syntax=syntax),
                             thinking, param=param)

    def for_response_format(self, response_format, *, thinking: Thinking = Thinking.OFF) -> ConstraintFactory | None:
        """OpenAI `response_format`: None for `text`, a factory for `json_object` and `json_schema`."""
        p = "response_format"
        if not isinstance(response_format, dict):
            raise StructuredOutputError(f"{p} must be an object", p)
        kind = response_format.get("type")
        _only_keys(response_format, {"type", "json_schema"} if kind == "json_schema" else {"type"}, p)
        if kind == "text":
            return None
        if kind == "json_object":
            return self.for_json_object(thinking=thinking)
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict):
                raise StructuredOutputError(f"{p}.json_schema must be an object", f"{p}.json_schema")
            _only_keys(spec, {"name", "schema", "strict", "description"}, f"{p}.json_schema")
            name = spec.get("name")
            if not isinstance(name, str) or not _TOOL_NAME.match(name):
                raise StructuredOutputError(f"{p}.json_schema.name must be 1 to 64 letters, digits, '_' or '-'",
                                            f"{p}.json_schema.name")
            strict = spec.get("strict")
            if strict is not None and not isinstance(strict, bool):
                raise StructuredOutputError(f"{p}.json_schema.strict must be a boolean", f"{p}.json_schema.strict")
            if "schema" not in spec:
                raise StructuredOutputError(f"{p}.json_schema.schema is required", f"{p}.json_schema.schema")
            return self.for_json_schema(spec["schema"], strict=bool(strict), thinking=thinking,
                                        param=f"{p}.json_schema.schema")
        raise StructuredOutputError(
            f"{p}.type must be 'text', 'json_object' or 'json_schema' (got {kind!r})", f"{p}.type")

    def for_structured_outputs(self, spec, *, thinking: Thinking = Thinking.OFF) -> ConstraintFactory:
        """vLLM's `structured_outputs`: exactly one of `json` (a schema, object or string; not strict), `regex`,
        `choice`, `grammar`, or `json_object: true`."""
        p = "structured_outputs"
        if not isinstance(spec, dict):
            raise StructuredOutputError(f"{p} must be an object", p)
        kinds = [k for k in ("json", "regex", "choice", "grammar", "json_object") if spec.get(k) not in (None, False)]
        _only_keys(spec, {"json", "regex", "choice", "grammar", "json_object"}, p)
        if len(kinds) != 1:
            raise StructuredOutputError(f"{p} needs exactly one of json, regex, choice, grammar, json_object", p)
        kind = kinds[0]
        value = spec[kind]
        if kind == "json":
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError as e:
                    raise StructuredOutputError(f"{p}.json is not valid JSON: {e}", f"{p}.json") from None
            return self.for_json_schema(value, strict=False, thinking=thinking, param=f"{p}.json")
        if kind == "json_object":
            if value is not True:
                raise StructuredOutputError(f"{p}.json_object must be true", f"{p}.json_object")
            return self.for_json_object(thinking=thinking)
        if kind == "regex":
            return self.for_regex(value, thinking=thinking, param=f"{p}.regex")
        if kind == "choice":
            return self.for_choice(value, thinking=thinking, param=f"{p}.choice")
        return self.for_grammar(value, thinking=thinking, param=f"{p}.grammar")

    def for_tools(self, tools, tool_choice, parallel: bool = True, style: str = "hermes", *,
                  thinking: Thinking = Thinking.OFF) -> ConstraintFactory | None:
        """A grammar that makes the model call tools, in its own format, with arguments valid against each
        tool's `parameters`: for `tool_choice` "required", one of the tools; for a named function, that one.
        `parallel` (OpenAI `parallel_tool_calls`): one or more calls; otherwise exactly one. None for "auto"
        and "none" (nothing to enforce)."""
        from xgrammar.structural_tag import (
            ConstStringFormat,
            SequenceFormat,
            TagFormat,
            TagsWithSeparatorFormat,
            TokenFormat,
        )

        if style not in TOOL_STYLES:
            raise ValueError(f"unknown tool-call style {style!r}; known: {', '.join(TOOL_STYLES)}")
        if not isinstance(parallel, bool):
            raise StructuredOutputError("parallel_tool_calls must be a boolean", "parallel_tool_calls")
        functions = _check_tools(tools)
        choice = _check_tool_choice(tool_choice, functions)
        if choice in ("none", "auto"):
            return None
        if choice != "required":
            functions = {choice: functions[choice]}
        notes: list[str] = []
        schemas = {}
        for name, fn in functions.items():
            params = fn.get("parameters")
            param = f"tools[{fn['_index']}].function.parameters"
            if params is None:
                params = {"type": "object", "properties": {}}
            elif not isinstance(params, dict) or params.get("type", "object") != "object":
                raise StructuredOutputError(f"{param} must be a JSON schema of an object", param)
            else:
                params = {"type": "object", **params}
            notes += [f"{name}: {n}" for n in check_json_schema(params, strict=fn.get("strict") is True, param=param)]
            schemas[name] = params

        start = TokenFormat(token=self.tool_call_start_id) if self.tool_call_start_id is not None else "<tool_call>"
        end = TokenFormat(token=self.tool_call_end_id) if self.tool_call_end_id is not None else "</tool_call>"

        def make_format():
            tags = []
            for name, params in schemas.items():
                if style == "hermes":
                    content = SequenceFormat(elements=[
                        ConstStringFormat(value='\n{"name": ' + json.dumps(name) + ', "arguments": '),
                        self._json_format(params),
                        ConstStringFormat(value="}\n"),
                    ])
                else:
                    content = SequenceFormat(elements=[
                        ConstStringFormat(value=f"\n<function={name}>\n"),
                        self._json_format(params, style="qwen_xml"),
                        ConstStringFormat(value="\n</function>\n"),
                    ])
                tags.append(TagFormat(begin=start, content=content, end=end))
            return TagsWithSeparatorFormat(tags=tags, separator="\n", at_least_one=True, stop_after_first=not parallel)

        key = [style, parallel, sorted(schemas.items())]
        return self._factory("tool_calls", key, make_format, thinking, notes, "tools")


def _only_keys(obj: dict, allowed: set[str], param: str) -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        raise StructuredOutputError(f"{param}.{extra[0]} is not supported", f"{param}.{extra[0]}")


def _check_tools(tools) -> dict[str, dict]:
    if tools is None:
        return {}
    if not isinstance(tools, list):
        raise StructuredOutputError("tools must be a list", "tools")
    out: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        p = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise StructuredOutputError(f"{p} must be {{'type': 'function', 'function': {{...}}}}", p)
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise StructuredOutputError(f"{p}.function.name must be 1 to 64 letters, digits, '_', '.', ':' or '-'",
                                        f"{p}.function.name")
        if name in out:
            raise StructuredOutputError(f"{p}.function.name {name!r} is defined twice", f"{p}.function.name")
        strict = fn.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise StructuredOutputError(f"{p}.function.strict must be a boolean", f"{p}.function.strict")
        out[name] = {**fn, "_index": i}
    return out


def _check_tool_choice(choice, functions: dict) -> str:
    """'none', 'auto', 'required', or the name of the forced function."""
    if choice is None:
        return "auto" if functions else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise StructuredOutputError("tool_choice must be 'none', 'auto', 'required' or a named function",
                                        "tool_choice")
        if choice == "required" and not functions:
            raise StructuredOutputError("tool_choice 'required' needs at least one tool", "tool_choice")
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict) \
            and set(choice) == {"type", "function"} and set(choice["function"]) == {"name"}:
        name = choice["function"]["name"]
        if name not in functions:
            raise StructuredOutputError(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
        return name
    raise StructuredOutputError(
        "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
        "tool_choice")


def _clean(e: Exception) -> str:
    """xgrammar's message without its time stamp and source location."""
    text = str(e).strip()
    text = re.sub(r"^\[[0-9:]+\]\s+\S+:\d+:\s*", "", text)
    return text.splitlines()[0] if text else type(e).__name__

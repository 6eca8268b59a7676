"""The grammar benchmark's harness, on xgrammar alone with few streams (the full comparison is
`python -m bench.grammar`)."""

from __future__ import annotations

import json

from bench import grammar


def test_grammar_bench_runs_and_writes_its_report(tmp_path):
    assert grammar.main(["--quick", "--libs", "xgrammar", "--streams", "2", "--out", str(tmp_path)]) == 0
    (report,) = tmp_path.glob("grammar-*.json")
    result = json.loads(report.read_text())
    assert result["cpu"]["logical_cpus"] >= 1 and result["versions"]["xgrammar"]
    rows = result["vocabs"]["qwen3"]["libs"]["xgrammar"]["schemas"]
    assert set(rows) == set(grammar.SCHEMAS)
    for r in rows.values():
        assert "error" not in r and r["tokens"] > 5 and r["fill16_ms_mean"] > 0 and r["numpy_apply16_ms_mean"] > 0
    md = report.with_suffix(".md").read_text()
    assert "| xgrammar | tree_recursive |" in md and "151936 rows" in md


def test_probe_classifies_features():
    from bench import qwen_vocab

    tok = qwen_vocab.load("qwen3")
    adapter = grammar.XGrammar(tok, 151936, [151645, 151643])
    assert grammar.probe(adapter, tok, *grammar.PROBES["enum"]) == "enforced"
    assert grammar.probe(adapter, tok, *grammar.PROBES["uniqueItems"]) == "ignored"
    assert grammar.probe(adapter, tok, {"type": "string", "pattern": "(?<=a)b"}, "b", "c").startswith("refused")

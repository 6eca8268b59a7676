"""The benchmark harness, smoke-run on the tiny model (what CI runs; `make bench` is the real thing)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from ..conftest import ROOT


def test_bench_smoke_run_writes_results_chart_and_table(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--out-dir", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "smoke.json").read_text())
    labels = [run["label"] for run in data["runs"]]
    assert labels == ["qwen-serve", "seeds-design"]
    for run in data["runs"]:
        assert [lv["concurrency"] for lv in run["levels"]] == [1, 2]
        for lv in run["levels"]:
            assert lv["errors"] == 0 and lv["generated_tokens"] > 0 and lv["tokens_per_second"] > 0
            assert lv["ttft_p50"] > 0 and lv["peak_rss_bytes"] > 0
        assert 0 < run["ready_seconds"] < 300
    png = (tmp_path / "smoke.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    table = (tmp_path / "smoke.md").read_text()
    assert "| qwen-serve |" in table and "| seeds-design |" in table and "×baseline" in table
    assert "| start to ready |" in table
    # json_schema against free text on the same server: every constrained reply finished and parses
    s = data["runs"][0]["structured"]
    [round_] = s["rounds"]
    assert round_["json_schema"]["valid_json"] == 2 and round_["json_schema"]["errors"] == 0
    assert round_["free"]["errors"] == 0 and round_["free"]["valid_json"] is None
    assert s["json_tokens_per_second"] > 0 and s["throughput_overhead"] is not None
    assert round_["json_schema"]["grammar_seconds"] > 0 and s["grammar_seconds_free_runs"] == 0
    assert 0 < s["grammar_share"] < 1
    assert "| json_schema (strict) |" in table and "2 of 2" in table
    # one stream on two servers side by side, alternating: each round times both, the ratio is theirs over ours
    pair, long = data["paired"]
    assert (pair["a"], pair["b"]) == ("qwen-serve", "seeds-design") and len(pair["rounds"]) == 2
    for round_ in pair["rounds"]:
        assert set(round_) == {"qwen-serve", "seeds-design"} and all(v > 0 for v in round_.values())
    assert pair["speed_min"] <= pair["speed_median"] <= pair["speed_max"]
    assert pair["speed_median"] == pytest.approx(
        statistics.median(r["seeds-design"] / r["qwen-serve"] for r in pair["rounds"]))
    assert "| qwen-serve | seeds-design | 2 |" in table
    # the same pair again on servers that hold a long context, a new long prompt each round, first tokens timed
    assert (long["a"], long["b"], long["context"]) == ("qwen-serve", "seeds-design", 300)
    assert len(long["rounds"]) == len(long["ttft_rounds"]) == 2
    for round_ in long["ttft_rounds"]:
        assert set(round_) == {"qwen-serve", "seeds-design"} and all(v > 0 for v in round_.values())
    assert long["prefill_speed_median"] == pytest.approx(
        statistics.median(r["seeds-design"] / r["qwen-serve"] for r in long["ttft_rounds"]))
    assert "One stream at 300 tokens of context" in table
    # and a conversation's next turn on those servers: both turns timed on both
    talk = data["conversation"]
    assert (talk["a"], talk["b"], talk["context"]) == ("qwen-serve", "seeds-design", 300) and len(talk["rounds"]) == 1
    for side in talk["rounds"][0].values():
        assert side["first_turn"] > 0 and side["next_turn"] > 0
    assert "A conversation's next turn at 300 tokens of history" in table
    cpu = data["meta"]["cpu"]  # every run names the machine it measured
    assert cpu["model"] != "unknown" and cpu["model"] in table and cpu["cpus"] >= 1


def test_qwen_bench_cli_against_a_live_server(server, tmp_path):
    out, chart = tmp_path / "r.json", tmp_path / "r.png"
    r = subprocess.run([sys.executable, "-c", "from qwen_inference.bench.cli import main; raise SystemExit(main())",
                        "--url", server.url + "/v1", "--concurrency", "[1,3]", "--requests", "3",
                        "--max-tokens", "5", "--prompt-words", "4", "--out", str(out), "--chart", str(chart)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert [lv["requests"] for lv in data["levels"]] == [3, 3]
    assert all(lv["generated_tokens"] == 15 for lv in data["levels"])
    assert chart.read_bytes().startswith(b"\x89PNG")
    # a server that refuses everything is reported as errors, with a non-zero exit
    r = subprocess.run([sys.executable, "-c", "from qwen_inference.bench.cli import main; raise SystemExit(main())",
                        "--url", server.url + "/v1", "--model", "no-such-model", "--concurrency", "[1]",
                        "--requests", "2", "--max-tokens", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert '"errors": 2' in r.stdout and "HTTP 404" in r.stdout


def test_ignore_eos_can_be_left_out_for_servers_that_refuse_it():
    """transformers' server answers 422 to `ignore_eos`; the harness can leave it out and still counts tokens."""
    import asyncio
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from qwen_inference.bench.load import run_level

    class Strict(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if "ignore_eos" in body:
                self.send_response(422)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            events = [{"choices": [{"index": 0, "delta": {"content": w}}]} for w in ("a", "b", "c")]
            events.append({"choices": [], "usage": {"completion_tokens": 3}})
            data = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data.encode())

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Strict)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1/chat/completions"
    try:
        refused = asyncio.run(run_level(url, None, 2, 2, 3, 3, seed=0))
        assert refused.errors == 2 and "HTTP 422" in refused.error_samples[0]
        ok = asyncio.run(run_level(url, None, 2, 2, 3, 3, seed=0, ignore_eos=False))
        assert ok.errors == 0 and ok.generated_tokens == 6
    finally:
        httpd.shutdown()


def test_gpu_harness_runs_its_parts_on_the_cpu(tmp_path):
    """`make bench-gpu` needs a GPU; its harness (parity against transformers in three precisions, throughput
    through qwen-serve against transformers' continuous batching) runs here on the CPU and tiny models, so it is
    known to work before a GPU runs it."""
    r = subprocess.run([sys.executable, "-m", "bench.gpu", "--device", "cpu", "--models", "tiny", "--levels", "1,2",
                        "--out-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    [out] = tmp_path.glob("*-gpu.json")
    data = json.loads(out.read_text())
    assert [p["arch"] for p in data["parity"]] == ["qwen2", "qwen3", "qwen3_5"]
    for p in data["parity"]:
        assert "error" not in p, p.get("error")
        assert p["float32_alone_equal"] == p["alone"] == 3 and p["float32_together_equal"] == p["prompts"] == 8
        for low in ("bfloat16", "float16"):
            assert 0 < p[low]["max_abs_diff"] < 1 and p[low]["cosine_min"] > 0.9
    [t] = data["throughput"]
    assert "error" not in t and "transformers_error" not in t, t
    for side in ("qwen_serve", "transformers"):
        assert [lv["concurrency"] for lv in t[side]] == [1, 2]
        assert all(lv["generated_tokens"] == lv["requests"] * 48 and lv["tokens_per_second"] > 0 for lv in t[side])
    assert t["transformers"][0]["mode"].startswith("generate_batch")
    table = out.with_suffix(".md").read_text()
    assert "| qwen2 | 3/3 | 8/8 |" in table and "| qwen3_5 | 3/3 | 8/8 |" in table


def test_a_server_that_fails_mid_conversation_ends_the_rounds_and_keeps_the_run(server):
    """`make bench` records which server failed, and in which round, instead of losing the whole run."""
    import asyncio

    from bench.run import Server, conversation, conversation_table
    from devcluster import free_port

    ours = Server("qwen-serve", [], server.port, "/health")
    gone = Server("gone", [], free_port(), "/health")  # nothing listens there
    talk = asyncio.run(conversation(ours, gone, 20, False, 300, rounds=2))
    assert talk["rounds"] == [] and talk["next_turn_a_median"] is None
    assert talk["failed"].startswith("gone failed in round 1: ConnectError")
    table = conversation_table(talk)
    assert "Not finished: gone failed in round 1" in table and "| qwen-serve |" not in table


def test_a_run_held_to_an_older_cpu_names_the_cap_and_builds_llama_cpp_for_it(monkeypatch):
    """`make bench --max-cpu-isa`: the CPU's record says what the run was held to, without the flags above it, and
    llama.cpp is configured for that CPU instead of for this one."""
    from bench import llamacpp
    from bench.run import cpu_info
    from qwen_inference import sysinfo

    monkeypatch.setenv(sysinfo.MAX_CPU_ISA_ENV, "avx512_vnni")
    sysinfo.cpu_flags.cache_clear()
    try:
        info = cpu_info()
    finally:
        monkeypatch.delenv(sysinfo.MAX_CPU_ISA_ENV)
        sysinfo.cpu_flags.cache_clear()
    assert info["max_cpu_isa"] == "avx512_vnni" and "avx512_bf16" not in info["flags"]
    assert "max_cpu_isa" not in cpu_info()
    for cap, flags in llamacpp.ISA_FLAGS.items():
        assert cap in sysinfo.ONEDNN_ISAS and "-DGGML_NATIVE=OFF" in llamacpp.COMMON_ISA
        assert ("-DGGML_AVX512=ON" in flags) == cap.startswith("avx512")
        assert ("-DGGML_AVX512_VNNI=ON" in flags) == (cap == "avx512_vnni") and "-DGGML_AVX512_BF16=ON" not in flags


def test_the_results_table_at_one_level_shows_it_once():
    from bench.run import table

    def run(label, tps, ready):
        return {"label": label, "levels": [{"concurrency": 1, "tokens_per_second": tps, "ttft_p50": 0.2}],
                "ttft_long_prompt_p50": None, "peak_rss_bytes": 2**30, "ready_seconds": ready}

    rows = table([run("qwen-serve", 30.0, 6.1), run("seeds-design", 10.0, None)]).splitlines()
    assert rows[0] == ("| server | 1 stream: tok/s | ×baseline | TTFT p50 @1 | TTFT, 256-token prompt alone | "
                       "peak RSS | start to ready |") and rows[1] == "|---" * 7 + "|"
    assert rows[2] == "| qwen-serve | 30.0 | 3.0× | 0.20 s | – | 1.00 GiB | 6.10 s |"
    assert rows[3] == "| seeds-design | 10.0 | 1.0× | 0.20 s | – | 1.00 GiB | – |"

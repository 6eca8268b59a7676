"""qwen-serve as users run it: a process with flags, JSON logs, 503 while loading, graceful SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from ..conftest import free_port


def start(*args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    e = dict(os.environ, PYTHONUNBUFFERED="1")
    e.update(env or {})
    cmd = [sys.executable, "-c", "from qwen_inference.cli import serve_main; raise SystemExit(serve_main())",
           "--port", str(port), *args]
    p = subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return p, f"http://127.0.0.1:{port}"


def wait_health(url: str, p: subprocess.Popen, timeout: float = 120) -> list[int]:
    codes = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert p.poll() is None, p.stderr.read()
        try:
            r = httpx.get(url + "/health", timeout=2)
            codes.append(r.status_code)
            if r.status_code == 200:
                return codes
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"not healthy: {codes[-5:]}")


def stop(p: subprocess.Popen) -> str:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    try:
        _, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
    return err


def test_flags_env_logs_and_health_across_loading(tiny_model):
    p, url = start("--model", str(tiny_model), "--dtype", "float32", "--served-model-name", "from-flag",
                   env={"QWEN_SERVED_MODEL_NAME": "from-env", "QWEN_MAX_TOKENS_CAP": "9"})
    try:
        codes = wait_health(url, p)
        assert 503 in codes and codes[-1] == 200  # 503 while the model loads, then 200
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "from-flag"
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                           "max_tokens": 10})
        assert r.status_code == 400 and "(9)" in r.json()["error"]["message"]  # the env var set the cap
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                           "max_tokens": 4})
        assert r.status_code == 200
    finally:
        err = stop(p)
    lines = [line for line in err.splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line on stderr is one JSON object
    access = [e for e in entries if e["logger"] == "qwen_inference.access"]
    # /v1/models, then the two chats; probes (/health) are not logged
    assert [(e["path"], e["status"]) for e in access] == [("/v1/models", 200), ("/v1/chat/completions", 400),
                                                          ("/v1/chat/completions", 200)]
    ready = [e for e in entries if e["message"] == "model ready"]
    assert ready and ready[0]["dtype"] == "float32"
    assert p.returncode == 0  # a drained SIGTERM is a clean exit (Kubernetes shows 143 as an error)
    assert any(e["message"].startswith("shutting down") for e in entries)


def test_sigterm_finishes_running_requests_and_refuses_new_ones(tiny_model):
    p, url = start("--model", str(tiny_model), "--dtype", "float32", "--shutdown-grace", "30")
    try:
        wait_health(url, p)
        result = {}

        def long_request():
            result["r"] = httpx.post(url + "/v1/chat/completions", timeout=120, json={
                "messages": [{"role": "user", "content": "x"}], "max_tokens": 300, "temperature": 0})

        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(0.5)
        p.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
        t.join(120)
        assert result["r"].status_code == 200
        assert result["r"].json()["usage"]["completion_tokens"] == 300
        # the one SIGTERM ends it (a second, as `stop` would send, could land while the interpreter finalizes,
        # when Python has put the default handlers back: the kubelet sends one, then SIGKILL after the grace)
        assert p.wait(timeout=60) == 0
    finally:
        stop(p)
    assert p.returncode == 0


def test_demo_model_banner_and_first_use(tmp_path):
    p, url = start("--model-cache-dir", str(tmp_path))
    try:
        wait_health(url, p, timeout=180)
        assert (tmp_path / "demo" / "RANDOM_WEIGHTS.md").is_file()
        assert httpx.get(url + "/").text.startswith("<!doctype html>")
    finally:
        err = stop(p)
    head = err.splitlines()[:4]
    assert "RANDOM weights" in head[0]
    assert any("qwen-model download Qwen/Qwen3.5-2B" in line for line in head)


def test_rope_scaling_takes_prompts_past_the_models_positions(tiny_model, tmp_path):
    """--rope-scaling (yarn, twice the tiny model's 4096 positions) lets --max-model-len 8192 through, and a
    prompt past 4096 tokens is answered; without it that --max-model-len is refused with the reason."""
    yarn = '{"rope_type": "yarn", "factor": 2.0}'
    p, url = start("--model", str(tiny_model), "--dtype", "float32", "--rope-scaling", yarn,
                   "--max-model-len", "8192", "--kv-cache-tokens", "8192", "--max-concurrency", "1")
    try:
        wait_health(url, p)
        assert httpx.get(url + "/v1/models").json()["data"][0]["max_model_len"] == 8192
        r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": " hello" * 5000}], "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 5000
    finally:
        err = stop(p)
    assert any("the model takes 8192 positions" in json.loads(line)["message"] for line in err.splitlines())
    from qwen_inference import loader
    from qwen_inference.settings import ServeSettings

    with pytest.raises(ValueError, match="--max-model-len 8192 exceeds the model's 4096 positions"):
        loader.load(ServeSettings(model=str(tiny_model), dtype="float32", max_model_len=8192))


def test_a_model_that_cannot_load_ends_the_process_with_the_reason(tmp_path):
    """The reason goes to stderr and to the termination message, and the exit code is 1, so on Kubernetes the
    pod restarts with back-off and says why instead of sitting unready until its startup probe gives up."""
    term = tmp_path / "termination-log"
    term.write_text("")
    p, url = start("--model", str(tmp_path / "missing"), env={"QWEN_TERMINATION_LOG": str(term)})
    try:
        code = p.wait(120)
    finally:
        err = stop(p)
    assert code == 1
    assert "neither a folder" in err.splitlines()[-1] and err.splitlines()[-1].startswith("qwen-serve: error:")
    assert term.read_text().startswith("loading the model failed:") and "neither a folder" in term.read_text()

def test_an_unsupported_architecture_exits_3_before_reading_anything_else(tmp_path):
    """One line naming the model type and the supported ones, on stderr and as the termination message; exit 3
    (the operator's status then says ModelNotSupported). The folder holds nothing but its config: the
    architecture is checked before the tokenizer or any weight is read."""
    import json

    model = tmp_path / "moe"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen3_5_moe"}))
    term = tmp_path / "termination-log"
    term.write_text("")
    p, url = start("--model", str(model), env={"QWEN_TERMINATION_LOG": str(term)})
    try:
        code = p.wait(120)
    finally:
        err = stop(p)
    assert code == 3
    line = err.splitlines()[-1]
    assert line.startswith("qwen-serve: error: model not supported: model type 'qwen3_5_moe'"), err[-2000:]
    assert "supported: llama, qwen2, qwen3, qwen3_5, qwen3_5_text" in line
    assert term.read_text() == line.removeprefix("qwen-serve: error: ")

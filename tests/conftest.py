"""Shared fixtures: a random tiny model made once per machine, and real servers on loopback ports."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path

import httpx
import hypothesis
import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen-operator" / "test-models"

sys.path.insert(0, str(ROOT / "scripts"))
from devcluster import free_port  # noqa: E402,F401  (one helper for the whole project; tests import it from here)

# Property tests and the API fuzzer draw their examples from a fixed seed, so a run is reproducible and a red
# one reruns red; `make fuzz` (QWEN_FUZZ=long) draws fresh ones, many more, to go looking for new failures.
FUZZ_LONG = os.environ.get("QWEN_FUZZ") == "long"
FUZZ_SCALE = 20 if FUZZ_LONG else 1  # how many times the usual number of examples a test draws
hypothesis.settings.register_profile("reproducible", derandomize=True, database=None)
hypothesis.settings.register_profile("explore", derandomize=False, database=None, print_blob=True)
hypothesis.settings.load_profile("explore" if FUZZ_LONG else "reproducible")


def make_model(preset: str, dtype: str | None = None) -> Path:
    """A random model, made once per machine and reused (tests never change it). The folder's name carries
    make-random's format version, so a model written by an older make-random is never picked up."""
    from filelock import FileLock

    from qwen_inference.random_model import FORMAT_VERSION, make_random_model

    CACHE.mkdir(parents=True, exist_ok=True)
    out = CACHE / f"{preset}-{dtype or 'default'}-v{FORMAT_VERSION}"
    with FileLock(str(CACHE / f".{out.name}.lock")):
        if not out.is_dir():
            make_random_model(preset, out, dtype)
    return out


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return make_model("tiny", "float32")


@pytest.fixture(scope="session")
def tiny_qwen3_model() -> Path:
    """Qwen3's architecture and tokenizer, tiny."""
    return make_model("tiny-qwen3", "float32")


@pytest.fixture(scope="session")
def tiny_qwen35_model() -> Path:
    """Qwen3.5 in its published multimodal layout (Qwen3_5ForConditionalGeneration), tiny."""
    return make_model("tiny-qwen3.5", "float32")


@pytest.fixture(scope="session")
def tiny_qwen35_text_model() -> Path:
    """Qwen3.5 in the text-only layout (Qwen3_5ForCausalLM), tiny; the same language model as tiny-qwen3.5."""
    return make_model("tiny-qwen3.5-text", "float32")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


class ServerThread:
    """A real qwen-serve app under uvicorn, in this process, on a loopback port."""

    def __init__(self, settings, *, load: bool = True) -> None:
        import uvicorn

        from qwen_inference.app import create_app

        self.settings = settings
        self.app = create_app(settings, load=load)
        self.state = self.app.state.qwen
        self.port = settings.port
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_config=None, access_log=False,
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, wait_ready: bool = True) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.server.started:
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("the server did not start")
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state.health()[0]:
                return
            if self.state.status == "failed":
                raise RuntimeError(self.state.reason)
            time.sleep(0.1)
        raise RuntimeError("the server did not become ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@contextlib.contextmanager
def running_server(model: Path, **overrides):
    from qwen_inference.settings import ServeSettings

    values = dict(model=str(model), port=free_port(), dtype="float32", device="cpu", max_concurrency=16,
                  max_queue=64, request_timeout=120, served_model_name="tiny")
    values.update(overrides)
    load = values.pop("_load", True)
    server = ServerThread(ServeSettings(**values), load=load).start(wait_ready=load)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def server(tiny_model):
    """The shared server: tiny model, float32, 16 slots."""
    with running_server(tiny_model) as s:
        yield s


@pytest.fixture(scope="session")
def qwen3_server(tiny_qwen3_model):
    """A server of the tiny Qwen3 model (the model opens <think> itself; Hermes tool calls)."""
    with running_server(tiny_qwen3_model, max_concurrency=8) as s:
        yield s


@pytest.fixture(scope="session")
def qwen35_server(tiny_qwen35_model):
    """A server of the tiny Qwen3.5 model (the template opens <think>; XML tool calls)."""
    with running_server(tiny_qwen35_model, max_concurrency=8) as s:
        yield s


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c

"""`qwen-model download` and `verify` against a local server that speaks the hub's file API."""

from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwen_inference import modelcache
from qwen_inference.modelcache import ModelCacheError, model_path, resolve, verify

from ..hubserver import FakeHub

REPO = "Qwen/Tiny-Random"


@pytest.fixture(scope="module")
def sharded_model(tmp_path_factory) -> Path:
    """A tiny random model split over several shards, as the hub's larger models are."""
    from qwen_inference import random_model

    out = tmp_path_factory.mktemp("repo") / "model"
    old = random_model.SHARD_BYTES
    random_model.SHARD_BYTES = 8 * 1024 * 1024
    try:
        random_model.make_random_model("tiny", out, "float32")
    finally:
        random_model.SHARD_BYTES = old
    assert len(verify(out)) >= 2
    return out


@pytest.fixture
def hub(sharded_model):
    with FakeHub() as h:
        h.state.repos[REPO] = sharded_model
        yield h


def qwen_model(*args: str, hub: FakeHub, tmp_path: Path, wait: bool = True, **env):
    e = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1",
             MODELSCOPE_ENDPOINT=hub.url, MODELSCOPE_CACHE=str(tmp_path / "ms-cache"),
             MODELSCOPE_CREDENTIALS_PATH=str(tmp_path / "ms-credentials"), PYTHONUNBUFFERED="1")
    for var in ("HF_TOKEN", "MODELSCOPE_API_TOKEN", "MODELSCOPE_DOMAIN"):
        e.pop(var, None)
    e.update(env)
    cmd = [sys.executable, "-c", "from qwen_inference.cli import model_main; raise SystemExit(model_main())", *args]
    if not wait:
        return subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=300)


def same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir() if p.is_file())
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


def test_download_success_then_served_from_cache(hub, sharded_model, tmp_path):
    cache = tmp_path / "cache"
    r = qwen_model("download", REPO, "--cache-dir", str(cache), hub=hub, tmp_path=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    final = model_path(cache, REPO, "main")
    assert final.is_dir()
    same_files(sharded_model, final)
    marker = json.loads((final / modelcache.MARKER).read_text())
    assert marker["model"] == REPO and marker["bytes"] > 0
    assert "done:" in r.stderr
    assert not (cache / ".partial" / f"{final.parent.name}--main").exists()
    assert resolve(REPO, cache) == final
    # a second run finds it and fetches nothing
    n = len(hub.state.requests)
    r = qwen_model("download", REPO, "--cache-dir", str(cache), hub=hub, tmp_path=tmp_path)
    assert r.returncode == 0 and "already in the cache" in r.stderr
    assert len(hub.state.requests) == n
    r = qwen_model("verify", str(final), hub=hub, tmp_path=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("ok:")


def test_resume_after_a_cut(hub, sharded_model, tmp_path):
    cache = tmp_path / "cache"
    shard = sorted(p.name for p in sharded_model.glob("*.safetensors"))[0]
    size = (sharded_model / shard).stat().st_size
    # every attempt of the first run is cut short, so the run fails and leaves a partial file
    hub.state.cut_after[shard] = size // 2
    r = qwen_model("download", REPO, "--cache-dir", str(cache), hub=hub, tmp_path=tmp_path,
                   HF_HUB_DOWNLOAD_TIMEOUT="5")
    final = model_path(cache, REPO, "main")
    if r.returncode == 0:
        # the client retried within its run: it must have resumed from where the cut happened
        ranges = [x for x in hub.ranges(shard) if x]
        assert ranges and int(ranges[-1].split("=")[1].split("-")[0]) > 0
    else:
        assert "failed" in r.stderr and not final.exists()
        r = qwen_model("download", REPO, "--cache-dir", str(cache), hub=hub, tmp_path=tmp_path)
        assert r.returncode == 0, r.stderr
        ranges = [x for x in hub.ranges(shard) if x]
        assert ranges and int(ranges[-1].split("=")[1].split("-")[0]) > 0, hub.ranges(shard)
    same_files(sharded_model, final)


def test_sigkill_at_any_point_never_leaves_an_accepted_folder(hub, sharded_model, tmp_path):
    cache = tmp_path / "cache"
    final = model_path(cache, REPO, "main")
    hub.state.bytes_per_second = 4 * 1024 * 1024
    for delay in (0.5, 2.0):
        p = qwen_model("download", REPO, "--cache-dir", str(cache), hub=hub, tmp_path=tmp_path, wait=False)
        time.sleep(delay + 2.0)  # the interpreter and its imports take about two seconds
        p.send_signal(signal.SIGKILL)
        p.wait(30)
        if final.exists():
            break  # it finished before the kill: then it must be whole
        partial = cache / ".partial" / f"{final.parent.name}--main"
        with pytest.raises(ModelCacheError):
            verify(partial)
        with pytest.raises(ModelCacheError, match="not in the cache"):
            resolve(REPO, cache)
    hub.state.bytes_per_second = None
    partial = cache / ".partial" / f"{final.parent.name}--main"
    started = [p for p in partial.rglob("*.part") if p.stat().st_size > 0] if partial.exists() else []
    before = len(hub.state.requests)
    r = qwen_model("download", REPO, "--cache-dir", str(cache), hub=hub, tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    same_files(sharded_model, final)
    assert started, "the killed runs should have left part of a file"
    if started:  # the killed run left part of a file: this run went on from there instead of starting over
        ranges = [rg for m, _p, rg in hub.state.requests[before:] if m == "GET" and rg]
        assert any(int(rg.split("=")[1].split("-")[0]) > 0 for rg in ranges), ranges


def test_two_concurrent_downloads_leave_one_good_copy(hub, sharded_model, tmp_path):
    cache = tmp_path / "cache"
    hub.state.bytes_per_second = 32 * 1024 * 1024
    procs = [qwen_model("download", REPO, "--cache-dir", str(cache), hub=hub, tmp_path=tmp_path, wait=False)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum("already in the cache" in o for o in outs) == 1
    final = model_path(cache, REPO, "main")
    same_files(sharded_model, final)
    assert [p.name for p in final.parent.iterdir()] == ["main"]
    assert not any((cache / ".partial").iterdir())


def test_unknown_model_fails_clearly(hub, tmp_path):
    r = qwen_model("download", "Qwen/Does-Not-Exist", "--cache-dir", str(tmp_path / "c"), hub=hub, tmp_path=tmp_path)
    assert r.returncode == 3  # for good: the fetch Job does not retry it
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_gated_model_needs_a_token(hub, sharded_model, tmp_path):
    hub.state.token = "hf_secret"
    cache = tmp_path / "c"
    r = qwen_model("download", REPO, "--cache-dir", str(cache), hub=hub, tmp_path=tmp_path)
    assert r.returncode == 3 and "token" in r.stderr.lower()
    r = qwen_model("download", REPO, "--cache-dir", str(cache), hub=hub, tmp_path=tmp_path, HF_TOKEN="hf_secret")
    assert r.returncode == 0, r.stderr
    same_files(sharded_model, model_path(cache, REPO, "main"))


def test_a_stalled_download_gives_up(hub, sharded_model, tmp_path):
    shard = sorted(p.name for p in sharded_model.glob("*.safetensors"))[0]
    hub.state.stall.add(shard)
    r = qwen_model("download", REPO, "--cache-dir", str(tmp_path / "c"), "--stall-timeout", "3", hub=hub,
                   tmp_path=tmp_path)
    assert r.returncode == 75
    assert "no data arrived" in r.stderr
    assert not model_path(tmp_path / "c", REPO, "main").exists()


def test_bad_arguments(hub, tmp_path):
    r = qwen_model("download", "not a repo id", "--cache-dir", str(tmp_path), hub=hub, tmp_path=tmp_path)
    assert r.returncode == 3 and "org/name" in r.stderr
    r = qwen_model("download", REPO, "--cache-dir", str(tmp_path), "--revision", "../x", hub=hub, tmp_path=tmp_path)
    assert r.returncode == 3 and "revision" in r.stderr
    r = qwen_model("download", REPO, "--cache-dir", str(tmp_path), "--source", "ftp", hub=hub, tmp_path=tmp_path)
    assert r.returncode == 2


# ---- ModelScope: the same cache, filled through the modelscope package -----------------------------


def test_modelscope_download_success_then_served_from_cache(hub, sharded_model, tmp_path):
    cache = tmp_path / "cache"
    r = qwen_model("download", REPO, "--cache-dir", str(cache), "--source", "modelscope", hub=hub, tmp_path=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "%|" not in r.stderr  # no progress bars in a Job's log: our own lines say how far it got
    final = model_path(cache, REPO, "main")
    same_files(sharded_model, final)
    # nothing but the model's files and the marker: no client bookkeeping left in the folder
    assert sorted(p.name for p in final.iterdir()) == sorted([modelcache.MARKER, *(p.name for p in sharded_model.iterdir())])
    assert json.loads((final / modelcache.MARKER).read_text())["source"] == "modelscope"
    assert set(hub.state.modelscope_revisions) == {"master"}  # ModelScope's default branch
    assert any(p.endswith("FilePath=config.json") for _m, p, _r in hub.state.requests)
    n = len(hub.state.requests)
    r = qwen_model("download", REPO, "--cache-dir", str(cache), "--source", "modelscope", hub=hub, tmp_path=tmp_path)
    assert r.returncode == 0 and "already in the cache" in r.stderr
    assert len(hub.state.requests) == n


def test_modelscope_revision_is_passed_through(hub, sharded_model, tmp_path):
    cache = tmp_path / "cache"
    r = qwen_model("download", REPO, "--cache-dir", str(cache), "--source", "modelscope", "--revision", "v1.0",
                   hub=hub, tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    assert set(hub.state.modelscope_revisions) == {"v1.0"}
    same_files(sharded_model, model_path(cache, REPO, "v1.0"))


def test_modelscope_resumes_after_a_cut(hub, sharded_model, tmp_path):
    cache = tmp_path / "cache"
    shard = sorted(p.name for p in sharded_model.glob("*.safetensors"))[0]
    size = (sharded_model / shard).stat().st_size
    hub.state.cut_after[shard] = size // 2
    r = qwen_model("download", REPO, "--cache-dir", str(cache), "--source", "modelscope", hub=hub, tmp_path=tmp_path)
    if r.returncode != 0:  # the run gave up: the next one picks up the partial file
        assert "failed" in r.stderr and not model_path(cache, REPO, "main").exists()
        r = qwen_model("download", REPO, "--cache-dir", str(cache), "--source", "modelscope", hub=hub,
                       tmp_path=tmp_path)
        assert r.returncode == 0, r.stderr
    starts = [int(x.split("=")[1].split("-")[0]) for x in hub.ranges(shard) if x]
    assert starts and max(starts) > 0, hub.ranges(shard)  # fetched the rest, not the whole file again
    same_files(sharded_model, model_path(cache, REPO, "main"))


def test_modelscope_unknown_model_fails_clearly(hub, tmp_path):
    r = qwen_model("download", "Qwen/Does-Not-Exist", "--cache-dir", str(tmp_path / "c"), "--source", "modelscope",
                   hub=hub, tmp_path=tmp_path)
    assert r.returncode == 3, r.stderr  # for good: the fetch Job does not retry it
    assert "Traceback" not in r.stderr and "does not exist" in r.stderr and "Qwen/Does-Not-Exist" in r.stderr
    assert not model_path(tmp_path / "c", "Qwen/Does-Not-Exist", "main").exists()


def test_modelscope_private_model_needs_a_token(hub, sharded_model, tmp_path):
    hub.state.token = "ms_secret"
    cache = tmp_path / "c"
    r = qwen_model("download", REPO, "--cache-dir", str(cache), "--source", "modelscope", hub=hub, tmp_path=tmp_path)
    assert r.returncode == 3 and "Traceback" not in r.stderr and "MODELSCOPE_API_TOKEN" in r.stderr
    assert not model_path(cache, REPO, "main").exists()
    r = qwen_model("download", REPO, "--cache-dir", str(cache), "--source", "modelscope", hub=hub, tmp_path=tmp_path,
                   MODELSCOPE_API_TOKEN="ms_secret")
    assert r.returncode == 0, r.stderr
    same_files(sharded_model, model_path(cache, REPO, "main"))


# ---- verify ---------------------------------------------------------------------------------------


@pytest.fixture
def copy(sharded_model, tmp_path) -> Path:
    import shutil

    dst = tmp_path / "m"
    shutil.copytree(sharded_model, dst)
    return dst


def test_verify_accepts_a_whole_model(copy):
    assert len(verify(copy)) >= 2


def test_verify_refuses_a_missing_shard(copy):
    shard = sorted(copy.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelCacheError, match=f"{shard.name} is missing"):
        verify(copy)


def test_verify_refuses_a_truncated_shard(copy):
    shard = sorted(copy.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelCacheError, match="truncated"):
        verify(copy)


def test_verify_refuses_a_corrupt_header(copy):
    shard = sorted(copy.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[10:20] = b"\x00" * 10
    shard.write_bytes(bytes(data))
    with pytest.raises(ModelCacheError, match="corrupt"):
        verify(copy)


def test_verify_refuses_a_shard_lacking_tensors(copy):
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.99.mlp.up_proj.weight"] = sorted(set(index["weight_map"].values()))[0]
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelCacheError, match="lacks 1 tensors"):
        verify(copy)


@pytest.mark.parametrize("missing, message", [("config.json", "config.json is missing"),
                                              ("tokenizer.json", "no tokenizer")])
def test_verify_refuses_missing_metadata(copy, missing, message):
    (copy / missing).unlink()
    with pytest.raises(ModelCacheError, match=message):
        verify(copy)


def test_verify_cli_exit_code(copy, tmp_path, hub):
    (copy / "config.json").write_text("{not json")
    r = qwen_model("verify", str(copy), hub=hub, tmp_path=tmp_path)
    assert r.returncode == 3 and "config.json is unreadable" in r.stderr


def test_resolve_errors(tmp_path):
    with pytest.raises(ModelCacheError, match="qwen-model download"):
        resolve("Qwen/Missing", tmp_path)
    with pytest.raises(ModelCacheError, match="neither a folder"):
        resolve("???", tmp_path)


def test_verify_refuses_a_tokenizer_json_that_does_not_parse(copy):
    (copy / "tokenizer.json").write_text('{"model": {"vocab": ')
    with pytest.raises(ModelCacheError, match="tokenizer.json is unreadable"):
        verify(copy)
    assert len(verify(copy, parse_tokenizer=False)) >= 2  # what the server asks: its tokenizer load tells


def test_the_server_names_a_tokenizer_that_does_not_load(copy):
    """The server does not parse tokenizer.json twice: resolve leaves it to the tokenizer's load, which fails
    with the folder and the reason, before any weight is read."""
    from qwen_inference import loader
    from qwen_inference.settings import ServeSettings

    (copy / "tokenizer.json").write_text('{"model": {"vocab": ')
    assert resolve(str(copy), copy.parent) == copy
    with pytest.raises(ModelCacheError, match=r"the tokenizer does not load \(") as e:
        loader.load(ServeSettings(model=str(copy), dtype="float32", device="cpu"))
    assert str(copy) in str(e.value)

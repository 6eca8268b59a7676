"""The model cache: where models live on disk, how they get there, and how a folder is proven complete.

Layout under a cache folder (a PVC in the cluster):

    <cache>/<org>--<name>/<revision>/      a complete model, renamed into place only when complete
    <cache>/.partial/<org>--<name>--<revision>/   a download in progress (resumed by the next run)
    <cache>/.locks/<org>--<name>--<revision>.lock  held while downloading, so two pods never both write
    <cache>/demo/                           the built-in demo model (random weights)

A folder is complete when `verify` accepts it: config, tokenizer and every weight shard the index names are
present and readable. Nothing half-written is ever at a final path, because only a finished, verified
download is renamed there.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .contract import DEMO, EXIT_STALLED, hub_folder

log = logging.getLogger("qwen_inference.modelcache")

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
MARKER = ".qwen-model.json"
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.md"]


class ModelCacheError(Exception):
    """A model that cannot be found, fetched or verified; the message says what to do. `permanent` when
    trying again cannot help (no such model, no access, a broken folder)."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


def is_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name)) and ".." not in name


def folder_name(model_id: str) -> str:
    if not is_hub_id(model_id):
        raise ModelCacheError(f"{model_id!r} is not a hub id of the form org/name", permanent=True)
    return model_id.replace("/", "--")


def _check_revision(revision: str) -> str:
    if not REVISION.match(revision) or ".." in revision:
        raise ModelCacheError(f"{revision!r} is not a valid revision", permanent=True)
    return revision


def model_path(cache_dir: Path, model_id: str, revision: str = "main") -> Path:
    folder_name(model_id)  # both checked before either names a folder
    return Path(cache_dir) / hub_folder(model_id, _check_revision(revision))


# ---------------------------------------------------------------------------------------------------
# verify


def _read_safetensors_header(path: Path) -> dict:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ModelCacheError(f"{path.name}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or n > 100 * 1024 * 1024 or 8 + n > size:
            raise ModelCacheError(f"{path.name}: corrupt safetensors header")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise ModelCacheError(f"{path.name}: corrupt safetensors header ({exc})") from None
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise ModelCacheError(f"{path.name}: corrupt entry for tensor {name}") from None
    if 8 + n + end != size:
        raise ModelCacheError(
            f"{path.name}: truncated or padded ({size} bytes on disk, {8 + n + end} expected)"
        )
    return header


def verify(folder: Path, parse_tokenizer: bool = True) -> list[str]:
    """Check a model folder; returns the weight files it holds, raises ModelCacheError naming what is wrong.
    `parse_tokenizer` False: tokenizer.json is not parsed (its own load, next, does that: a Qwen tokenizer.json
    takes a quarter of a second or more to parse in Python)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelCacheError(f"{folder} is not a folder")
    cfg = folder / "config.json"
    try:
        config = json.loads(cfg.read_text())
    except FileNotFoundError:
        raise ModelCacheError(f"{folder}: config.json is missing") from None
    except (OSError, ValueError) as exc:
        raise ModelCacheError(f"{folder}: config.json is unreadable ({exc})") from None
    if "model_type" not in config:
        raise ModelCacheError(f"{folder}: config.json has no model_type")
    if not (folder / "tokenizer.json").is_file() and not (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    ):
        raise ModelCacheError(f"{folder}: no tokenizer (tokenizer.json, or vocab.json and merges.txt)")
    for name in ("tokenizer.json", "tokenizer_config.json") if parse_tokenizer else ("tokenizer_config.json",):
        p = folder / name
        if p.is_file():
            try:
                json.loads(p.read_text())
            except (OSError, ValueError) as exc:
                raise ModelCacheError(f"{folder}: {name} is unreadable ({exc})") from None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise ModelCacheError(f"{folder}: model.safetensors.index.json is unreadable ({exc})") from None
        shards: dict[str, set[str]] = {}
        for tensor, shard in weight_map.items():
            shards.setdefault(shard, set()).add(tensor)
        for shard, tensors in sorted(shards.items()):
            p = folder / shard
            if "/" in shard or not p.is_file():
                raise ModelCacheError(f"{folder}: weight shard {shard} is missing")
            header = _read_safetensors_header(p)
            missing = tensors - header.keys()
            if missing:
                raise ModelCacheError(f"{folder}: {shard} lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
        return sorted(shards)
    single = folder / "model.safetensors"
    if not single.is_file():
        raise ModelCacheError(f"{folder}: no weights (model.safetensors or model.safetensors.index.json)")
    _read_safetensors_header(single)
    return ["model.safetensors"]


def folder_bytes(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


# ---------------------------------------------------------------------------------------------------
# download


@dataclass
class DownloadOptions:
    source: str = "huggingface"
    revision: str = "main"
    token: str | None = None
    endpoint: str | None = None
    stall_timeout: float = 300.0
    lock_timeout: float = 6 * 3600.0
    progress_interval: float = 5.0
    total_bytes: int | None = None  # set by the fetcher once the hub said how much there is


# One line every few seconds while a download runs, read by people in a Job's log and by the operator (which
# shows it in the QwenDeployment's status), so its form is fixed:
#   progress: <done> of <total> bytes (<pct>%), <rate> MB/s, ETA <duration>
#   progress: <done> bytes, <rate> MB/s                       (when the total is not known)
PROGRESS_PREFIX = "progress: "


def format_duration(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m}m" if m else f"{h}h"
    if m:
        return f"{m}m{sec}s" if sec else f"{m}m"
    return f"{sec}s"


def progress_line(done: int, total: int | None, rate: float) -> str:
    """`rate` in bytes a second, over the last few seconds."""
    if total:
        pct = min(100.0, 100.0 * done / total)
        eta = format_duration((total - done) / rate) if rate > 0 and total > done else ("0s" if done >= total
                                                                                          else "unknown")
        return f"{PROGRESS_PREFIX}{done} of {total} bytes ({pct:.1f}%), {rate / 1e6:.2f} MB/s, ETA {eta}"
    return f"{PROGRESS_PREFIX}{done} bytes, {rate / 1e6:.2f} MB/s"


class _Progress(threading.Thread):
    """Prints how far the download got (bytes on disk, partial files included, so a resumed run starts from
    what an earlier one left), the rate over the last half minute and, with a known total, the time left;
    stops the process when nothing arrives for `stall_timeout` seconds."""

    WINDOW = 30.0

    def __init__(self, folder: Path, opts: DownloadOptions, on_stall: Callable[[], None], out=sys.stderr) -> None:
        super().__init__(daemon=True, name="download-progress")
        self.folder, self.opts, self.on_stall, self.out = folder, opts, on_stall, out
        self.done = threading.Event()

    def run(self) -> None:
        samples: list[tuple[float, int]] = [(time.monotonic(), folder_bytes(self.folder))]
        last_change = samples[0][0]
        interval = min(self.opts.progress_interval, max(1.0, self.opts.stall_timeout / 4))
        while not self.done.wait(interval):
            now = time.monotonic()
            current = folder_bytes(self.folder)
            if current != samples[-1][1]:
                last_change = now
            samples.append((now, current))
            while len(samples) > 2 and now - samples[1][0] >= self.WINDOW:
                samples.pop(0)
            t0, b0 = samples[0]
            rate = max(0.0, (current - b0) / max(1e-9, now - t0))
            if now - last_change > self.opts.stall_timeout:
                print(f"error: no data arrived for {self.opts.stall_timeout:.0f}s; giving up (the next run resumes)",
                      file=self.out, flush=True)
                self.on_stall()
                return
            print(progress_line(current, self.opts.total_bytes, rate), file=self.out, flush=True)


def _fetch_huggingface(model_id: str, dest: Path, opts: DownloadOptions) -> str | None:
    """Every file of the repo at one commit, each resumed byte-for-byte from a `.part` file left by an
    earlier run (a killed pod, a dropped connection), checked against the hub's size and sha256."""
    import fnmatch

    import httpx
    from huggingface_hub import HfApi, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    token = opts.token or os.environ.get("HF_TOKEN") or None
    endpoint = (opts.endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    info = HfApi(endpoint=endpoint, token=token or False).model_info(model_id, revision=opts.revision,
                                                                     files_metadata=True)
    commit = info.sha
    files = [s for s in info.siblings or [] if any(fnmatch.fnmatch(s.rfilename, pat) for pat in ALLOW_PATTERNS)]
    if not any(s.rfilename == "config.json" for s in files):
        raise ModelCacheError(f"{model_id}@{opts.revision} has no config.json: is it a transformers model?")
    opts.total_bytes = sum((s.lfs.size if s.lfs else s.size) or 0 for s in files) or None
    headers = build_hf_headers(token=token or False, library_name="qwen-operator")
    timeout = httpx.Timeout(30.0, read=max(60.0, opts.stall_timeout * 2))
    with httpx.Client(headers=headers, timeout=timeout, follow_redirects=True) as client:
        for n, sib in enumerate(files, 1):
            size = sib.lfs.size if sib.lfs else sib.size
            url = hf_hub_url(model_id, sib.rfilename, revision=commit, endpoint=endpoint)
            _fetch_file(client, url, dest / sib.rfilename, size, sib.lfs.sha256 if sib.lfs else None)
            print(f"[{n}/{len(files)}] {sib.rfilename} ({(size or 0) / 1e6:.1f} MB)", file=sys.stderr, flush=True)
    return commit


RETRIES = 6


def _fetch_file(client, url: str, dest: Path, size: int | None, sha256: str | None) -> None:
    import hashlib

    import httpx

    if dest.is_file() and (size is None or dest.stat().st_size == size):
        return  # fetched by an earlier run
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(RETRIES):
        have = part.stat().st_size if part.exists() else 0
        if size is not None and have > size:
            part.unlink()
            have = 0
        if size is not None and have == size:
            break
        try:
            with client.stream("GET", url, headers={"Range": f"bytes={have}-"} if have else {}) as r:
                if r.status_code == 416 and have:
                    break  # nothing left to fetch
                if r.status_code in (401, 403):
                    raise ModelCacheError(f"{dest.name}: the hub refused access ({r.status_code}); give a token "
                                          "(HF_TOKEN)", permanent=True)
                if r.status_code == 404:
                    raise ModelCacheError(f"{dest.name}: not found on the hub", permanent=True)
                r.raise_for_status()
                append = have and r.status_code == 206
                with part.open("ab" if append else "wb") as f:
                    for chunk in r.iter_bytes(1 << 20):
                        f.write(chunk)
            break
        except (httpx.TransportError, httpx.HTTPStatusError) as exc:
            if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code < 500:
                raise ModelCacheError(f"{dest.name}: the hub answered {exc.response.status_code}") from None
            wait = min(30.0, 2.0 ** attempt)
            print(f"{dest.name}: {type(exc).__name__}: {exc}; resuming in {wait:.0f}s", file=sys.stderr, flush=True)
            time.sleep(wait)
    else:
        raise ModelCacheError(f"{dest.name}: the download kept failing after {RETRIES} attempts (run again to resume)")
    got = part.stat().st_size
    if size is not None and got != size:
        raise ModelCacheError(f"{dest.name}: got {got} bytes, expected {size} (run again to resume)")
    if sha256:
        h = hashlib.sha256()
        with part.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        if h.hexdigest() != sha256:
            part.unlink()
            raise ModelCacheError(f"{dest.name}: sha256 mismatch; the partial file was removed, run again")
    os.replace(part, dest)


def _fetch_modelscope(model_id: str, dest: Path, opts: DownloadOptions) -> str | None:
    """The repo's files through the modelscope package, which resumes partial files itself; honours
    MODELSCOPE_ENDPOINT and MODELSCOPE_API_TOKEN. ModelScope's default branch is `master`: `main` means it."""
    try:
        from modelscope.hub.snapshot_download import snapshot_download
    except ImportError:
        raise ModelCacheError(
            "the modelscope source needs the `modelscope` package (pip install 'qwen-operator[modelscope]')"
        ) from None
    revision = None if opts.revision == "main" else opts.revision
    snapshot_download(model_id, revision=revision, local_dir=str(dest), allow_patterns=ALLOW_PATTERNS,
                      token=opts.token or None, endpoint=opts.endpoint or None)
    if not (dest / "config.json").is_file():
        raise ModelCacheError(f"{model_id}@{opts.revision} has no config.json: is it a transformers model?",
                              permanent=True)
    return None


FETCHERS: dict[str, Callable[[str, Path, DownloadOptions], str | None]] = {
    "huggingface": _fetch_huggingface,
    "modelscope": _fetch_modelscope,
}


def download(model_id: str, cache_dir: Path, opts: DownloadOptions, out=sys.stderr) -> Path:
    """Fetch `model_id` into the cache (resumable, atomic, under a file lock); returns the final folder."""
    from filelock import FileLock, Timeout

    if opts.source not in FETCHERS:
        raise ModelCacheError(f"unknown source {opts.source!r}; choose one of {', '.join(FETCHERS)}")
    cache_dir = Path(cache_dir)
    final = model_path(cache_dir, model_id, opts.revision)
    key = f"{final.parent.name}--{final.name}"
    (cache_dir / ".locks").mkdir(parents=True, exist_ok=True)
    partial = cache_dir / ".partial" / key
    lock = FileLock(str(cache_dir / ".locks" / f"{key}.lock"))
    try:
        lock.acquire(timeout=opts.lock_timeout, poll_interval=1.0)
    except Timeout:
        raise ModelCacheError(f"another download of {model_id} holds the cache lock for over {opts.lock_timeout:.0f}s") from None
    try:
        if final.is_dir():
            verify(final)
            print(f"{model_id}@{opts.revision} is already in the cache at {final}", file=out, flush=True)
            return final
        partial.mkdir(parents=True, exist_ok=True)
        print(f"downloading {model_id}@{opts.revision} from {opts.source} into {final}", file=out, flush=True)
        progress = _Progress(partial, opts, on_stall=lambda: os._exit(EXIT_STALLED), out=out)
        progress.start()
        started = time.monotonic()
        try:
            commit = FETCHERS[opts.source](model_id, partial, opts)
        except ModelCacheError:
            raise
        except Exception as exc:  # noqa: BLE001: every hub error becomes one clear line
            raise ModelCacheError(f"downloading {model_id}@{opts.revision} failed: {_describe(exc)}",
                                  permanent=_is_permanent(exc)) from exc
        finally:
            progress.done.set()
        verify(partial)
        (partial / MARKER).write_text(
            json.dumps({"model": model_id, "revision": opts.revision, "source": opts.source, "commit": commit,
                        "bytes": folder_bytes(partial), "completed": int(time.time())})
        )
        final.parent.mkdir(parents=True, exist_ok=True)
        _make_readable(partial)
        os.rename(partial, final)
        seconds = time.monotonic() - started
        print(f"done: {model_id}@{opts.revision} is at {final} ({folder_bytes(final) / 1e6:.1f} MB in {seconds:.1f}s)",
              file=out, flush=True)
        return final
    finally:
        lock.release()


def _make_readable(folder: Path) -> None:
    """Other users (the server's non-root uid) read what the download wrote."""
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    os.chmod(folder, 0o755)


PERMANENT_HUB_ERRORS = {"RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"}
# what a hub's HTTP status means when a client raises a plain HTTP error for it (the modelscope package does)
PERMANENT_HTTP_STATUS = {
    401: "no access: the model is private or gated; give a token (MODELSCOPE_API_TOKEN, HF_TOKEN)",
    403: "no access: the model is private or gated; give a token (MODELSCOPE_API_TOKEN, HF_TOKEN)",
    404: "the model or revision does not exist, or it is private and no valid token was given",
}


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _is_permanent(exc: BaseException) -> bool:
    return type(exc).__name__ in PERMANENT_HUB_ERRORS or _http_status(exc) in PERMANENT_HTTP_STATUS


def _describe(exc: BaseException) -> str:
    name = type(exc).__name__
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    hints = {
        "RepositoryNotFoundError": "the model does not exist, or it is private and no valid token was given",
        "GatedRepoError": "the model is gated: accept its terms on the hub and give a token (HF_TOKEN)",
        "RevisionNotFoundError": "the revision does not exist",
    }
    if name in hints:
        return f"{name}: {hints[name]}"
    status_hint = PERMANENT_HTTP_STATUS.get(_http_status(exc) or 0)
    return f"{name}: {status_hint} ({first})" if status_hint else f"{name}: {first}"


# ---------------------------------------------------------------------------------------------------
# resolve


def ensure_demo(cache_dir: Path) -> Path:
    """The demo model (the tiny preset), made on first use under a file lock."""
    from filelock import FileLock

    from .random_model import make_random_model

    cache_dir = Path(cache_dir)
    folder = cache_dir / DEMO
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / ".locks").mkdir(exist_ok=True)
    with FileLock(str(cache_dir / ".locks" / "demo.lock")):
        if not folder.is_dir():
            log.info("making the demo model (random weights) in %s", folder)
            make_random_model("tiny", folder)
    return folder


def resolve(model: str, cache_dir: Path, revision: str = "main", check=None) -> Path:
    """A local folder, `demo`, or a hub id already in the cache. `check(folder)`, when given, runs before the
    folder's files are verified (the server refuses an architecture it does not run before anything else)."""
    if model == DEMO:
        return ensure_demo(cache_dir)
    p = Path(model).expanduser()
    if is_hub_id(model) and not p.is_dir():
        p = model_path(cache_dir, model, revision)
        if not p.is_dir():
            raise ModelCacheError(
                f"{model}@{revision} is not in the cache {cache_dir}; fetch it first with "
                f"`qwen-model download {model} --cache-dir {cache_dir} --revision {revision}`"
            )
    if p.is_dir():
        if check is not None:
            check(p)
        verify(p, parse_tokenizer=False)  # the server loads the tokenizer next, which tells a broken one
        return p
    raise ModelCacheError(f"--model {model!r} is neither a folder, `demo`, nor a hub id (org/name)")

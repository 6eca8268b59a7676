"""Console scripts: `qwen-serve` and `qwen-model`. Nothing is parsed or loaded at import time."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import BaseSettings, CliApp, CliPositionalArg, CliSubCommand, SettingsConfigDict

from .contract import (EXIT_FAILED, EXIT_MODEL_NOT_SUPPORTED, EXIT_OK, EXIT_PERMANENT, EXIT_USAGE,
                       TERMINATION_LOG_ENV, TerminationMessage)

log = logging.getLogger("qwen_inference.cli")

DEMO_BANNER = """\
qwen-serve: serving the built-in demo model. It has RANDOM weights: its replies are random text.
qwen-serve: to serve a real model, fetch it once and point --model at it:
qwen-serve:   qwen-model download Qwen/Qwen3.5-2B --cache-dir {cache}
qwen-serve:   qwen-serve --model Qwen/Qwen3.5-2B --model-cache-dir {cache}
"""


def _settings_error(prog: str, exc: ValidationError) -> int:
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        print(f"{prog}: {loc.replace('_', '-') + ': ' if loc else ''}{err.get('msg')}", file=sys.stderr)
    return EXIT_USAGE


def serve_main(argv: list[str] | None = None) -> int:
    from .settings import ServeSettings

    try:
        settings = CliApp.run(ServeSettings, cli_args=sys.argv[1:] if argv is None else argv)
    except ValidationError as exc:
        return _settings_error("qwen-serve", exc)
    return serve(settings)


def serve(settings) -> int:
    import uvicorn

    from . import logs
    from .app import create_app

    if settings.model == "demo":
        print(DEMO_BANNER.format(cache=settings.model_cache_dir), file=sys.stderr, end="", flush=True)
    logs.setup(settings.log_level)
    app = create_app(settings)
    state = app.state.qwen

    class Server(uvicorn.Server):
        load_failed = False

        def handle_exit(self, sig, frame) -> None:  # SIGTERM/SIGINT: fail readiness at once, then drain
            state.shutting_down = True
            log.info("shutting down: finishing running requests", extra={"grace_seconds": settings.shutdown_grace})
            super().handle_exit(sig, frame)

        async def on_tick(self, counter: int) -> bool:
            # a model that cannot load never will: exit, so the kubelet restarts the pod with back-off and
            # reports why, instead of a pod that stays unready until its startup probe gives up
            if state.status == "failed":
                self.load_failed = True
                return True
            return await super().on_tick(counter)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace) if settings.shutdown_grace else None,
        timeout_keep_alive=5,
    )
    server = Server(config)
    # uvicorn raises the signal it drained on again once it is done, with the handler it found: by default that
    # kills the process (exit 143, which Kubernetes shows as an error on every scale-down). A drain that ends is a
    # clean exit: 0.
    signal.signal(signal.SIGTERM, _drained)
    server.run()
    if server.load_failed:
        print(f"qwen-serve: error: {state.reason}", file=sys.stderr, flush=True)
        _termination_message(state.reason)
        return EXIT_MODEL_NOT_SUPPORTED if state.permanent else EXIT_FAILED
    return 0


def _drained(sig, frame) -> None:
    """SIGTERM once the server has drained (uvicorn's own handler catches it before): nothing more to do."""


# ---- qwen-model ------------------------------------------------------------------------------------


def _termination_message(text: str) -> None:
    """On Kubernetes, leave `text` where the kubelet keeps it for the operator: the termination message."""
    path = os.environ.get(TERMINATION_LOG_ENV, "/dev/termination-log")
    if os.path.exists(path) and os.access(path, os.W_OK):
        with open(path, "w") as f:
            f.write(text)


def _report(folder: Path) -> None:
    """The result of a fetch, as the termination message the operator reads."""
    from .modelcache import folder_bytes

    _termination_message(TerminationMessage(path=str(folder), bytes=folder_bytes(folder)).dumps())


class Download(BaseModel):
    """Fetch a model into the cache: resumable, atomic, under a file lock."""

    model: CliPositionalArg[str] = Field(description="Hub id, e.g. Qwen/Qwen3.5-2B")
    cache_dir: Path = Field(description="The cache folder")
    revision: str = Field("main", description="Branch, tag or commit")
    source: Literal["huggingface", "modelscope"] = Field("huggingface", description="Where to fetch from")
    stall_timeout: float = Field(300.0, gt=0, description="Give up when no data arrives for this many seconds")
    lock_timeout: float = Field(6 * 3600.0, gt=0, description="Wait this long for another download's lock")

    def cli_cmd(self) -> None:
        # one progress line every few seconds from our own reporter, not a client library's bars in a Job's log
        os.environ.setdefault("TQDM_DISABLE", "1")
        from .modelcache import DownloadOptions, download

        folder = download(self.model, self.cache_dir, DownloadOptions(
            source=self.source, revision=self.revision, stall_timeout=self.stall_timeout,
            lock_timeout=self.lock_timeout))
        _report(folder)


class Verify(BaseModel):
    """Check that a model folder is complete and readable."""

    folder: CliPositionalArg[Path] = Field(description="The model folder")

    def cli_cmd(self) -> None:
        from .modelcache import ModelCacheError, verify

        try:
            files = verify(self.folder)
        except ModelCacheError as exc:
            exc.permanent = True
            raise
        print(f"ok: {self.folder} ({len(files)} weight file{'s' if len(files) != 1 else ''})")
        _report(self.folder)


class MakeDemo(BaseModel):
    """Make the built-in demo model (random weights) in a cache folder, unless it is there already."""

    cache_dir: Path = Field(description="The cache folder")

    def cli_cmd(self) -> None:
        from .modelcache import ensure_demo, verify

        folder = ensure_demo(self.cache_dir)
        verify(folder)
        print(f"ok: {folder}")
        _report(folder)


PresetName = Literal[
    "tiny", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "tiny-qwen3", "qwen3-0.6b", "tiny-qwen3.5",
    "tiny-qwen3.5-text", "qwen3.5-0.8b", "qwen3.5-2b", "qwen3.5-4b", "qwen3.5-9b",
]


class MakeRandom(BaseModel):
    """Write a random-weight model of a Qwen architecture (Qwen2.5, Qwen3, Qwen3.5), with Qwen's real tokenizer."""

    preset: PresetName = Field(description="Architecture: tiny* for tests; the others have the published shapes")
    out: Path = Field(description="Folder to write (must not exist, or be empty)")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(None, description="Weight dtype")
    seed: int = Field(0, description="Random seed")

    def cli_cmd(self) -> None:
        from .random_model import make_random_model

        make_random_model(self.preset, self.out, self.dtype, self.seed)
        print(f"ok: {self.out}")


class BuildKernels(BaseModel):
    """Compile the engine's CPU kernels into $QWEN_KERNELS_DIR (a container image does this once, at build)."""

    def cli_cmd(self) -> None:
        from .engine import kernels

        reason = kernels.supported_cpu()
        path = kernels.build()
        print(f"ok: {path}" + (f" (not used on this machine: {reason})" if reason else ""))


class ModelCLI(BaseSettings):
    """Fetch, check and make models for qwen-serve."""

    model_config = SettingsConfigDict(cli_prog_name="qwen-model", cli_kebab_case=True, env_prefix="QWEN_MODEL_",
                                      cli_exit_on_error=True)
    download: CliSubCommand[Download]
    verify: CliSubCommand[Verify]
    make_random: CliSubCommand[MakeRandom]
    make_demo: CliSubCommand[MakeDemo]
    build_kernels: CliSubCommand[BuildKernels]

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)


# Exit codes of qwen-model (contract.py): 0 done, 1 failed (worth retrying), 2 bad arguments, 3 failed for good
# (no such model, no access, a broken folder), 75 stalled (the next run resumes). The fetch Job's
# podFailurePolicy retries 1 and 75 and gives up at once on 2 and 3.


def model_main(argv: list[str] | None = None) -> int:
    from .modelcache import ModelCacheError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "httpcore", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        CliApp.run(ModelCLI, cli_args=sys.argv[1:] if argv is None else argv)
    except ValidationError as exc:
        return _settings_error("qwen-model", exc)
    except ModelCacheError as exc:
        print(f"qwen-model: error: {exc}", file=sys.stderr)
        return EXIT_PERMANENT if exc.permanent else EXIT_FAILED
    except (FileExistsError, ValueError) as exc:
        print(f"qwen-model: error: {exc}", file=sys.stderr)
        return EXIT_PERMANENT
    return EXIT_OK

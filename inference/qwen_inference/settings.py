"""The inference server's settings: one pydantic-settings object, filled from flags and `QWEN_*` env vars.

A flag wins over its env var (`--max-queue 8` over `QWEN_MAX_QUEUE=16`), an env var over the default. A
`QWEN_*` variable that is neither a setting nor a name another program of this project reads is refused, so
a misspelt one fails at start instead of leaving its setting at the default.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

from .contract import ENV_PREFIX, env_name, is_other_program_env
from .sysinfo import cgroup_cpu_limit, max_cpu_isa


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qwen-operator" / "models"


class RopeScaling(BaseModel):
    """A longer context than the model was trained for, by scaling its rotary embedding: the `rope_scaling` of a
    model's config.json (`{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}`, as
    Qwen's model cards give it for Qwen2.5 and Qwen3), without editing the file."""

    model_config = ConfigDict(extra="forbid")

    rope_type: Literal["yarn", "linear"] = Field(
        description="yarn (what Qwen's model cards use) or linear (position interpolation).")
    factor: float = Field(gt=1, le=64, description="How many times the positions the model was trained for.")
    original_max_position_embeddings: int | None = Field(
        None, ge=16,
        description="yarn: the positions the model was trained for (default: its max_position_embeddings).")

    @model_validator(mode="after")
    def _check(self) -> "RopeScaling":
        if self.rope_type != "yarn" and self.original_max_position_embeddings is not None:
            raise ValueError("original_max_position_embeddings goes with rope_type yarn only")
        return self

    def parameters(self) -> dict[str, Any]:
        """The keys transformers' rope parameters take."""
        return self.model_dump(exclude_none=True)


class ServeSettings(BaseSettings):
    """Settings of `qwen-serve`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_prog_name="qwen-serve",
        extra="ignore",
        validate_default=True,
    )

    model: str = Field(
        "demo",
        description="A local model folder, a hub id looked up in --model-cache-dir, or `demo` "
        "(a tiny random-weight Qwen2 model made on first use).",
    )
    model_cache_dir: Path = Field(default_factory=default_cache_dir, description="Where hub models are cached.")
    revision: str = Field("main", description="Revision of a hub model to look up in the cache.")
    served_model_name: str | None = Field(None, description="Model name in the API (default: --model).")
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on (0: any free port).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bfloat16 on CUDA and on CPUs with AVX512 or AVX2 (where the engine's bf16 matmul "
        "runs), else float32."
    )
    quantize: Literal["none", "int8", "int4"] = Field(
        "none", description="CPU only. int8: int8 weights and per-token int8 activations: half the memory of "
        "bfloat16, the fastest single stream and the most throughput under load. int4: 4-bit weights in groups of "
        "32 (the output layer in int8): a quarter of the memory, a single stream about as fast as int8's. Each costs "
        "some accuracy (bench/README.md).")
    max_model_len: int | None = Field(
        None, ge=16, description="Longest prompt plus reply, in tokens (default: the model's, at most 8192)."
    )
    rope_scaling: RopeScaling | None = Field(
        None, description="A longer context by rotary scaling, replacing the model's own, in config.json's form: "
        "'{\"rope_type\": \"yarn\", \"factor\": 4.0, \"original_max_position_embeddings\": 32768}' (the model "
        "then takes factor times the positions it was trained for; raise --max-model-len to use them).")
    max_tokens_cap: int = Field(2048, ge=1, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(512, ge=1, description="max_tokens when a request gives none.")
    max_concurrency: int = Field(16, ge=1, le=1024, description="Sequences decoded together in one batch.")
    max_queue: int = Field(64, ge=0, description="Requests waiting for a slot before new ones get 429.")
    request_timeout: float = Field(600.0, gt=0, description="Seconds a request may take, queue included.")
    threads: int | None = Field(
        None, ge=1, description="CPU threads for the model (default: the cgroup CPU limit, not the host's cores)."
    )
    kv_cache_tokens: int | None = Field(
        None, ge=16, description="Tokens the KV cache holds across all sequences (default: sized from memory)."
    )
    prefill_chunk: int = Field(256, ge=16, description="Prompt tokens prefilled per engine step.")
    prefix_caching: bool = Field(
        True, description="Keep the KV cache of full blocks (16 tokens) of prompts and replies for later prompts "
                          "that start alike: a shared system prompt, the next turn of a conversation."
    )
    state_checkpoints: int | None = Field(
        None, ge=0, description="Models with linear-attention layers (Qwen3.5): copies of a sequence's recurrent "
                                "state kept at block boundaries for prefix caching, each the size of one sequence's "
                                "state (default: --max-concurrency, fewer where memory is short; 0: no prefix "
                                "caching for such models)."
    )
    max_images: int = Field(
        8, ge=0, le=64, description="Images a request may hold, for a model with a vision tower (Qwen3.5's "
                                    "published checkpoints); 0: no images, and the vision tower is not loaded."
    )
    max_image_bytes: int = Field(
        20 * 2**20, ge=1024, description="Largest image a request may send, in bytes as sent (decoded base64)."
    )
    responses_store: int = Field(
        256, ge=0, description="Responses (/v1/responses) kept in memory for previous_response_id and GET, least "
                               "recently used dropped first (0: none; requests must then send store: false)."
    )
    peer_url: str | None = Field(
        None, pattern=r"^https?://[^/?#\s]+$",
        description="This replica's address as the other replicas reach it (http://POD_IP:PORT). With "
                    "--peer-key-file, every replica reads the responses made by any other: their ids carry the "
                    "replica that made them, signed with the shared key.")
    peer_key_file: Path | None = Field(
        None, description="A key the replicas share (a file, for example mounted from a Secret): it signs response "
                          "ids and the requests between replicas.")
    api_key: SecretStr | None = Field(None, description="A key clients must send as `Authorization: Bearer`.")
    api_key_file: Path | None = Field(
        None, description="A file of keys, one per line (for example mounted from a Secret)."
    )
    auth_open_routes: bool = Field(
        True, description="Keep /health, /livez and /metrics open when an API key is set."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_prompts: bool = Field(False, description="Log prompts and replies (off by default).")
    shutdown_grace: float = Field(
        25.0, ge=0, description="Seconds running requests get to finish after SIGTERM."
    )
    seed: int = Field(0, description="Seed for requests that give none.")
    default_thinking: Literal["template", "on", "off"] = Field(
        "template", description="Whether Qwen3 and Qwen3.5 think when a request sets neither "
        "chat_template_kwargs.enable_thinking nor reasoning_effort: template keeps the chat template's default "
        "(Qwen3: on, Qwen3.5: off).")

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown_env(cls, data: Any) -> Any:
        problems = unknown_env(os.environ)
        try:
            max_cpu_isa()
        except ValueError as exc:
            problems.append(str(exc))
        if problems:
            raise PydanticCustomError("unknown_env", "{problems}", {"problems": "; ".join(problems)})
        return data

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, v: object) -> object:
        return None if v == "" else v

    @field_validator("peer_url")
    @classmethod
    def _bracket_ipv6(cls, v: str | None) -> str | None:
        """An IPv6 pod address as the downward API gives it, bare (`http://fd00::5:8000`, as the operator writes
        `http://$(POD_IP):8000`): bracketed, the last group being the port (`http://[fd00::5]:8000`)."""
        if v is None:
            return v
        scheme, _, rest = v.partition("://")
        host, sep, port = rest.rpartition(":")
        if host.count(":") >= 1 and not host.startswith("[") and sep and port.isdigit():
            return f"{scheme}://[{host}]:{port}"
        return v

    @model_validator(mode="after")
    def _check(self) -> "ServeSettings":
        if self.default_max_tokens > self.max_tokens_cap:
            self.default_max_tokens = self.max_tokens_cap
        if self.api_key_file is not None and not self.api_key_file.is_file():
            raise ValueError(f"--api-key-file {self.api_key_file} is not a readable file")
        if (self.peer_url is None) != (self.peer_key_file is None):
            raise ValueError("--peer-url and --peer-key-file go together: set both, or neither")
        if self.peer_key_file is not None and len(self.peer_key()) < 16:
            raise ValueError(f"--peer-key-file {self.peer_key_file} must hold a key of at least 16 characters")
        return self

    def peer_key(self) -> bytes:
        """The key the replicas share (the file's text, stripped); b"" when there is none."""
        if self.peer_key_file is None:
            return b""
        try:
            return self.peer_key_file.read_text(encoding="utf-8").strip().encode()
        except OSError as exc:
            raise ValueError(f"--peer-key-file {self.peer_key_file} cannot be read: {exc}") from None

    @property
    def effective_threads(self) -> int:
        return self.threads or cgroup_cpu_limit()

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    def api_keys(self) -> list[str]:
        """Every key that is accepted; empty when the API is open."""
        keys: list[str] = []
        if self.api_key is not None:
            keys.append(self.api_key.get_secret_value())
        if self.api_key_file is not None:
            for line in self.api_key_file.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(line)
        return keys


def setting_env_names() -> frozenset[str]:
    """Every `QWEN_*` variable `qwen-serve` reads."""
    return frozenset(env_name(name) for name in ServeSettings.model_fields)


def unknown_env(environ: Mapping[str, str]) -> list[str]:
    """One sentence per `QWEN_*` variable in `environ` that no program of this project reads, with the
    closest setting's name when one is close. Names are matched without case, as the settings read them."""
    known = setting_env_names()
    problems = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known or is_other_program_env(upper):
            continue
        close = difflib.get_close_matches(upper, sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else " (qwen-serve --help lists the settings; --max-queue, say, is QWEN_MAX_QUEUE)"
        problems.append(f"the environment variable {name} is not a qwen-serve setting{hint}")
    return problems

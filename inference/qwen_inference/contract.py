"""What the operator and the inference programs agree on, defined once and imported by both sides.

- the `QWEN_*` environment variables the operator sets on the inference pods (each one a `qwen-serve`
  setting), and the other `QWEN_*` names this project uses, so that `qwen-serve` can refuse the rest;
- the exit codes of `qwen-model`, which the fetch Job's podFailurePolicy reads;
- the termination message `qwen-model` leaves for the operator when it succeeds;
- the model key, which names what a cache volume must hold ("src:name@rev", "pvc:path" or "demo"), and the
  folder inside the cache where that model lives.

The operator image installs this package without torch or fastapi: this module imports neither, nor anything
from this package that does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# ---- environment ------------------------------------------------------------------------------------

ENV_PREFIX = "QWEN_"


def env_name(setting: str) -> str:
    """The environment variable of a `qwen-serve` setting: `max_queue` -> `QWEN_MAX_QUEUE`."""
    return ENV_PREFIX + setting.upper()


class ServerEnv:
    """The `qwen-serve` settings the operator writes into the inference pods' environment."""

    MODEL = "QWEN_MODEL"
    SERVED_MODEL_NAME = "QWEN_SERVED_MODEL_NAME"
    HOST = "QWEN_HOST"
    PORT = "QWEN_PORT"
    DEVICE = "QWEN_DEVICE"
    DTYPE = "QWEN_DTYPE"
    QUANTIZE = "QWEN_QUANTIZE"
    MAX_CONCURRENCY = "QWEN_MAX_CONCURRENCY"
    MAX_QUEUE = "QWEN_MAX_QUEUE"
    MAX_TOKENS_CAP = "QWEN_MAX_TOKENS_CAP"
    MAX_MODEL_LEN = "QWEN_MAX_MODEL_LEN"
    KV_CACHE_TOKENS = "QWEN_KV_CACHE_TOKENS"
    ROPE_SCALING = "QWEN_ROPE_SCALING"
    THREADS = "QWEN_THREADS"
    REQUEST_TIMEOUT = "QWEN_REQUEST_TIMEOUT"
    SHUTDOWN_GRACE = "QWEN_SHUTDOWN_GRACE"
    API_KEY_FILE = "QWEN_API_KEY_FILE"
    PEER_URL = "QWEN_PEER_URL"
    PEER_KEY_FILE = "QWEN_PEER_KEY_FILE"

    @classmethod
    def names(cls) -> frozenset[str]:
        return frozenset(v for k, v in vars(cls).items() if k.isupper())


# `qwen-model` reads where to leave its termination message from here (a test points it at a file).
TERMINATION_LOG_ENV = "QWEN_TERMINATION_LOG"

# `QWEN_*` names that are not `qwen-serve` settings but belong to this project all the same: `qwen-serve`
# lets these through and refuses any other `QWEN_*` name that is not one of its settings.
OTHER_ENV: frozenset[str] = frozenset({
    TERMINATION_LOG_ENV,
    # qwen-model's settings (env_prefix QWEN_MODEL_): one per subcommand
    "QWEN_MODEL_DOWNLOAD", "QWEN_MODEL_VERIFY", "QWEN_MODEL_MAKE_RANDOM", "QWEN_MODEL_MAKE_DEMO",
    "QWEN_MODEL_BUILD_KERNELS",
    # scripts/k8s-bin: the pinned versions of the local control plane
    "QWEN_K8S_VERSION", "QWEN_ETCD_VERSION", "QWEN_KWOK_VERSION", "QWEN_HELM_VERSION",
    "QWEN_PROM_OPERATOR_VERSION", "QWEN_KEDA_VERSION", "QWEN_KEDA_HTTP_VERSION", "QWEN_INFERENCE_EXTENSION_VERSION",
    "QWEN_PROMETHEUS_VERSION",
    # the opt-in test of the real KEDA operator (make test-keda)
    "QWEN_TEST_KEDA",
    # where the engine's compiled CPU kernels live (read wherever the engine runs, qwen-serve or not)
    "QWEN_KERNELS_DIR",
    # the most the engine's kernels (and torch's oneDNN) may use of the CPU's instruction sets (sysinfo.max_cpu_isa)
    "QWEN_MAX_CPU_ISA",
    # scripts/devcluster.py: where the local control plane keeps its state
    "QWEN_DEV_CLUSTER_STATE", "QWEN_DEV_CLUSTER_PROCESS_NODES",
    # scripts/nodeagent: where the process nodes keep their shared network registry
    "QWEN_PROCESS_NODES_RUN",
    # the long soak (make soak), fresh fuzz examples (make fuzz), and the kind cluster of tests/e2e/kind.sh
    "QWEN_SOAK", "QWEN_FUZZ", "QWEN_E2E_CLUSTER",
})
# whole families of names owned by other programs' settings: qwen-operator and qwen-bench
OTHER_ENV_PREFIXES: tuple[str, ...] = ("QWEN_OPERATOR_", "QWEN_BENCH_")


def is_other_program_env(name: str) -> bool:
    name = name.upper()
    return name in OTHER_ENV or name.startswith(OTHER_ENV_PREFIXES)


# ---- qwen-model's exit codes ------------------------------------------------------------------------

EXIT_OK = 0
EXIT_FAILED = 1  # failed; trying again may help
EXIT_USAGE = 2  # bad arguments
EXIT_PERMANENT = 3  # failed for good: no such model, no access, a broken folder
EXIT_STALLED = 75  # no data arrived for --stall-timeout seconds; the next run resumes (EX_TEMPFAIL)
# the fetch Job fails at once on these (its podFailurePolicy); it retries the others
EXIT_CODES_NOT_RETRIED: tuple[int, ...] = (EXIT_USAGE, EXIT_PERMANENT)
# qwen-serve exits EXIT_MODEL_NOT_SUPPORTED when the model cannot be served by this server at all (an unknown or
# refused architecture, a checkpoint without the tensors its config names), with one line saying why as its
# termination message; the operator's status then says ModelNotSupported. Other load failures exit EXIT_FAILED.
EXIT_MODEL_NOT_SUPPORTED = EXIT_PERMANENT


# ---- the termination message ------------------------------------------------------------------------

TERMINATION_MESSAGE_LIMIT = 4096  # bytes the kubelet keeps of a container's termination message


class TerminationMessage(BaseModel):
    """What a successful `qwen-model` run leaves in its container's termination message, as JSON."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    path: str = Field(description="The model folder, inside the cache volume.")
    bytes: int = Field(ge=0, description="Size of the model folder.")

    def dumps(self) -> str:
        text = self.model_dump_json()
        if len(text.encode()) > TERMINATION_MESSAGE_LIMIT:
            raise ValueError(f"the termination message is over {TERMINATION_MESSAGE_LIMIT} bytes")
        return text

    @classmethod
    def parse(cls, text: str | None) -> TerminationMessage | None:
        """The message, or None when `text` is not one (a log tail kept by FallbackToLogsOnError, say)."""
        if not text:
            return None
        try:
            return cls.model_validate_json(text)
        except ValidationError:
            return None


# ---- the model key ----------------------------------------------------------------------------------

HUB_SOURCES: tuple[str, ...] = ("huggingface", "modelscope")
SOURCES: tuple[str, ...] = (*HUB_SOURCES, "pvc", "demo")
DEMO = "demo"  # the demo model's key, and its folder in a cache


def hub_folder(model_id: str, revision: str) -> str:
    """Where a hub model lives inside a cache: `Qwen/Qwen2.5-0.5B-Instruct@main` ->
    `Qwen--Qwen2.5-0.5B-Instruct/main`. `qwen-model download` puts it there; the operator serves it from there."""
    return f"{model_id.replace('/', '--')}/{revision.replace('/', '--')}"


_HUB_KEY = re.compile(r"^(?P<source>[a-z]+):(?P<name>[^@:\s]+)@(?P<revision>[^@\s]+)$")


@dataclass(frozen=True)
class ModelKey:
    """What a cache volume must hold. Written as "huggingface:Qwen/Qwen2.5-0.5B-Instruct@main",
    "modelscope:…@…", "pvc:<folder in the volume>" or "demo" (in annotations, and hashed into Job names)."""

    source: str
    name: str  # the hub id; for pvc, the folder inside the volume; for demo, "demo"
    revision: str | None = None  # hub models only

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"unknown model source {self.source!r}; one of {', '.join(SOURCES)}")
        if self.source == "demo":
            if self.name != DEMO or self.revision is not None:
                raise ValueError("the demo model has no name or revision of its own")
        elif self.source == "pvc":
            if not self.name or self.revision is not None:
                raise ValueError("a pvc model key has a folder and no revision")
        elif not self.name or not self.revision or any(c in self.name for c in "@:") or "@" in self.revision:
            raise ValueError(f"a {self.source} model key needs a name and a revision")

    @classmethod
    def hub(cls, source: str, name: str, revision: str) -> ModelKey:
        if source not in HUB_SOURCES:
            raise ValueError(f"{source!r} is not a hub; one of {', '.join(HUB_SOURCES)}")
        return cls(source, name, revision)

    @classmethod
    def pvc(cls, folder: str) -> ModelKey:
        return cls("pvc", folder)

    @classmethod
    def demo(cls) -> ModelKey:
        return cls("demo", DEMO)

    @classmethod
    def parse(cls, text: str) -> ModelKey:
        """The key written by `str(key)`; ValueError for anything else."""
        if text == DEMO:
            return cls.demo()
        if text.startswith("pvc:"):
            return cls.pvc(text[4:])
        m = _HUB_KEY.match(text)
        if m is None or m["source"] not in HUB_SOURCES:
            raise ValueError(f"{text!r} is not a model key (source:name@revision, pvc:folder or demo)")
        return cls.hub(m["source"], m["name"], m["revision"])

    def __str__(self) -> str:
        if self.source == "demo":
            return DEMO
        if self.source == "pvc":
            return f"pvc:{self.name}"
        return f"{self.source}:{self.name}@{self.revision}"

    @property
    def is_hub(self) -> bool:
        return self.source in HUB_SOURCES

    def folder(self) -> str:
        """The model's folder, relative to the root of the cache volume."""
        if self.source == "demo":
            return DEMO
        if self.source == "pvc":
            return self.name
        assert self.revision is not None
        return hub_folder(self.name, self.revision)

    def describe(self) -> str:
        """The model in words, for status messages."""
        if self.source == "demo":
            return "the demo model"
        if self.source == "pvc":
            return f"the model at {self.name} in the volume"
        return f"{self.name}@{self.revision} from {self.source}"


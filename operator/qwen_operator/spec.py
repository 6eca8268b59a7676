"""The QwenDeployment spec and status as pydantic models.

These models are the one definition of the resource: `crd.py` renders the CRD's OpenAPI schema from them
(crds/qwendeployments.yaml is that rendering, checked by a test), and the operator validates every object it
reads with them. Rules across fields that the API server enforces are CEL `x-kubernetes-validations`,
declared here beside the fields they guard; `check_semantics` holds the rules CEL cannot express.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

HUB_ID_PATTERN = r"^([A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$"
REVISION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
QUANTITY_PATTERN = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
HOST_PATTERN = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DURATION_PATTERN = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"

Quantity = Annotated[str | int, Field(json_schema_extra={"x-kubernetes-int-or-string": True})]
SizeQuantity = Annotated[str, Field(pattern=QUANTITY_PATTERN, max_length=64)]


def rules(*pairs: tuple[str, str]) -> dict[str, Any]:
    return {"x-kubernetes-validations": [{"rule": r, "message": m} for r, m in pairs]}


class Base(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class SecretKeyRef(Base):
    name: str = Field(description="Name of a Secret in the QwenDeployment's namespace.", pattern=DNS_SUBDOMAIN,
                      max_length=253)
    key: str = Field("token", description="Key in the Secret.", max_length=253)


class ApiKeySecretRef(SecretKeyRef):
    key: str = Field("api-keys", description="Key in the Secret: one API key per line.", max_length=253)


class ModelSpec(Base):
    model_config = ConfigDict(
        json_schema_extra=rules(
            ("(self.name == 'demo') == (self.source == 'demo')",
             "model.name 'demo' goes with model.source 'demo', and source 'demo' with name 'demo'"),
            ("!(self.source in ['huggingface', 'modelscope']) || self.name.contains('/')",
             "a hub model name is org/name, for example Qwen/Qwen2.5-0.5B-Instruct"),
            ("self.source == 'pvc' || !has(self.path)", "model.path is only for source 'pvc'"),
        )
    )

    name: str = Field(description="Hub id (Qwen/Qwen2.5-0.5B-Instruct), `demo`, or, for source pvc, a label "
                      "for the model in the volume.", pattern=HUB_ID_PATTERN, max_length=192)
    source: Literal["huggingface", "modelscope", "pvc", "demo"] = Field(
        "huggingface", description="Where the model comes from: a hub, a pre-filled volume (cache.existingClaim), "
        "or the built-in random-weight demo model.",
        json_schema_extra=rules(("self == oldSelf", "model.source is immutable: create a new QwenDeployment")))
    revision: str = Field("main", description="Branch, tag or commit of the hub model.", pattern=REVISION_PATTERN)
    served_model_name: str | None = Field(None, description="Model name in the API (default: model.name).",
                                          max_length=256)
    path: str | None = Field(None, description="Folder of the model inside the volume, for source pvc "
                             "(default: model.name).", pattern=r"^[A-Za-z0-9._-][A-Za-z0-9._/-]*$", max_length=512)
    token_secret_ref: SecretKeyRef | None = Field(None, description="Secret holding a hub token, for gated models.")
    hub_endpoint: str | None = Field(None, description="Hub URL (a mirror, or a private hub).",
                                     pattern=r"^https?://[^\s]+$", max_length=512)


class RopeScalingSpec(Base):
    model_config = ConfigDict(
        json_schema_extra=rules(
            ("self.ropeType == 'yarn' || !has(self.originalMaxPositionEmbeddings)",
             "engine.ropeScaling.originalMaxPositionEmbeddings goes with ropeType yarn only"),
        )
    )

    rope_type: Literal["yarn", "linear"] = Field(
        description="yarn (what Qwen's model cards use for Qwen2.5 and Qwen3) or linear (position interpolation).")
    factor: float = Field(gt=1, le=64, description="How many times the positions the model was trained for.")
    original_max_position_embeddings: int | None = Field(
        None, ge=16, le=16777216,
        description="yarn: the positions the model was trained for (default: its max_position_embeddings).")


class EngineSpec(Base):
    quantize: Literal["none", "int8", "int4"] = Field(
        "none", description="Device cpu only. int8: int8 weights, half the memory of bfloat16, the fastest single "
        "stream and the most throughput under load; int4: 4-bit weights, a quarter of the memory, a single stream "
        "about as fast as int8's. Each costs some accuracy.")
    max_concurrency: int = Field(16, ge=1, le=1024, description="Sequences decoded together in one batch.")
    max_queue: int = Field(64, ge=0, le=100000, description="Requests that may wait for a slot before 429.")
    max_model_len: int | None = Field(None, ge=16, le=1048576,
                                      description="Context length in tokens (default: the model's, at most 8192).")
    rope_scaling: RopeScalingSpec | None = Field(
        None, description="A longer context than the model was trained for, by rotary scaling in place of the "
        "model's own: the model then takes factor times the positions it was trained for (raise maxModelLen to use "
        "them).")
    max_tokens: int = Field(2048, ge=1, le=1048576, description="Largest max_tokens a request may ask for.")
    request_timeout_seconds: int = Field(600, ge=1, le=86400, description="Seconds a request may take.")
    threads: int | None = Field(None, ge=1, le=1024, description="CPU threads (default: the CPU limit).")
    kv_cache_tokens: int | None = Field(None, ge=16, le=1 << 31,
                                        description="KV cache size in tokens (default: sized from memory).")


class CacheSpec(Base):
    model_config = ConfigDict(
        json_schema_extra=rules(
            ("has(self.existingClaim) == has(oldSelf.existingClaim) && "
             "(!has(self.existingClaim) || self.existingClaim == oldSelf.existingClaim)",
             "cache.existingClaim is immutable"),
            ("!has(self.size) || !has(oldSelf.size) || !quantity(self.size).isLessThan(quantity(oldSelf.size))",
             "cache.size may grow but not shrink"),
        )
    )

    size: SizeQuantity | None = Field(None, description="Size of the cache volume (default: from the model's size).")
    storage_class_name: str | None = Field(
        None, description="StorageClass of the cache volume (default: the cluster's default).", max_length=253,
        json_schema_extra=rules(("self == oldSelf", "cache.storageClassName is immutable")))
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"] = Field(
        "ReadWriteOnce", description="Access mode of the cache volume. Several replicas on several nodes need "
        "ReadWriteMany.", json_schema_extra=rules(("self == oldSelf", "cache.accessMode is immutable")))
    existing_claim: str | None = Field(None, description="Use this PersistentVolumeClaim instead of making one.",
                                       pattern=DNS_SUBDOMAIN, max_length=253)
    retain_on_delete: bool = Field(True, description="Keep the cache volume when the QwenDeployment is deleted.")
    download_timeout_seconds: int = Field(21600, ge=60, le=604800,
                                          description="Deadline of the download Job.")


class ResourceRequirements(Base):
    requests: dict[str, Quantity] | None = Field(None, description="Minimum resources, e.g. cpu, memory.")
    limits: dict[str, Quantity] | None = Field(None, description="Maximum resources, e.g. cpu, memory.")


class Toleration(Base):
    key: str | None = Field(None, description="Taint key.", max_length=317)
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Exists or Equal.")
    value: str | None = Field(None, description="Taint value.", max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(None, description="Taint effect.")
    toleration_seconds: int | None = Field(None, description="How long a NoExecute taint is tolerated.")


class LocalObjectReference(Base):
    name: str = Field(description="Name of the object.", pattern=DNS_SUBDOMAIN, max_length=253)


class EnvVar(Base):
    name: str = Field(description="Variable name.", pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", max_length=256)
    value: str | None = Field(None, description="Value.")
    value_from: dict[str, Any] | None = Field(
        None, description="A source for the value (secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})


class ServiceSpec(Base):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field("ClusterIP", description="Service type.")
    port: int = Field(8000, ge=1, le=65535, description="Service port (named http).")


class AuthSpec(Base):
    api_key_secret_ref: ApiKeySecretRef | None = Field(
        None, description="Secret with API keys, one per line; clients send `Authorization: Bearer <key>`.")


class ServiceMonitorSpec(Base):
    enabled: bool = Field(True, description="Create a ServiceMonitor when the Prometheus Operator is installed.")
    interval: str = Field("30s", description="Scrape interval.", pattern=DURATION_PATTERN)
    labels: dict[str, str] | None = Field(None, description="Extra labels, e.g. release: kube-prometheus-stack.")


class Thresholds(Base):
    p99_latency_seconds: float = Field(5.0, gt=0, le=3600, description="QwenHighLatency fires above this P99.")
    error_ratio: float = Field(0.05, gt=0, le=1, description="QwenHighErrorRate fires above this 5xx share.")
    queue_depth: int = Field(32, ge=1, le=1000000, description="QwenQueueSaturated fires above this many waiting.")
    ttft_p95_seconds: float = Field(10.0, gt=0, le=3600,
                                    description="QwenHighTimeToFirstToken fires above this P95.")


class PrometheusRuleSpec(Base):
    enabled: bool = Field(True, description="Create a PrometheusRule when the Prometheus Operator is installed.")
    labels: dict[str, str] | None = Field(None, description="Extra labels, e.g. release: kube-prometheus-stack.")
    thresholds: Thresholds = Field(default_factory=Thresholds, description="Alert thresholds.")


class MonitoringSpec(Base):
    service_monitor: ServiceMonitorSpec = Field(default_factory=ServiceMonitorSpec, description="Scraping.")
    prometheus_rule: PrometheusRuleSpec = Field(default_factory=PrometheusRuleSpec, description="Alerts.")


class PrometheusSource(Base):
    address: str | None = Field(
        None, description="URL of the Prometheus that scrapes the pods, e.g. "
        "http://prometheus-operated.monitoring.svc:9090 (default: the operator's, from the chart's "
        "autoscaling.prometheusAddress).", pattern=r"^https?://[^\s]+$", max_length=512)


class AutoscalingSpec(Base):
    model_config = ConfigDict(
        json_schema_extra=rules(
            ("self.minReplicas <= self.maxReplicas", "autoscaling.minReplicas must not be more than maxReplicas"),
            ("!has(self.idleSecondsToZero) || self.minReplicas == 0",
             "autoscaling.idleSecondsToZero is only for minReplicas 0"),
            ("!has(self.hosts) || self.minReplicas == 0", "autoscaling.hosts is only for minReplicas 0"),
        )
    )

    min_replicas: int = Field(1, ge=0, le=1000, description="Fewest replicas; 0 scales to zero when idle, and the "
                              "KEDA HTTP add-on holds requests while the first pod starts.")
    max_replicas: int = Field(ge=1, le=1000, description="Most replicas.")
    target_waiting_requests: int = Field(
        4, ge=1, le=100000, description="Requests waiting for a slot, per replica, that KEDA aims for: more "
        "waiting adds replicas.")
    target_running_requests: int | None = Field(
        None, ge=1, le=100000, description="Also scale on requests in the running batch, per replica (at most "
        "engine.maxConcurrency run at once).")
    scale_down_delay_seconds: int = Field(
        300, ge=0, le=86400, description="How long the need for fewer replicas must last before replicas go.")
    idle_seconds_to_zero: int | None = Field(
        None, ge=0, le=86400, description="With minReplicas 0: seconds without requests before the last replica "
        "goes (default 300).")
    polling_interval_seconds: int = Field(15, ge=1, le=3600, description="How often KEDA reads the metrics.")
    prometheus: PrometheusSource = Field(default_factory=PrometheusSource,
                                         description="Where KEDA reads the queue metrics.")
    hosts: list[Annotated[str, Field(pattern=HOST_PATTERN, max_length=253)]] | None = Field(
        None, max_length=16, description="With minReplicas 0: more Host headers the KEDA HTTP add-on routes to "
        "this deployment, beside its <name>-interceptor Service.")


class EndpointPickerRef(Base):
    name: str = Field(description="Name of the endpoint picker's Service.", pattern=DNS_LABEL, max_length=63)
    port: int = Field(9002, ge=1, le=65535, description="Its gRPC port.")
    failure_mode: Literal["FailOpen", "FailClose"] = Field(
        "FailClose", description="What the gateway does when the picker does not answer.")


class InferencePoolSpec(Base):
    enabled: bool = Field(False, description="Create an InferencePool (inference.networking.k8s.io/v1) of the "
                          "pods, for a Gateway API inference gateway to route to.")
    endpoint_picker_ref: EndpointPickerRef | None = Field(
        None, description="The endpoint picker (EPP) of the pool, which reads the pods' vllm:* metrics.")


class GatewaySpec(Base):
    inference_pool: InferencePoolSpec = Field(default_factory=InferencePoolSpec,
                                              description="The Gateway API Inference Extension's pool.")


class QwenDeploymentSpec(Base):
    model_config = ConfigDict(
        json_schema_extra=rules(
            ("!has(self.gpus) || self.device == 'gpu'", "gpus is only for device 'gpu'"),
            ("self.model.source != 'pvc' || has(self.cache.existingClaim)",
             "model.source 'pvc' needs cache.existingClaim: the volume that holds the model"),
            ("self.engine.quantize == 'none' || self.device == 'cpu'", "engine.quantize runs on device 'cpu' only"),
        )
    )

    model: ModelSpec = Field(description="The model to serve.")
    replicas: int = Field(1, ge=0, le=1000, description="Inference pods (one worker each).")
    device: Literal["cpu", "gpu"] = Field("cpu", description="Run on CPUs or on NVIDIA GPUs.")
    gpus: int | None = Field(None, ge=1, le=16, description="GPUs per pod for device gpu (default 1); one worker "
                             "spans them all.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weight dtype; auto picks bfloat16 on GPUs and on CPUs with AVX512 or AVX2, else "
                            "float32.")
    resources: ResourceRequirements | None = Field(
        None, description="Pod resources (default: sized from the model and the device).")
    engine: EngineSpec = Field(default_factory=EngineSpec, description="Inference engine settings.")
    cache: CacheSpec = Field(default_factory=CacheSpec, description="The model cache volume.")
    image: str | None = Field(None, description="Inference image (default: the operator's).", max_length=512)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent",
                                                                          description="Image pull policy.")
    image_pull_secrets: list[LocalObjectReference] | None = Field(None, description="Secrets for the registry.")
    node_selector: dict[str, str] | None = Field(None, description="Node labels the pods need.")
    tolerations: list[Toleration] | None = Field(None, description="Taints the pods tolerate.")
    affinity: dict[str, Any] | None = Field(None, description="Pod affinity (core/v1 Affinity).",
                                            json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    priority_class_name: str | None = Field(None, description="PriorityClass of the pods.", max_length=253)
    env: list[EnvVar] | None = Field(None, description="Extra environment variables of the server.")
    pod_annotations: dict[str, str] | None = Field(None, description="Extra annotations of the pods.")
    service: ServiceSpec = Field(default_factory=ServiceSpec, description="The Service in front of the pods.")
    auth: AuthSpec = Field(default_factory=AuthSpec, description="API keys.")
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec, description="Prometheus Operator objects.")
    autoscaling: AutoscalingSpec | None = Field(
        None, description="Scale on queue depth with KEDA, down to zero with its HTTP add-on. Autoscaling owns "
        "replicas: KEDA writes them through the scale subresource.")
    gateway: GatewaySpec = Field(default_factory=GatewaySpec, description="Gateway API inference routing.")

    @property
    def served_model_name(self) -> str:
        return self.model.served_model_name or self.model.name

    @property
    def gpu_count(self) -> int:
        return (self.gpus or 1) if self.device == "gpu" else 0

    @property
    def most_replicas(self) -> int:
        """The most replicas this spec may run: what placement must allow for."""
        return self.autoscaling.max_replicas if self.autoscaling is not None else self.replicas


# ---- status ---------------------------------------------------------------------------------------

Phase = Literal["Pending", "Downloading", "Starting", "Ready", "Degraded", "Failed"]


class Condition(Base):
    type: str = Field(description="CacheReady, Available, Progressing, Degraded, Monitoring, Autoscaling or "
                      "InferencePool.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="One word a person can act on.")
    message: str = Field(description="What happened, in a sentence.")
    last_transition_time: str | None = Field(None, description="When status last changed.")
    observed_generation: int | None = Field(None, description="The generation this condition reflects.")


class CacheStatus(Base):
    claim: str | None = Field(None, description="The PersistentVolumeClaim holding the model.")
    ready: bool = Field(False, description="The model is complete in the cache.")
    bytes: int | None = Field(None, description="Size of the cached model, when known.")
    model_path: str | None = Field(None, description="The folder served, inside the volume.")


class DownloadStatus(Base):
    bytes: int | None = Field(None, description="Bytes fetched so far (a resumed download counts what it found).")
    total_bytes: int | None = Field(None, description="Bytes in all, when the hub said.")
    bytes_per_second: int | None = Field(None, description="Rate over the last half minute.")
    eta_seconds: int | None = Field(None, description="Time left at that rate, when the total is known.")
    progress: str | None = Field(None, description="All of the above in a few words (the PROGRESS column).")


class QwenDeploymentStatus(Base):
    phase: Phase | None = Field(None, description="Pending, Downloading, Starting, Ready, Degraded or Failed.")
    reason: str | None = Field(None, description="Why the phase is what it is.")
    message: str | None = Field(None, description="The reason, in a sentence.")
    replicas: int | None = Field(None, description="Pods of the current spec.")
    ready_replicas: int | None = Field(None, description="Pods ready to serve.")
    selector: str | None = Field(None, description="Label selector of the pods (for the scale subresource).")
    observed_generation: int | None = Field(None, description="The spec generation last acted on.")
    endpoint: str | None = Field(None, description="In-cluster URL of the OpenAI-compatible API.")
    model: str | None = Field(None, description="The model being served.")
    cache: CacheStatus | None = Field(None, description="The model cache.")
    download: DownloadStatus | None = Field(None, description="How far the fetch Job got, while it runs.")
    conditions: list[Condition] | None = Field(None, description="Detailed state.")


# ---- rules CEL cannot express ---------------------------------------------------------------------

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}


def parse_quantity(q: str | int | float) -> float:
    """A Kubernetes quantity as a number (bytes, cores...)."""
    if isinstance(q, (int, float)):
        return float(q)
    m = re.fullmatch(r"([+-]?[0-9.]+)([eE][+-]?[0-9]+|[KMGTPE]i|[numkMGTPE])?", str(q).strip())
    if not m:
        raise ValueError(f"{q!r} is not a quantity")
    num, suffix = float(m.group(1)), m.group(2) or ""
    if suffix in _BINARY:
        return num * _BINARY[suffix]
    if suffix in _DECIMAL:
        return num * _DECIMAL[suffix]
    return num * 10 ** int(suffix[1:])


def check_semantics(spec: QwenDeploymentSpec) -> list[str]:
    """Problems the schema cannot see; each makes the QwenDeployment Failed until the spec changes."""
    problems: list[str] = []
    if spec.resources is not None:
        req, lim = spec.resources.requests or {}, spec.resources.limits or {}
        for name, value in lim.items():
            if name in req and parse_quantity(req[name]) > parse_quantity(value):
                problems.append(f"resources.requests.{name} ({req[name]}) is more than resources.limits.{name} ({value})")
        if spec.device == "gpu":
            gpu = lim.get("nvidia.com/gpu")
            if gpu is not None and int(parse_quantity(gpu)) != spec.gpu_count:
                problems.append(f"resources.limits nvidia.com/gpu ({gpu}) disagrees with gpus ({spec.gpu_count})")
    if spec.engine.max_model_len is not None and spec.engine.kv_cache_tokens is not None:
        if spec.engine.kv_cache_tokens < spec.engine.max_model_len:
            problems.append(f"engine.kvCacheTokens ({spec.engine.kv_cache_tokens}) cannot hold one sequence of "
                            f"engine.maxModelLen ({spec.engine.max_model_len}) tokens")
    return problems

"""Pure functions from a validated spec to every Kubernetes object the operator owns.

Nothing here talks to the API server: handlers pass in what they observed and apply what comes out.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from qwen_inference.contract import EXIT_CODES_NOT_RETRIED, ModelKey, ServerEnv

from . import API_VERSION, KIND
from . import sizing
from .rules import prometheus_rule_groups
from .spec import QwenDeploymentSpec

APP = "qwen-inference"
MANAGED_BY = "qwen-operator"
ANNOTATION_MODEL_KEY = "qwen-operator.io/model-key"
ANNOTATION_SPEC_HASH = "qwen-operator.io/spec-hash"
LABEL_FETCH_HASH = "qwen-operator.io/fetch"
CACHE_MOUNT = "/cache"
SERVER_PORT = 8000
PEER_KEY_MOUNT = "/etc/qwen/peer-key"
PEER_KEY = "key"
UID = 1000
PRESTOP_SECONDS = 5
SHUTDOWN_GRACE = 25
GPU_RESOURCE = "nvidia.com/gpu"
SERVER_CONTAINER = "server"


@dataclass(frozen=True)
class Owner:
    name: str
    namespace: str
    uid: str


@dataclass(frozen=True)
class OperatorDefaults:
    image: str = "ghcr.io/qwen-operator/qwen-inference:0.1.0"
    image_gpu: str | None = None  # an image for device gpu, when different
    # autoscaling: where KEDA reads the metrics, and where the KEDA HTTP add-on runs
    prometheus_address: str | None = None
    http_scaler_address: str = "keda-add-ons-http-external-scaler.keda:9090"
    interceptor_host: str = "keda-add-ons-http-interceptor-proxy.keda.svc.cluster.local"
    interceptor_port: int = 8080
    cluster_domain: str = "cluster.local"


def labels(name: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": APP,
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/component": component,
    }


def selector(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": APP, "app.kubernetes.io/instance": name,
            "app.kubernetes.io/component": "server"}


def selector_string(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector(name).items())


def owner_reference(owner: Owner) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": owner.name, "uid": owner.uid, "controller": True,
            "blockOwnerDeletion": True}


def _meta(owner: Owner, name: str, component: str, owned: bool = True, **extra) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": owner.namespace, "labels": labels(owner.name, component)}
    if owned:
        meta["ownerReferences"] = [owner_reference(owner)]
    meta.update(extra)
    return meta


def _hash(data: Any, n: int = 10) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:n]


# ---- the model in the cache -------------------------------------------------------------------------


def model_key(spec: QwenDeploymentSpec) -> ModelKey:
    """Identifies what the cache must hold: a new key means a new fetch Job."""
    m = spec.model
    if m.source == "pvc":
        return ModelKey.pvc(m.path or m.name)
    if m.source == "demo":
        return ModelKey.demo()
    return ModelKey.hub(m.source, m.name, m.revision)


def fetch_hash(key: ModelKey) -> str:
    return _hash(str(key))


def model_path(key: ModelKey) -> str:
    """Where a model key lives inside the cache volume, as the pods mount it."""
    return f"{CACHE_MOUNT}/{key.folder()}"


def claim_name(owner: Owner, spec: QwenDeploymentSpec) -> str:
    return spec.cache.existing_claim or f"{owner.name}-cache"


def job_name(owner: Owner, key: ModelKey) -> str:
    return f"{owner.name}-fetch-{fetch_hash(key)}"


def image(spec: QwenDeploymentSpec, defaults: OperatorDefaults) -> str:
    if spec.image:
        return spec.image
    if spec.device == "gpu" and defaults.image_gpu:
        return defaults.image_gpu
    return defaults.image


def pod_security_context() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
            "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def _hub_env(spec: QwenDeploymentSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": "HOME", "value": "/tmp"}, {"name": "HF_HOME", "value": "/tmp/hf"}]
    ref = spec.model.token_secret_ref
    if ref is not None:
        for var in ("HF_TOKEN", "MODELSCOPE_API_TOKEN"):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    if spec.model.hub_endpoint:
        env.append({"name": "HF_ENDPOINT", "value": spec.model.hub_endpoint})
        env.append({"name": "MODELSCOPE_ENDPOINT", "value": spec.model.hub_endpoint})
    return env


def _same_node_as_servers(owner: Owner, weight: int | None) -> dict[str, Any]:
    term = {"labelSelector": {"matchLabels": selector(owner.name)}, "topologyKey": "kubernetes.io/hostname"}
    if weight is None:
        return {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}
    return {"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": weight, "podAffinityTerm": term}]}}


# ---- objects ----------------------------------------------------------------------------------------


def build_pvc(owner: Owner, spec: QwenDeploymentSpec) -> dict[str, Any] | None:
    if spec.cache.existing_claim:
        return None
    size = spec.cache.size or sizing.default_cache_size(spec.model.name, spec.model.source)
    pvc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(owner, claim_name(owner, spec), "cache", owned=not spec.cache.retain_on_delete),
        "spec": {"accessModes": [spec.cache.access_mode], "resources": {"requests": {"storage": size}}},
    }
    if spec.cache.storage_class_name:
        pvc["spec"]["storageClassName"] = spec.cache.storage_class_name
    return pvc


def fetch_args(spec: QwenDeploymentSpec, key: ModelKey) -> list[str]:
    m = spec.model
    if m.source == "demo":
        return ["make-demo", "--cache-dir", CACHE_MOUNT]
    if m.source == "pvc":
        return ["verify", model_path(key)]
    return ["download", m.name, "--cache-dir", CACHE_MOUNT, "--revision", m.revision, "--source", m.source,
            "--stall-timeout", "300"]


def build_fetch_job(owner: Owner, spec: QwenDeploymentSpec, defaults: OperatorDefaults) -> dict[str, Any]:
    key = model_key(spec)
    h = fetch_hash(key)
    meta = _meta(owner, job_name(owner, key), "fetch", annotations={ANNOTATION_MODEL_KEY: str(key)})
    meta["labels"][LABEL_FETCH_HASH] = h
    pod_labels = {**labels(owner.name, "fetch"), LABEL_FETCH_HASH: h}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": pod_security_context(),
        "containers": [{
            "name": "fetch",
            "image": image(spec, defaults),
            "imagePullPolicy": spec.image_pull_policy,
            "command": ["qwen-model"],
            "args": fetch_args(spec, key),
            "env": _hub_env(spec),
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
            "securityContext": container_security_context(),
            "volumeMounts": [{"name": "cache", "mountPath": CACHE_MOUNT}, {"name": "tmp", "mountPath": "/tmp"}],
        }],
        "volumes": [
            {"name": "cache", "persistentVolumeClaim": {"claimName": claim_name(owner, spec)}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}},
        ],
    }
    # placed like the servers (GPU nodes tolerated, not requested), so a single-node volume is fetched where
    # the servers will mount it
    _placement(pod_spec, spec, gpu=spec.device == "gpu")
    if spec.cache.access_mode != "ReadWriteMany":
        # a single-node volume: fetch where the servers already have it mounted
        pod_spec["affinity"] = {**pod_spec.get("affinity", {}), **_same_node_as_servers(owner, weight=100)}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "backoffLimit": 3,
            "activeDeadlineSeconds": spec.cache.download_timeout_seconds,
            # qwen-model exits 2 (bad arguments) or 3 (no such model, no access): retrying cannot help
            "podFailurePolicy": {"rules": [
                {"action": "FailJob", "onExitCodes": {"containerName": "fetch", "operator": "In",
                                                      "values": list(EXIT_CODES_NOT_RETRIED)}},
            ]},
            "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
        },
    }


def _placement(pod_spec: dict[str, Any], spec: QwenDeploymentSpec, gpu: bool) -> None:
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    tolerations = [t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations or []]
    if gpu and not any(t.get("key") == GPU_RESOURCE for t in tolerations):
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if spec.affinity:
        pod_spec["affinity"] = dict(spec.affinity)
    if spec.priority_class_name:
        pod_spec["priorityClassName"] = spec.priority_class_name
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s.name} for s in spec.image_pull_secrets]


def resources(spec: QwenDeploymentSpec, key: ModelKey | None = None) -> dict[str, Any]:
    if spec.resources is not None:
        out = spec.resources.model_dump(by_alias=True, exclude_none=True)
        out = {k: {r: str(q) for r, q in v.items()} for k, v in out.items()}
        if spec.device == "gpu":
            out.setdefault("limits", {})[GPU_RESOURCE] = str(spec.gpu_count)
        return out
    name, source = served_model(spec, key) if key is not None else (spec.model.name, spec.model.source)
    return sizing.default_resources(name, source, spec.device, spec.dtype, spec.gpu_count,
                                    spec.engine.max_concurrency)


def server_env(spec: QwenDeploymentSpec, key: ModelKey) -> list[dict[str, Any]]:
    e = spec.engine
    env: list[dict[str, Any]] = [
        {"name": ServerEnv.MODEL, "value": model_path(key)},
        {"name": ServerEnv.SERVED_MODEL_NAME, "value": spec.model.served_model_name or served_model(spec, key)[0]},
        {"name": ServerEnv.HOST, "value": "0.0.0.0"},
        {"name": ServerEnv.PORT, "value": str(SERVER_PORT)},
        {"name": ServerEnv.DEVICE, "value": "cuda" if spec.device == "gpu" else "cpu"},
        {"name": ServerEnv.DTYPE, "value": spec.dtype},
        {"name": ServerEnv.QUANTIZE, "value": e.quantize},
        {"name": ServerEnv.MAX_CONCURRENCY, "value": str(e.max_concurrency)},
        {"name": ServerEnv.MAX_QUEUE, "value": str(e.max_queue)},
        {"name": ServerEnv.MAX_TOKENS_CAP, "value": str(e.max_tokens)},
        {"name": ServerEnv.REQUEST_TIMEOUT, "value": str(e.request_timeout_seconds)},
        {"name": ServerEnv.SHUTDOWN_GRACE, "value": str(SHUTDOWN_GRACE)},
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/hf"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "TRANSFORMERS_OFFLINE", "value": "1"},
    ]
    if e.max_model_len is not None:
        env.append({"name": ServerEnv.MAX_MODEL_LEN, "value": str(e.max_model_len)})
    if e.kv_cache_tokens is not None:
        env.append({"name": ServerEnv.KV_CACHE_TOKENS, "value": str(e.kv_cache_tokens)})
    if e.rope_scaling is not None:  # config.json's form, which qwen-serve takes
        env.append({"name": ServerEnv.ROPE_SCALING,
                    "value": json.dumps(e.rope_scaling.model_dump(exclude_none=True), separators=(",", ":"))})
    if e.threads is not None:
        env.append({"name": ServerEnv.THREADS, "value": str(e.threads)})
    else:  # threads from the container's CPU limit, rounded up, as the downward API gives it
        env.append({"name": ServerEnv.THREADS, "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu",
                                                                                 "divisor": "1"}}})
    # the replicas read each other's responses (previous_response_id on any replica): this pod's address, from
    # the downward API, and the key they share
    env += [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": ServerEnv.PEER_URL, "value": f"http://$(POD_IP):{SERVER_PORT}"},
            {"name": ServerEnv.PEER_KEY_FILE, "value": f"{PEER_KEY_MOUNT}/{PEER_KEY}"}]
    if spec.auth.api_key_secret_ref is not None:
        env.append({"name": ServerEnv.API_KEY_FILE,
                    "value": f"/etc/qwen/api-keys/{spec.auth.api_key_secret_ref.key}"})
    for var in spec.env or []:
        env.append(var.model_dump(by_alias=True, exclude_none=True))
    return env


def served_model(spec: QwenDeploymentSpec, key: ModelKey) -> tuple[str, str]:
    """(name, source) of the model at `key`: while a new model downloads, pods keep the old one's name,
    size and probes, so nothing about them changes until the new cache is complete."""
    if key.source == "pvc":
        return spec.model.name, "pvc"
    return key.name, key.source


def spec_hash(spec: QwenDeploymentSpec, key: ModelKey) -> str:
    """Changes exactly when the pods must change: the spec apart from the model to fetch, and the served key."""
    data = spec.model_dump(mode="json", by_alias=True)
    for field in ("model", "replicas", "autoscaling", "gateway"):  # scaling and routing leave the pods alone
        data.pop(field)
    data["several"] = spec.most_replicas > 1  # it decides placement
    return _hash({"spec": data, "key": str(key), "servedModelName": spec.model.served_model_name})


def build_deployment(owner: Owner, spec: QwenDeploymentSpec, defaults: OperatorDefaults,
                     serving_key: ModelKey) -> dict[str, Any]:
    """The inference pods, serving the model at `serving_key` (the newest one complete in the cache)."""
    gpu = spec.device == "gpu"
    name, source = served_model(spec, serving_key)
    startup = sizing.startup_seconds(name, source, spec.device, spec.dtype)
    period = 10
    container: dict[str, Any] = {
        "name": SERVER_CONTAINER,
        "image": image(spec, defaults),
        "imagePullPolicy": spec.image_pull_policy,
        "env": server_env(spec, serving_key),
        "ports": [{"name": "http", "containerPort": SERVER_PORT, "protocol": "TCP"}],
        "startupProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": period,
                         "timeoutSeconds": 5, "failureThreshold": -(-startup // period)},
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5,
                           "timeoutSeconds": 3, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/livez", "port": "http"}, "periodSeconds": 10,
                          "timeoutSeconds": 5, "failureThreshold": 6},
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SECONDS}}},
        # qwen-serve writes why it exits (a model that cannot load); a crash leaves the end of its log instead
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": resources(spec, serving_key),
        "securityContext": container_security_context(),
        "volumeMounts": [{"name": "cache", "mountPath": CACHE_MOUNT, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}],
    }
    volumes: list[dict[str, Any]] = [
        {"name": "cache", "persistentVolumeClaim": {"claimName": claim_name(owner, spec), "readOnly": True}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
    ]
    if gpu:
        container["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"})
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}})
    container["volumeMounts"].append({"name": "peer-key", "mountPath": PEER_KEY_MOUNT, "readOnly": True})
    volumes.append({"name": "peer-key", "secret": {"secretName": peer_secret_name(owner)}})
    if spec.auth.api_key_secret_ref is not None:
        container["volumeMounts"].append({"name": "api-keys", "mountPath": "/etc/qwen/api-keys", "readOnly": True})
        volumes.append({"name": "api-keys", "secret": {"secretName": spec.auth.api_key_secret_ref.name}})
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "terminationGracePeriodSeconds": PRESTOP_SECONDS + SHUTDOWN_GRACE + 5,
        "containers": [container],
        "volumes": volumes,
    }
    _placement(pod_spec, spec, gpu=gpu)
    rwx = spec.cache.access_mode == "ReadWriteMany"
    if not rwx and spec.most_replicas > 1 and not spec.affinity:
        # one node holds a single-node volume. Decided by the most replicas the spec allows, not the current
        # count, so that scaling never changes the pod template (which would replace every pod)
        pod_spec["affinity"] = _same_node_as_servers(owner, weight=None)
    annotations = {ANNOTATION_SPEC_HASH: spec_hash(spec, serving_key), ANNOTATION_MODEL_KEY: str(serving_key)}
    annotations.update(spec.pod_annotations or {})
    strategy: dict[str, Any] = (
        {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0}} if rwx
        # a single-node volume: replace pods instead of surging, so a new pod never waits on a volume
        # an old pod holds on another node
        else {"type": "Recreate"}
    )
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(owner, owner.name, "server", annotations={ANNOTATION_MODEL_KEY: str(serving_key)}),
        "spec": {
            "replicas": spec.replicas,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector(owner.name)},
            "strategy": strategy,
            "template": {"metadata": {"labels": labels(owner.name, "server"), "annotations": annotations},
                         "spec": pod_spec},
        },
    }


def peer_secret_name(owner: Owner) -> str:
    return f"{owner.name}-peer-key"


def build_peer_secret(owner: Owner, key: str) -> dict[str, Any]:
    """The key the inference pods share, which signs response ids and their requests to each other. Made once,
    with a random key the caller draws; never rewritten (pods read it when they start)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(owner, peer_secret_name(owner), "server"),
        "type": "Opaque",
        "stringData": {PEER_KEY: key},
    }


def build_service(owner: Owner, spec: QwenDeploymentSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(owner, owner.name, "server"),
        "spec": {
            "type": spec.service.type,
            "selector": selector(owner.name),
            "ports": [{"name": "http", "port": spec.service.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def build_pdb(owner: Owner, spec: QwenDeploymentSpec) -> dict[str, Any] | None:
    if spec.replicas <= 1:
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(owner, owner.name, "server"),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(owner.name)}},
    }


def _monitoring_object(owner: Owner, kind: str, extra_labels: dict[str, str] | None, spec: dict[str, Any]) -> dict:
    meta = _meta(owner, owner.name, "monitoring")
    meta["labels"].update(extra_labels or {})  # e.g. release: kube-prometheus-stack, for Prometheus to select it
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": kind, "metadata": meta, "spec": spec}


def build_service_monitor(owner: Owner, spec: QwenDeploymentSpec) -> dict[str, Any] | None:
    sm = spec.monitoring.service_monitor
    if not sm.enabled:
        return None
    return _monitoring_object(owner, "ServiceMonitor", sm.labels, {
        "selector": {"matchLabels": selector(owner.name)},
        "namespaceSelector": {"matchNames": [owner.namespace]},
        # honorLabels keeps the server's own `endpoint` label (the route) instead of renaming it
        "endpoints": [{"port": "http", "path": "/metrics", "interval": sm.interval, "scheme": "http",
                       "honorLabels": True}],
    })


def build_prometheus_rule(owner: Owner, spec: QwenDeploymentSpec) -> dict[str, Any] | None:
    pr = spec.monitoring.prometheus_rule
    if not pr.enabled:
        return None
    return _monitoring_object(owner, "PrometheusRule", pr.labels,
                              {"groups": prometheus_rule_groups(owner.namespace, owner.name, pr.thresholds)})


def endpoint(owner: Owner, spec: QwenDeploymentSpec) -> str:
    return f"http://{owner.name}.{owner.namespace}.svc:{spec.service.port}/v1"


# ---- autoscaling (KEDA) and inference routing -------------------------------------------------------------

KEDA_GV = "keda.sh/v1alpha1"
INTERCEPTOR_ROUTE_GV = "http.keda.sh/v1beta1"  # the KEDA HTTP add-on's routing object, from v0.14
HTTP_SCALED_OBJECT_GV = "http.keda.sh/v1alpha1"  # its older one, deprecated by InterceptorRoute
INFERENCE_GV = "inference.networking.k8s.io/v1"
HTTP_ADD_ON_KINDS = ("InterceptorRoute", "HTTPScaledObject")
READINESS_SLACK_SECONDS = 120  # scheduling and image pull, before the startup probe's budget starts


def scales_from_zero(spec: QwenDeploymentSpec) -> bool:
    return spec.autoscaling is not None and spec.autoscaling.min_replicas == 0


def queue_query(owner: Owner, metric: str) -> str:
    """The deployment's total of a per-pod gauge, by the labels the ServiceMonitor gives every series."""
    return f'sum({metric}{{namespace="{owner.namespace}",service="{owner.name}"}})'


def prometheus_address(spec: QwenDeploymentSpec, defaults: OperatorDefaults) -> str | None:
    a = spec.autoscaling
    return (a.prometheus.address if a is not None else None) or defaults.prometheus_address


def build_scaled_object(owner: Owner, spec: QwenDeploymentSpec, defaults: OperatorDefaults,
                        http_add_on: str | None) -> dict[str, Any] | None:
    """KEDA's ScaledObject, scaling the QwenDeployment itself through its scale subresource: KEDA's HPA writes
    spec.replicas, and the operator carries it to the Deployment. Queue depth (and optionally the running
    batch) from Prometheus drives 1..max; with minReplicas 0 the HTTP add-on's scaler (`http_add_on`: the kind
    of its routing object) wakes the deployment from zero, since a deployment at zero has no metrics. Without
    the add-on, the floor stays at one replica. None without autoscaling or a Prometheus address."""
    a = spec.autoscaling
    address = prometheus_address(spec, defaults)
    if a is None or address is None:
        return None
    to_zero = a.min_replicas == 0 and http_add_on is not None
    triggers: list[dict[str, Any]] = [{
        "type": "prometheus", "name": "waiting",
        "metadata": {"serverAddress": address, "query": queue_query(owner, "qwen_requests_waiting"),
                     "threshold": str(a.target_waiting_requests), "activationThreshold": "0"},
    }]
    if a.target_running_requests is not None:
        triggers.append({
            "type": "prometheus", "name": "running",
            "metadata": {"serverAddress": address, "query": queue_query(owner, "qwen_requests_running"),
                         "threshold": str(a.target_running_requests), "activationThreshold": "0"},
        })
    if to_zero:
        key = "interceptorRoute" if http_add_on == "InterceptorRoute" else "httpScaledObject"
        triggers.append({"type": "external-push", "name": "http",
                         "metadata": {"scalerAddress": defaults.http_scaler_address, key: owner.name}})
    so_spec: dict[str, Any] = {
        "scaleTargetRef": {"apiVersion": API_VERSION, "kind": KIND, "name": owner.name},
        "minReplicaCount": a.min_replicas if to_zero else max(1, a.min_replicas),
        "maxReplicaCount": a.max_replicas,
        "pollingInterval": a.polling_interval_seconds,
        "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {
            "scaleDown": {"stabilizationWindowSeconds": a.scale_down_delay_seconds}}}},
        "triggers": triggers,
    }
    if to_zero:
        so_spec["cooldownPeriod"] = a.idle_seconds_to_zero if a.idle_seconds_to_zero is not None else 300
    return {"apiVersion": KEDA_GV, "kind": "ScaledObject", "metadata": _meta(owner, owner.name, "autoscaling"),
            "spec": so_spec}


def interceptor_service_name(owner: Owner) -> str:
    return f"{owner.name}-interceptor"


def interceptor_hosts(owner: Owner, spec: QwenDeploymentSpec, defaults: OperatorDefaults) -> list[str]:
    """Every Host header a client of the <name>-interceptor Service sends, then the spec's own."""
    svc = interceptor_service_name(owner)
    ns = owner.namespace
    hosts = [svc, f"{svc}.{ns}", f"{svc}.{ns}.svc", f"{svc}.{ns}.svc.{defaults.cluster_domain}"]
    return hosts + [h for h in (spec.autoscaling.hosts or []) if h not in hosts]


def _http_timeouts(spec: QwenDeploymentSpec) -> tuple[str, str]:
    """(how long the interceptor holds a request for a pod to become ready, how long it waits for the
    response headers): a cold start may take the startup probe's whole budget, and a reply that is not
    streamed sends its headers only at the end."""
    ready = sizing.startup_seconds(spec.model.name, spec.model.source, spec.device, spec.dtype)
    return f"{ready + READINESS_SLACK_SECONDS}s", f"{spec.engine.request_timeout_seconds}s"


def _concurrency_target(spec: QwenDeploymentSpec) -> int:
    # requests in flight per replica: a full batch plus the queue the Prometheus trigger aims for
    return spec.engine.max_concurrency + spec.autoscaling.target_waiting_requests


def build_interceptor_route(owner: Owner, spec: QwenDeploymentSpec,
                            defaults: OperatorDefaults) -> dict[str, Any] | None:
    """The KEDA HTTP add-on's route to the Service: its interceptor holds requests while KEDA wakes the
    deployment from zero, and counts them for the ScaledObject's external-push trigger."""
    if not scales_from_zero(spec):
        return None
    readiness, response = _http_timeouts(spec)
    return {"apiVersion": INTERCEPTOR_ROUTE_GV, "kind": "InterceptorRoute",
            "metadata": _meta(owner, owner.name, "autoscaling"),
            "spec": {"target": {"service": owner.name, "portName": "http"},
                     "rules": [{"hosts": interceptor_hosts(owner, spec, defaults)}],
                     "scalingMetric": {"concurrency": {"targetValue": _concurrency_target(spec)}},
                     "timeouts": {"readiness": readiness, "responseHeader": response}}}


def build_http_scaled_object(owner: Owner, spec: QwenDeploymentSpec,
                             defaults: OperatorDefaults) -> dict[str, Any] | None:
    """The same route for HTTP add-ons before InterceptorRoute: an HTTPScaledObject that leaves the
    ScaledObject to the operator (which adds the Prometheus triggers to it)."""
    if not scales_from_zero(spec):
        return None
    a = spec.autoscaling
    readiness, response = _http_timeouts(spec)
    meta = _meta(owner, owner.name, "autoscaling",
                 annotations={"httpscaledobject.keda.sh/skip-scaledobject-creation": "true"})
    return {"apiVersion": HTTP_SCALED_OBJECT_GV, "kind": "HTTPScaledObject", "metadata": meta,
            "spec": {"hosts": interceptor_hosts(owner, spec, defaults),
                     "scaleTargetRef": {"apiVersion": API_VERSION, "kind": KIND, "name": owner.name,
                                        "service": owner.name, "portName": "http"},
                     "replicas": {"min": a.min_replicas, "max": a.max_replicas},
                     "scalingMetric": {"concurrency": {"targetValue": _concurrency_target(spec)}},
                     "timeouts": {"conditionWait": readiness, "responseHeader": response}}}


def build_interceptor_service(owner: Owner, spec: QwenDeploymentSpec,
                              defaults: OperatorDefaults) -> dict[str, Any] | None:
    """<name>-interceptor: a DNS name for the KEDA HTTP add-on's interceptor, under which the add-on routes
    to this deployment. Clients of a deployment that scales to zero call it instead of <name>."""
    if not scales_from_zero(spec):
        return None
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _meta(owner, interceptor_service_name(owner), "autoscaling"),
            "spec": {"type": "ExternalName", "externalName": defaults.interceptor_host,
                     "ports": [{"name": "http", "port": defaults.interceptor_port, "protocol": "TCP"}]}}


def build_inference_pool(owner: Owner, spec: QwenDeploymentSpec) -> dict[str, Any] | None:
    """The Gateway API Inference Extension's InferencePool of the server pods: an inference gateway routes to
    them, its endpoint picker choosing a pod by the vllm:* metrics each one serves."""
    pool = spec.gateway.inference_pool
    if not pool.enabled:
        return None
    pool_spec: dict[str, Any] = {"selector": {"matchLabels": selector(owner.name)},
                                 "targetPorts": [{"number": SERVER_PORT}]}
    ref = pool.endpoint_picker_ref
    if ref is not None:
        pool_spec["endpointPickerRef"] = {"kind": "Service", "name": ref.name, "port": {"number": ref.port},
                                          "failureMode": ref.failure_mode}
    return {"apiVersion": INFERENCE_GV, "kind": "InferencePool", "metadata": _meta(owner, owner.name, "gateway"),
            "spec": pool_spec}

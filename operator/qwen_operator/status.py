"""The status of a QwenDeployment, derived from its children every time: the same cluster state always gives
the same status. Nothing is remembered but each condition's lastTransitionTime, kept while it holds."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from qwen_inference.contract import EXIT_MODEL_NOT_SUPPORTED, ModelKey, TerminationMessage

from . import builders
from .builders import Owner
from .spec import QwenDeploymentSpec

POD_PROBLEMS = ("CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "InvalidImageName",
                "CreateContainerConfigError", "CreateContainerError")


@dataclass
class Observed:
    generation: int
    spec: QwenDeploymentSpec | None
    spec_error: str | None = None
    pvc: dict | None = None
    jobs: list[dict] = field(default_factory=list)
    job_pods: list[dict] = field(default_factory=list)
    deployment: dict | None = None
    pods: list[dict] = field(default_factory=list)
    service: dict | None = None
    monitoring: str = "disabled"  # applied | missing | disabled
    autoscaling: str = "disabled"  # applied | keda-missing | no-prometheus | http-missing | disabled
    scaled_object: dict | None = None  # KEDA's ScaledObject, as applied
    interceptor: dict | None = None  # the <name>-interceptor Service, when the deployment scales from zero
    inference_pool: str = "disabled"  # applied | missing | disabled
    fetch_log: str | None = None  # the last lines of the running fetch pod's log
    previous: dict[str, Any] = field(default_factory=dict)  # the status as it was
    now: str = ""


@dataclass
class Verdict:
    phase: str
    reason: str
    message: str


def job_state(job: dict | None) -> str:
    if job is None:
        return "absent"
    st = job.get("status") or {}
    for c in st.get("conditions") or []:
        if c.get("status") == "True" and c.get("type") in ("Complete", "SuccessCriteriaMet"):
            return "succeeded"
        if c.get("status") == "True" and c.get("type") in ("Failed", "FailureTarget"):
            return "failed"
    if (st.get("succeeded") or 0) >= 1:
        return "succeeded"
    return "running"


def _terminated(pod: dict) -> dict | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
        if term:
            return term
    return None


def last_log_line(job_pods: list[dict]) -> str | None:
    """The last line a failed fetch pod wrote (the kubelet keeps it as the termination message)."""
    failed = [p for p in job_pods if (p.get("status") or {}).get("phase") == "Failed"]
    failed.sort(key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")
    for pod in reversed(failed):
        term = _terminated(pod)
        if term and term.get("message"):
            lines = [ln.strip() for ln in term["message"].strip().splitlines() if ln.strip()]
            if lines:
                return lines[-1]
        if term and term.get("reason"):
            return f"the container ended with {term['reason']} (exit code {term.get('exitCode')})"
    return None


def cached_bytes(job_pods: list[dict]) -> int | None:
    """The model's size, from the termination message of the fetch pod that succeeded."""
    for pod in job_pods:
        term = _terminated(pod)
        if term and term.get("exitCode") == 0:
            message = TerminationMessage.parse(term.get("message"))
            if message is not None:
                return message.bytes
    return None


def serving_key(deployment: dict | None) -> ModelKey | None:
    """The model key the Deployment's pods serve (its annotation), or None when it has none we can read."""
    value = ((deployment or {}).get("metadata") or {}).get("annotations", {}).get(builders.ANNOTATION_MODEL_KEY)
    try:
        return ModelKey.parse(value) if value else None
    except ValueError:
        return None


# what `qwen-model download` prints every few seconds (qwen_inference.modelcache.progress_line)
PROGRESS = re.compile(r"^progress: (\d+)(?: of (\d+) bytes \([\d.]+%\)| bytes), ([\d.]+) MB/s(?:, ETA (\S+))?\s*$")
_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def _duration(text: str | None) -> int | None:
    m = _DURATION.match(text or "")
    if not text or not m or not any(m.groups()):
        return None
    h, mi, se = (int(g or 0) for g in m.groups())
    return h * 3600 + mi * 60 + se


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def download_progress(log_tail: str | None) -> dict[str, Any] | None:
    """The last progress line of a fetch pod's log, as the status's `download`."""
    for line in reversed((log_tail or "").splitlines()):
        m = PROGRESS.match(line.strip())
        if not m:
            continue
        done, total, rate = int(m.group(1)), int(m.group(2)) if m.group(2) else None, float(m.group(3))
        eta = _duration(m.group(4))
        out: dict[str, Any] = {"bytes": done, "totalBytes": total, "bytesPerSecond": int(rate * 1e6),
                               "etaSeconds": eta}
        if total:
            text = f"{min(100.0, 100 * done / total):.0f}% of {_size(total)}, {rate:.1f} MB/s"
            text += f", ETA {m.group(4)}" if eta is not None else ""
        else:
            text = f"{_size(done)}, {rate:.1f} MB/s"
        out["progress"] = text
        return {k: v for k, v in out.items() if v is not None}
    return None


def pod_problem(pods: list[dict]) -> tuple[str, str] | None:
    """The first reason a person can act on, from the pods' scheduling and container states."""
    for pod in pods:
        st = pod.get("status") or {}
        name = (pod.get("metadata") or {}).get("name", "?")
        for c in st.get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
                return "Unschedulable", f"pod {name} cannot be scheduled: {c.get('message', '')}".strip()
        for cs in st.get("containerStatuses") or []:
            last = (cs.get("lastState") or {}).get("terminated") or {}
            if last.get("reason") == "OOMKilled":
                return "OOMKilled", (f"pod {name} ran out of memory; raise resources.limits.memory or lower "
                                     "engine.kvCacheTokens")
            waiting = (cs.get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason")
            if reason in POD_PROBLEMS:
                key = "ImagePullBackOff" if reason in ("ErrImagePull", "InvalidImageName") else reason
                message = f"pod {name}: {reason}: {waiting.get('message', '')}".strip().rstrip(":")
                lines = [ln.strip() for ln in (last.get("message") or "").splitlines() if ln.strip()]
                if reason == "CrashLoopBackOff" and last.get("exitCode") == EXIT_MODEL_NOT_SUPPORTED \
                        and cs.get("name") == builders.SERVER_CONTAINER and lines:
                    # the server's own verdict: this model cannot be served here, whatever the retries
                    return "ModelNotSupported", f"pod {name}: {lines[-1]}"
                if reason == "CrashLoopBackOff" and last:
                    message += f"; the container last exited with code {last.get('exitCode')}"
                    message += f": {lines[-1]}" if lines else ""
                return key, message
    return None


def _deployment_counts(dep: dict) -> tuple[int, int, int, bool]:
    st = dep.get("status") or {}
    meta = dep.get("metadata") or {}
    desired = (dep.get("spec") or {}).get("replicas", 1)
    # settled also means no pod of an older revision is left running (`kubectl rollout status` waits for that)
    settled = (st.get("observedGeneration", 0) >= meta.get("generation", 0)
               and (st.get("replicas") or 0) <= (st.get("updatedReplicas") or 0))
    return desired, st.get("readyReplicas") or 0, st.get("updatedReplicas") or 0, settled


def verdict(owner: Owner, obs: Observed) -> tuple[Verdict, dict[str, tuple[str, str, str]]]:
    """The phase, and each condition as (status, reason, message)."""
    spec = obs.spec
    cond: dict[str, tuple[str, str, str]] = {}
    if spec is None or obs.spec_error:
        msg = obs.spec_error or "the spec is invalid"
        cond = {"CacheReady": ("Unknown", "InvalidSpec", msg), "Available": ("False", "InvalidSpec", msg),
                "Progressing": ("False", "InvalidSpec", msg), "Degraded": ("True", "InvalidSpec", msg)}
        return Verdict("Failed", "InvalidSpec", msg), cond

    key = builders.model_key(spec)
    claim = builders.claim_name(owner, spec)
    job = next((j for j in obs.jobs if (j.get("metadata") or {}).get("name") == builders.job_name(owner, key)), None)
    jstate = job_state(job)
    dep = obs.deployment
    served = serving_key(dep)
    desired, ready, updated, settled = _deployment_counts(dep) if dep else (spec.replicas, 0, 0, True)
    serving = dep is not None and ready > 0

    # monitoring
    if obs.monitoring == "missing":
        cond["Monitoring"] = ("False", "MonitoringCRDsMissing",
                              "the Prometheus Operator's ServiceMonitor/PrometheusRule CRDs are not installed; "
                              "everything else works")
    elif obs.monitoring == "applied":
        cond["Monitoring"] = ("True", "Applied", "ServiceMonitor and PrometheusRule are in place")
    else:
        cond["Monitoring"] = ("False", "Disabled", "monitoring is disabled in the spec")

    auto = autoscaling_condition(spec, obs)
    if auto is not None:
        cond["Autoscaling"] = auto
    if obs.inference_pool == "missing":
        cond["InferencePool"] = ("False", "InferencePoolCRDMissing",
                                 "the Gateway API Inference Extension's InferencePool CRD "
                                 "(inference.networking.k8s.io/v1) is not installed; everything else works")
    elif obs.inference_pool == "applied":
        cond["InferencePool"] = ("True", "Applied",
                                 f"InferencePool {owner.name} selects the server pods on port {builders.SERVER_PORT}")

    # cache
    pvc_phase = ((obs.pvc or {}).get("status") or {}).get("phase")
    if obs.pvc is None and spec.cache.existing_claim:
        v = Verdict("Pending", "ClaimNotFound", f"the PersistentVolumeClaim {claim} (cache.existingClaim) does not exist")
        cache = ("False", v.reason, v.message)
    elif obs.pvc is None or pvc_phase != "Bound":
        v = Verdict("Pending", "CachePending", f"waiting for the PersistentVolumeClaim {claim} to be bound"
                    + (f" (it is {pvc_phase})" if pvc_phase else ""))
        cache = ("False", v.reason, v.message)
    elif jstate == "succeeded":
        v = None
        cache = ("True", "Cached", f"{key.describe()} is complete in {claim}")
    elif jstate == "failed":
        line = last_log_line(obs.job_pods) or "no log line was kept"
        msg = f"fetching {key.describe()} failed: {line}"
        v = Verdict("Degraded" if serving else "Failed", "DownloadFailed",
                    msg + (f"; still serving {served.describe()}" if serving and served else ""))
        cache = ("False", "DownloadFailed", msg)
    else:
        problem = pod_problem(obs.job_pods)
        reason, msg = problem if problem else ("Downloading", f"fetching {key.describe()} into {claim}")
        v = Verdict("Downloading", reason, msg + (f"; still serving {served.describe()}"
                                                  if serving and served else ""))
        cache = ("False", "Downloading" if not problem else reason, msg)
    cond["CacheReady"] = cache

    # pods
    if v is None or (v.phase in ("Downloading",) and serving):
        pods_problem = pod_problem(obs.pods) if dep is not None else None
        if dep is None:
            pv = Verdict("Starting", "Starting", "the cache is ready; creating the inference pods")
        elif pods_problem is not None:
            pv = Verdict("Degraded", pods_problem[0], pods_problem[1])
        elif desired == 0:
            pv = Verdict("Ready", "ScaledToZero", "scaled to zero replicas")
        elif settled and ready >= desired and updated >= desired:
            pv = Verdict("Ready", "Ready", f"{ready}/{desired} replicas ready")
        elif not settled or updated < desired:
            pv = Verdict("Starting", "RollingOut", f"rolling out: {updated}/{desired} updated, {ready} ready")
        elif ready == 0:
            pv = Verdict("Starting", "Starting", f"0/{desired} replicas ready: the model is loading")
        else:
            pv = Verdict("Degraded", "ReplicasUnavailable", f"only {ready}/{desired} replicas are ready")
        if v is None:
            v = pv
        elif pv.phase == "Degraded":
            v = pv
    assert v is not None

    if serving:
        cond["Available"] = ("True", "MinimumReplicasAvailable", f"{ready}/{desired} replicas ready")
    elif dep is not None and desired == 0:
        cond["Available"] = ("False", "ScaledToZero", "scaled to zero replicas")
    else:
        cond["Available"] = ("False", "NoReplicasReady", v.message)
    progressing = v.phase in ("Pending", "Downloading", "Starting")
    cond["Progressing"] = ("True", v.reason, v.message) if progressing else ("False", v.reason, v.message)
    bad = v.phase in ("Degraded", "Failed")
    cond["Degraded"] = ("True", v.reason, v.message) if bad else ("False", "AsExpected", "nothing is wrong")
    return v, cond


def autoscaling_condition(spec: QwenDeploymentSpec, obs: Observed) -> tuple[str, str, str] | None:
    """The Autoscaling condition: what is missing for KEDA to scale this deployment, or what KEDA says of
    its ScaledObject."""
    a = spec.autoscaling
    if a is None or obs.autoscaling == "disabled":
        return None
    if obs.autoscaling == "keda-missing":
        return ("False", "KEDACRDsMissing", "KEDA's ScaledObject CRD (keda.sh/v1alpha1) is not installed: replicas "
                f"stay at spec.replicas ({spec.replicas}); everything else works")
    if obs.autoscaling == "no-prometheus":
        return ("False", "PrometheusAddressMissing", "no Prometheus to read the queue from: set "
                "autoscaling.prometheus.address, or the chart's autoscaling.prometheusAddress")
    floor = a.min_replicas
    note = ""
    if obs.autoscaling == "http-missing":
        floor = 1
        note = ("minReplicas 0 needs the KEDA HTTP add-on to hold requests while the first pod starts; until it "
                "is installed, ")
    scope = f"KEDA scales between {floor} and {a.max_replicas} replicas, aiming at {a.target_waiting_requests} " \
            "waiting requests per replica"
    if note:
        return ("False", "HTTPAddOnMissing", note + scope)
    keda = {c.get("type"): c for c in ((obs.scaled_object or {}).get("status") or {}).get("conditions") or []}
    ready = keda.get("Ready") or {}
    if ready.get("status") == "False":
        return ("False", "ScaledObjectNotReady",
                f"KEDA: {ready.get('message') or ready.get('reason') or 'the ScaledObject is not ready'}")
    if ready.get("status") != "True":
        if ready.get("message"):  # KEDA is on it, and not sure yet
            return ("Unknown", "WaitingForKEDA", f"KEDA: {ready['message']}; " + scope)
        return ("Unknown", "WaitingForKEDA", "the ScaledObject is applied and KEDA has not reported on it yet (is "
                "the KEDA operator running?); " + scope)
    active = (keda.get("Active") or {}).get("status") == "True"
    return ("True", "Active" if active else "Idle", scope + ("" if active else "; no load now"))


ORDER = ["CacheReady", "Available", "Progressing", "Degraded", "Monitoring", "Autoscaling", "InferencePool"]


def derive_status(owner: Owner, obs: Observed) -> dict[str, Any]:
    v, conds = verdict(owner, obs)
    previous = {c["type"]: c for c in obs.previous.get("conditions") or []}
    conditions = []
    for ctype in ORDER:
        if ctype not in conds:
            continue
        status, reason, message = conds[ctype]
        old = previous.get(ctype)
        since = old.get("lastTransitionTime") if old and old.get("status") == status else None
        conditions.append({"type": ctype, "status": status, "reason": reason, "message": message,
                           "lastTransitionTime": since or obs.now, "observedGeneration": obs.generation})
    out: dict[str, Any] = {"phase": v.phase, "reason": v.reason, "message": v.message,
                           "observedGeneration": obs.generation, "conditions": conditions,
                           "selector": builders.selector_string(owner.name)}
    spec = obs.spec
    if spec is not None and not obs.spec_error:
        dep_status = (obs.deployment or {}).get("status") or {}
        key = builders.model_key(spec)
        out["replicas"] = dep_status.get("replicas") or 0
        out["readyReplicas"] = dep_status.get("readyReplicas") or 0
        out["model"] = spec.served_model_name
        out["endpoint"] = builders.endpoint(owner, spec) if obs.service is not None else None
        if obs.interceptor is not None and out["endpoint"]:  # a deployment at zero is woken through the add-on
            port = (obs.interceptor.get("spec") or {}).get("ports", [{}])[0].get("port")
            out["endpoint"] = f"http://{obs.interceptor['metadata']['name']}.{owner.namespace}.svc:{port}/v1"
        cache_ready = conds["CacheReady"][0] == "True"
        if conds["CacheReady"][1] == "Downloading":
            progress = download_progress(obs.fetch_log)
            if progress:
                out["download"] = progress
        out["cache"] = {"claim": builders.claim_name(owner, spec), "ready": cache_ready,
                        "bytes": cached_bytes(obs.job_pods) if cache_ready else None,
                        "modelPath": builders.model_path(key)}
    else:
        out["replicas"] = 0
        out["readyReplicas"] = 0
    return out


def comparable(status: dict[str, Any]) -> dict[str, Any]:
    """A status without timestamps, to tell a real change from a re-derivation of the same state."""
    out = {k: v for k, v in status.items() if k != "conditions"}
    out["conditions"] = [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                         for c in status.get("conditions") or []]
    if out.get("cache") and out["cache"].get("bytes") is None:
        out["cache"] = {k: v for k, v in out["cache"].items() if k != "bytes"}
    return out

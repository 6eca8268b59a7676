"""The reconcile loop: a de-duplicating work queue of QwenDeployments, workers that observe each one's
children, apply what the builders say should exist, and write the derived status.

Watches (kopf) only enqueue keys: a QwenDeployment changed, or one of its children did. Every key is also
re-enqueued every `resync_seconds`, so drift and missed events heal. One key is never reconciled by two
workers at once; a failing reconcile is retried with backoff, capped at a minute.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from . import API_VERSION, KIND, builders, metrics
from .builders import OperatorDefaults, Owner
from .kube import ApiError, Kube
from .spec import QwenDeploymentSpec, check_semantics
from .status import Observed, comparable, derive_status, job_state, serving_key

log = logging.getLogger("qwen_operator.controller")

Key = tuple[str, str]  # namespace, name
MONITORING_GV = "monitoring.coreos.com/v1"
APPLIED_HASH = "qwen-operator.io/applied-hash"
KEDA_API = (builders.KEDA_GV, "scaledobjects")
HTTP_ADD_ON_APIS = {"InterceptorRoute": (builders.INTERCEPTOR_ROUTE_GV, "interceptorroutes"),
                    "HTTPScaledObject": (builders.HTTP_SCALED_OBJECT_GV, "httpscaledobjects")}
INFERENCE_POOL_API = (builders.INFERENCE_GV, "inferencepools")
# a Warning event when a condition turns to one of these: an optional component the spec asks for is missing
MISSING_REASONS = {("Autoscaling", "KEDACRDsMissing"), ("Autoscaling", "HTTPAddOnMissing"),
                   ("Autoscaling", "PrometheusAddressMissing"), ("InferencePool", "InferencePoolCRDMissing")}


@dataclass
class ControllerConfig:
    namespaces: list[str]
    defaults: OperatorDefaults
    resync_seconds: float = 30.0
    workers: int = 4
    force_apply_seconds: float = 300.0  # re-apply unchanged children anyway, to undo hand edits
    monitoring_check_seconds: float = 60.0
    progress_seconds: float = 10.0  # while a fetch Job runs, reconcile this often to refresh its progress


class Controller:
    def __init__(self, kube: Kube, config: ControllerConfig) -> None:
        self.kube = kube
        self.config = config
        self.queue: asyncio.Queue[Key] = asyncio.Queue()
        self.pending: set[Key] = set()
        self.active: set[Key] = set()
        self.dirty: set[Key] = set()
        self.failures: dict[Key, int] = {}
        self.last_forced: dict[Key, float] = {}
        self.tasks: list[asyncio.Task] = []
        self._monitoring: tuple[float, bool] = (0.0, False)
        self._apis: dict[tuple[str, str], tuple[float, bool]] = {}
        self.phases: dict[Key, str] = {}
        self.refreshing: set[Key] = set()
        self.peer_keys: set[str] = set()  # QwenDeployments (by uid) whose peer-key Secret exists

    # ---- queue ---------------------------------------------------------------------------------------
    def enqueue(self, key: Key, delay: float = 0.0) -> None:
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self.enqueue, key)
            return
        if key in self.active:
            self.dirty.add(key)  # run once more when the current reconcile ends
            return
        if key in self.pending:
            return
        self.pending.add(key)
        self.queue.put_nowait(key)
        metrics.QUEUE_DEPTH.set(len(self.pending))

    def forget(self, key: Key) -> None:
        self.failures.pop(key, None)
        self.last_forced.pop(key, None)
        self.phases.pop(key, None)
        self._publish_phases()

    async def start(self) -> None:
        for i in range(self.config.workers):
            self.tasks.append(asyncio.create_task(self._worker(), name=f"qwen-worker-{i}"))
        self.tasks.append(asyncio.create_task(self._resync(), name="qwen-resync"))

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _resync(self) -> None:
        while True:
            try:
                namespaces = self.config.namespaces or [None]
                for ns in namespaces:
                    for item in await asyncio.to_thread(self.kube.list_qwen, ns):
                        meta = item["metadata"]
                        self.enqueue((meta["namespace"], meta["name"]))
            except Exception as exc:  # noqa: BLE001: the API may be away; try at the next tick
                log.warning("resync listing failed: %s", exc)
            await asyncio.sleep(self.config.resync_seconds)

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            self.pending.discard(key)
            metrics.QUEUE_DEPTH.set(len(self.pending))
            self.active.add(key)
            started = time.monotonic()
            try:
                await self.reconcile(key)
                metrics.RECONCILES.labels("ok").inc()
                self.failures.pop(key, None)
                retry = None
            except Exception as exc:  # noqa: BLE001: every failure is retried with backoff
                n = self.failures.get(key, 0) + 1
                self.failures[key] = n
                retry = min(60.0, 0.5 * 2 ** (n - 1))
                metrics.RECONCILES.labels("error").inc()
                level = logging.INFO if isinstance(exc, ApiError) and exc.status == 409 else logging.WARNING
                log.log(level, "reconcile of %s/%s failed (%s); retrying in %.1fs", *key, exc, retry)
            finally:
                metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
                self.active.discard(key)
            if key in self.dirty:
                self.dirty.discard(key)
                self.enqueue(key)
            elif retry is not None:
                self.enqueue(key, delay=retry)

    # ---- one reconcile -------------------------------------------------------------------------------
    async def monitoring_available(self) -> bool:
        checked, value = self._monitoring
        if time.monotonic() - checked < self.config.monitoring_check_seconds:
            return value
        sm = await asyncio.to_thread(self.kube.has_api, MONITORING_GV, "servicemonitors")
        pr = await asyncio.to_thread(self.kube.has_api, MONITORING_GV, "prometheusrules")
        self._monitoring = (time.monotonic(), sm and pr)
        return sm and pr

    async def api_available(self, group_version: str, resource: str) -> bool:
        """Whether the API server serves this resource (an optional CRD is installed), looked up at most every
        `monitoring_check_seconds`."""
        checked, value = self._apis.get((group_version, resource), (-1e9, False))
        if time.monotonic() - checked < self.config.monitoring_check_seconds:
            return value
        value = await asyncio.to_thread(self.kube.has_api, group_version, resource)
        self._apis[(group_version, resource)] = (time.monotonic(), value)
        return value

    async def reconcile(self, key: Key) -> None:
        ns, name = key
        k = self.kube
        obj = await asyncio.to_thread(k.get, API_VERSION, KIND, ns, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            self.forget(key)
            return  # children go by owner reference
        meta = obj["metadata"]
        owner = Owner(name=name, namespace=ns, uid=meta["uid"])
        generation = meta.get("generation", 1)
        previous = obj.get("status") or {}
        spec, error = parse_spec(obj.get("spec") or {}, name)
        obs = Observed(generation=generation, spec=spec, spec_error=error, previous=previous, now=_now())
        if spec is not None and error is None:
            await self._converge(owner, spec, obs)
        status = derive_status(owner, obs)
        await self._write_status(obj, previous, status)
        # a fetch pod whose log could be read: look again soon, so its progress moves (one timer per key)
        if obs.fetch_log is not None and key not in self.refreshing:
            self.refreshing.add(key)
            asyncio.get_running_loop().call_later(self.config.progress_seconds, self._refresh, key)

    def _refresh(self, key: Key) -> None:
        self.refreshing.discard(key)
        self.enqueue(key)

    async def _converge(self, owner: Owner, spec: QwenDeploymentSpec, obs: Observed) -> None:
        k, ns = self.kube, owner.namespace
        key = builders.model_key(spec)
        force = time.monotonic() - self.last_forced.get((ns, owner.name), 0.0) > self.config.force_apply_seconds
        if force:
            self.last_forced[(ns, owner.name)] = time.monotonic()

        # the cache volume
        pvc = builders.build_pvc(owner, spec)
        if pvc is not None:
            live = await asyncio.to_thread(k.get, "v1", "PersistentVolumeClaim", ns, pvc["metadata"]["name"])
            obs.pvc = await self._apply(pvc, live, force)
        else:
            obs.pvc = await asyncio.to_thread(k.get, "v1", "PersistentVolumeClaim", ns, builders.claim_name(owner, spec))

        # the fetch Job for the current model; superseded ones go once the current one succeeded
        jobs = await asyncio.to_thread(k.list, "batch/v1", "Job", ns, builders.labels(owner.name, "fetch"))
        wanted = builders.job_name(owner, key)
        current = next((j for j in jobs if j["metadata"]["name"] == wanted), None)
        pvc_bound = ((obs.pvc or {}).get("status") or {}).get("phase") == "Bound"
        if current is None and pvc_bound:
            current = await self._apply(builders.build_fetch_job(owner, spec, self.config.defaults), None, True)
            jobs.append(current)
        obs.jobs = [j for j in jobs if j["metadata"]["name"] == wanted]
        if current is not None:
            obs.job_pods = await asyncio.to_thread(k.list, "v1", "Pod", ns, {"job-name": wanted})
        state = job_state(current)
        if state == "running":
            obs.fetch_log = await self._fetch_log(ns, obs.job_pods)
        if state == "succeeded":
            for j in jobs:
                if j["metadata"]["name"] != wanted:
                    await asyncio.to_thread(k.delete, "batch/v1", "Job", ns, j["metadata"]["name"])

        # the Deployment serves the newest complete model: the current one, or until then the one it serves
        live_dep = await asyncio.to_thread(k.get, "apps/v1", "Deployment", ns, owner.name)
        await self._peer_key(owner, live_dep)
        serve_key = key if state == "succeeded" else serving_key(live_dep)
        if serve_key is not None:
            dep = builders.build_deployment(owner, spec, self.config.defaults, serve_key)
            obs.deployment = await self._apply(dep, live_dep, force)
            obs.pods = await asyncio.to_thread(k.list, "v1", "Pod", ns, builders.selector(owner.name))
        else:
            obs.deployment = live_dep

        svc = builders.build_service(owner, spec)
        live_svc = await asyncio.to_thread(k.get, "v1", "Service", ns, owner.name)
        obs.service = await self._apply(svc, live_svc, force)

        await self._optional(builders.build_pdb(owner, spec), "policy/v1", "PodDisruptionBudget", owner, force)

        sm = builders.build_service_monitor(owner, spec)
        pr = builders.build_prometheus_rule(owner, spec)
        available = await self.monitoring_available()
        if available:  # also when disabled: what an earlier spec made goes
            await self._optional(sm, MONITORING_GV, "ServiceMonitor", owner, force)
            await self._optional(pr, MONITORING_GV, "PrometheusRule", owner, force)
        if sm is None and pr is None:
            obs.monitoring = "disabled"
        else:
            obs.monitoring = "applied" if available else "missing"

        await self._autoscaling(owner, spec, obs, force)

        pool = builders.build_inference_pool(owner, spec)
        if await self.api_available(*INFERENCE_POOL_API):  # also when disabled: what an earlier spec made goes
            await self._optional(pool, builders.INFERENCE_GV, "InferencePool", owner, force)
            obs.inference_pool = "disabled" if pool is None else "applied"
        else:
            obs.inference_pool = "disabled" if pool is None else "missing"

    async def _peer_key(self, owner: Owner, live_dep: dict | None) -> None:
        """The Secret of the key the inference pods share, made before any pod needs it: created (never read: the
        operator may create Secrets, not read them) once per QwenDeployment in this process, and again whenever its
        pods are not all ready, in case it went; an existing one is left as it is."""
        status = (live_dep or {}).get("status") or {}
        settled = live_dep is not None and status.get("readyReplicas", 0) >= (live_dep.get("spec") or {}).get(
            "replicas", 1)
        if owner.uid in self.peer_keys and (live_dep is None or settled):
            return
        await asyncio.to_thread(self.kube.create, builders.build_peer_secret(owner, secrets.token_urlsafe(32)))
        self.peer_keys.add(owner.uid)

    async def _autoscaling(self, owner: Owner, spec: QwenDeploymentSpec, obs: Observed, force: bool) -> None:
        """KEDA's ScaledObject and, to scale from zero, the HTTP add-on's route and the <name>-interceptor
        Service; each kind whose CRD is installed is also cleaned up when the spec no longer asks for it."""
        defaults = self.config.defaults
        keda = await self.api_available(*KEDA_API)
        installed = [kind for kind in builders.HTTP_ADD_ON_KINDS if await self.api_available(*HTTP_ADD_ON_APIS[kind])]
        add_on = installed[0] if installed else None  # InterceptorRoute where the add-on has it
        http = add_on if keda and builders.scales_from_zero(spec) else None
        for kind in installed:
            desired = None
            if kind == http:
                build = builders.build_interceptor_route if kind == "InterceptorRoute" else builders.build_http_scaled_object
                desired = build(owner, spec, defaults)
            await self._optional(desired, HTTP_ADD_ON_APIS[kind][0], kind, owner, force)
        svc = builders.build_interceptor_service(owner, spec, defaults) if http else None
        obs.interceptor = await self._optional(svc, "v1", "Service", owner, force,
                                               name=builders.interceptor_service_name(owner))
        so = builders.build_scaled_object(owner, spec, defaults, http) if keda else None
        if keda:
            obs.scaled_object = await self._optional(so, builders.KEDA_GV, "ScaledObject", owner, force)
        if spec.autoscaling is None:
            obs.autoscaling = "disabled"
        elif not keda:
            obs.autoscaling = "keda-missing"
        elif so is None:
            obs.autoscaling = "no-prometheus"
        elif builders.scales_from_zero(spec) and http is None:
            obs.autoscaling = "http-missing"
        else:
            obs.autoscaling = "applied"

    async def _fetch_log(self, ns: str, pods: list[dict]) -> str | None:
        """The last lines of the running fetch pod's log (its progress), or None."""
        running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
        if not running:
            return None
        pod = max(running, key=lambda p: p["metadata"].get("creationTimestamp") or "")
        try:
            return await asyncio.to_thread(self.kube.pod_log, ns, pod["metadata"]["name"], "fetch", 20)
        except Exception as exc:  # noqa: BLE001: no progress is no reason to fail the reconcile
            log.debug("no log from %s/%s: %s", ns, pod["metadata"]["name"], exc)
            return None

    async def _optional(self, desired: dict | None, api_version: str, kind: str, owner: Owner, force: bool,
                        name: str | None = None) -> dict | None:
        """Apply `desired`, or delete what this QwenDeployment made when nothing is desired; returns the live
        object, if any."""
        name = name or owner.name
        live = await asyncio.to_thread(self.kube.get, api_version, kind, owner.namespace, name)
        if desired is None:
            if live is not None and _owned_by(live, owner):
                await asyncio.to_thread(self.kube.delete, api_version, kind, owner.namespace, name)
            return None
        return await self._apply(desired, live, force)

    async def _apply(self, desired: dict, live: dict | None, force: bool) -> dict:
        """Apply unless the live object already carries this exact desired state (and no forced re-apply
        is due); returns the live object."""
        digest = hashlib.sha256(json.dumps(desired, sort_keys=True).encode()).hexdigest()[:16]
        desired.setdefault("metadata", {}).setdefault("annotations", {})[APPLIED_HASH] = digest
        if live is not None and not force:
            if (live.get("metadata") or {}).get("annotations", {}).get(APPLIED_HASH) == digest:
                return live
        if live is not None and force:
            # server-side apply merges keyed lists: an item someone else changed (a Service port edited by
            # hand) would stay beside ours. Put drifted spec fields back whole first, with a merge patch.
            have = live.get("spec") or {}
            drift = {k: v for k, v in (desired.get("spec") or {}).items() if not subset(v, have.get(k))}
            if drift:
                log.info("%s %s/%s drifted in %s; restoring", desired["kind"], desired["metadata"]["namespace"],
                         desired["metadata"]["name"], ", ".join(sorted(drift)))
                await asyncio.to_thread(self.kube.merge_patch, desired, {"spec": drift})
        metrics.APPLIES.labels(desired["kind"]).inc()
        return await asyncio.to_thread(self.kube.apply, desired)

    async def _write_status(self, obj: dict, previous: dict, status: dict) -> None:
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        old_phase, new_phase = previous.get("phase"), status.get("phase")
        if comparable(previous) != comparable(status):
            # a merge patch: fields that vanished are set to null so they go
            patch = dict(status)
            for field in previous:
                if field not in patch:
                    patch[field] = None
            await asyncio.to_thread(self.kube.patch_status, meta["namespace"], meta["name"], patch)
        if old_phase != new_phase:
            kind = "Warning" if new_phase in ("Degraded", "Failed") else "Normal"
            message = f"{old_phase or 'New'} -> {new_phase}: {status.get('message', '')}"
            log.info("%s/%s: %s", *key, message)
            try:
                await asyncio.to_thread(self.kube.event, obj, kind, status.get("reason") or new_phase, message)
            except Exception as exc:  # noqa: BLE001: an event is worth less than the reconcile
                log.warning("could not post an event on %s/%s: %s", *key, exc)
        monitoring_missing = any(c["type"] == "Monitoring" and c["reason"] == "MonitoringCRDsMissing"
                                 for c in status.get("conditions") or [])
        was_missing = any(c.get("type") == "Monitoring" and c.get("reason") == "MonitoringCRDsMissing"
                          for c in previous.get("conditions") or [])
        if monitoring_missing and not was_missing:
            try:
                await asyncio.to_thread(
                    self.kube.event, obj, "Warning", "MonitoringCRDsMissing",
                    "ServiceMonitor and PrometheusRule were not created: the Prometheus Operator's CRDs are "
                    "not installed. The model is served all the same.")
            except Exception as exc:  # noqa: BLE001
                log.warning("could not post an event: %s", exc)
        reasons = {(c["type"], c["reason"]): c for c in status.get("conditions") or []}
        before = {(c.get("type"), c.get("reason")) for c in previous.get("conditions") or []}
        for pair in sorted(MISSING_REASONS & set(reasons) - before):
            try:
                await asyncio.to_thread(self.kube.event, obj, "Warning", pair[1], reasons[pair]["message"])
            except Exception as exc:  # noqa: BLE001
                log.warning("could not post an event: %s", exc)
        self.phases[key] = new_phase or "Unknown"
        self._publish_phases()

    def _publish_phases(self) -> None:
        counts: dict[str, int] = {}
        for p in self.phases.values():
            counts[p] = counts.get(p, 0) + 1
        for phase in ("Pending", "Downloading", "Starting", "Ready", "Degraded", "Failed"):
            metrics.PHASES.labels(phase).set(counts.get(phase, 0))


def subset(want: Any, have: Any) -> bool:
    """Whether the live value `have` holds everything of `want` (the server adds defaults, never removes)."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(subset(v, have.get(k)) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and len(want) == len(have) and all(subset(w, h) for w, h in zip(want, have))
    if want is None:
        return have is None
    return want == have or str(want) == str(have)


def _owned_by(obj: dict, owner: Owner) -> bool:
    return any(r.get("uid") == owner.uid for r in (obj.get("metadata") or {}).get("ownerReferences") or [])


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


from .crd import MAX_NAME  # noqa: E402


def parse_spec(raw: dict[str, Any], name: str) -> tuple[QwenDeploymentSpec | None, str | None]:
    """The validated spec, or the reason it is invalid (a person-readable sentence)."""
    if len(name) > MAX_NAME:
        return None, f"metadata.name is {len(name)} characters; at most {MAX_NAME}, as it names the pods' Service"
    try:
        spec = QwenDeploymentSpec.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        return None, f"spec.{loc}: {first.get('msg')}"
    problems = check_semantics(spec)
    if problems:
        return spec, "; ".join(problems)
    return spec, None

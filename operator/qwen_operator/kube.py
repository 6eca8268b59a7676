"""A small Kubernetes API client for the kinds the operator owns: get, list, server-side apply, delete and
status patches, on the official client's authenticated connection. Calls are blocking; the controller runs
them in threads."""

from __future__ import annotations

import json
import logging
from typing import Any

from . import FIELD_MANAGER, GROUP, PLURAL, VERSION

log = logging.getLogger("qwen_operator.kube")

PATHS = {
    ("v1", "PersistentVolumeClaim"): "/api/v1/namespaces/{ns}/persistentvolumeclaims",
    ("v1", "Secret"): "/api/v1/namespaces/{ns}/secrets",
    ("v1", "Service"): "/api/v1/namespaces/{ns}/services",
    ("v1", "Pod"): "/api/v1/namespaces/{ns}/pods",
    ("batch/v1", "Job"): "/apis/batch/v1/namespaces/{ns}/jobs",
    ("apps/v1", "Deployment"): "/apis/apps/v1/namespaces/{ns}/deployments",
    ("policy/v1", "PodDisruptionBudget"): "/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "/apis/monitoring.coreos.com/v1/namespaces/{ns}/servicemonitors",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "/apis/monitoring.coreos.com/v1/namespaces/{ns}/prometheusrules",
    ("keda.sh/v1alpha1", "ScaledObject"): "/apis/keda.sh/v1alpha1/namespaces/{ns}/scaledobjects",
    ("http.keda.sh/v1beta1", "InterceptorRoute"): "/apis/http.keda.sh/v1beta1/namespaces/{ns}/interceptorroutes",
    ("http.keda.sh/v1alpha1", "HTTPScaledObject"): "/apis/http.keda.sh/v1alpha1/namespaces/{ns}/httpscaledobjects",
    ("inference.networking.k8s.io/v1", "InferencePool"):
        "/apis/inference.networking.k8s.io/v1/namespaces/{ns}/inferencepools",
    (f"{GROUP}/{VERSION}", "QwenDeployment"): f"/apis/{GROUP}/{VERSION}/namespaces/{{ns}}/{PLURAL}",
}


class ApiError(Exception):
    def __init__(self, status: int, reason: str, body: str = "") -> None:
        super().__init__(f"{status} {reason}: {body[:500]}")
        self.status = status
        self.reason = reason
        self.body = body


class Kube:
    def __init__(self, api_client=None) -> None:
        if api_client is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        self.api = api_client

    def _call(self, method: str, path: str, body: Any = None, query: list | None = None,
              content_type: str | None = None, raw: bool = False, timeout: float = 60) -> Any:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        elif body is not None:
            headers["Content-Type"] = "application/json"
        payload = body  # the REST layer serialises dicts for JSON and structured-YAML content types
        method, url, headers, payload, _ = self.api.param_serialize(
            method, path, query_params=query or [], header_params=headers, body=payload,
            auth_settings=["BearerToken"])
        resp = self.api.call_api(method, url, header_params=headers, body=payload, _request_timeout=(10, timeout))
        data = resp.read()
        if resp.status >= 400:
            raise ApiError(resp.status, resp.reason or "", data.decode(errors="replace") if data else "")
        if raw:
            return data.decode(errors="replace") if data else ""
        return json.loads(data) if data else None

    @staticmethod
    def path(api_version: str, kind: str, namespace: str, name: str | None = None, sub: str | None = None) -> str:
        base = PATHS[(api_version, kind)].format(ns=namespace)
        if name:
            base += f"/{name}"
        if sub:
            base += f"/{sub}"
        return base

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict | None:
        try:
            return self._call("GET", self.path(api_version, kind, namespace, name))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: str, selector: dict[str, str] | None = None) -> list[dict]:
        query = []
        if selector:
            query.append(("labelSelector", ",".join(f"{k}={v}" for k, v in selector.items())))
        return (self._call("GET", self.path(api_version, kind, namespace), query=query) or {}).get("items", [])

    def create(self, obj: dict) -> dict | None:
        """Create `obj`; None when an object of that name exists already (it is left as it is)."""
        meta = obj["metadata"]
        try:
            return self._call("POST", self.path(obj["apiVersion"], obj["kind"], meta["namespace"]), body=obj)
        except ApiError as e:
            if e.status == 409:
                return None
            raise

    def apply(self, obj: dict) -> dict:
        """Server-side apply with the operator's field manager, taking over conflicting fields."""
        meta = obj["metadata"]
        path = self.path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        return self._call("PATCH", path, body=obj, query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
                          content_type="application/apply-patch+yaml")

    def merge_patch(self, obj: dict, patch: dict) -> dict:
        meta = obj["metadata"]
        path = self.path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        return self._call("PATCH", path, body=patch, query=[("fieldManager", FIELD_MANAGER)],
                          content_type="application/merge-patch+json")

    def delete(self, api_version: str, kind: str, namespace: str, name: str, propagation: str = "Background") -> bool:
        try:
            self._call("DELETE", self.path(api_version, kind, namespace, name),
                       body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation})
            return True
        except ApiError as e:
            if e.status == 404:
                return False
            raise

    def patch_status(self, namespace: str, name: str, status: dict) -> dict:
        path = self.path(f"{GROUP}/{VERSION}", "QwenDeployment", namespace, name, "status")
        return self._call("PATCH", path, body={"status": status}, content_type="application/merge-patch+json")

    def pod_log(self, namespace: str, name: str, container: str, tail_lines: int) -> str:
        """The last lines a pod's container wrote (pods/log)."""
        path = self.path("v1", "Pod", namespace, name, "log")
        return self._call("GET", path, query=[("container", container), ("tailLines", str(tail_lines))], raw=True,
                          timeout=10)

    def list_qwen(self, namespace: str | None) -> list[dict]:
        path = f"/apis/{GROUP}/{VERSION}/{PLURAL}" if namespace is None else self.path(
            f"{GROUP}/{VERSION}", "QwenDeployment", namespace)
        return (self._call("GET", path) or {}).get("items", [])

    def has_api(self, group_version: str, resource: str) -> bool:
        try:
            data = self._call("GET", f"/apis/{group_version}")
        except ApiError as e:
            if e.status == 404:
                return False
            raise
        return any(r.get("name") == resource for r in (data or {}).get("resources", []))

    def event(self, involved: dict, type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on the QwenDeployment (what `kubectl describe` shows)."""
        import datetime as dt
        import uuid

        meta = involved["metadata"]
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": involved["apiVersion"], "kind": involved["kind"], "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta["uid"]},
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "reportingInstance": FIELD_MANAGER,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self._call("POST", f"/api/v1/namespaces/{meta['namespace']}/events", body=body)

"""kopf wiring: watches that feed the controller's queue, startup settings, and the operator's endpoints.

Handlers hold no logic: a change to a QwenDeployment or to any child it owns enqueues that QwenDeployment.
No handler needs a finalizer, so deleting a QwenDeployment never waits for the operator.
"""

from __future__ import annotations

import logging

import kopf

from . import GROUP, PLURAL, VERSION
from .builders import MANAGED_BY, OperatorDefaults
from .controller import Controller, ControllerConfig
from .kube import Kube

log = logging.getLogger("qwen_operator.handlers")

CONTROLLER: Controller | None = None
SETTINGS = None  # the OperatorSettings, set by main() before kopf runs
CHILD_LABELS = {"app.kubernetes.io/managed-by": MANAGED_BY}
INSTANCE = "app.kubernetes.io/instance"


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_) -> None:
    global CONTROLLER
    s = SETTINGS
    assert s is not None, "qwen_operator.main sets the settings before kopf starts"
    # watch timeouts at startup: a silent stream is dropped and reopened, never trusted for hours
    settings.watching.server_timeout = s.watch_server_timeout
    settings.watching.client_timeout = s.watch_client_timeout
    settings.watching.connect_timeout = s.watch_connect_timeout
    settings.posting.level = logging.WARNING
    settings.networking.error_backoffs = [1, 2, 5, 10, 20]
    CONTROLLER = Controller(
        Kube(),
        ControllerConfig(namespaces=list(s.namespaces),
                         defaults=OperatorDefaults(image=s.default_image, image_gpu=s.default_image_gpu,
                                                   prometheus_address=s.prometheus_address,
                                                   http_scaler_address=s.keda_http_scaler_address,
                                                   interceptor_host=s.keda_http_interceptor_host,
                                                   interceptor_port=s.keda_http_interceptor_port,
                                                   cluster_domain=s.cluster_domain),
                         resync_seconds=s.resync_seconds, workers=s.workers,
                         force_apply_seconds=s.force_apply_seconds,
                         monitoring_check_seconds=s.monitoring_check_seconds,
                         progress_seconds=s.progress_seconds),
    )
    await CONTROLLER.start()
    if s.metrics_port:
        from prometheus_client import start_http_server

        from .metrics import REGISTRY

        start_http_server(s.metrics_port, registry=REGISTRY)
    log.info("qwen-operator started", extra={"namespaces": s.namespaces or "all"})


@kopf.on.cleanup()
async def cleanup(**_) -> None:
    if CONTROLLER is not None:
        await CONTROLLER.stop()


def _enqueue(namespace: str | None, name: str | None) -> None:
    if CONTROLLER is not None and namespace and name:
        CONTROLLER.enqueue((namespace, name))


@kopf.on.event(GROUP, VERSION, PLURAL)
async def qwen_changed(type: str | None, name: str, namespace: str, **_) -> None:
    if type == "DELETED":
        if CONTROLLER is not None:
            CONTROLLER.forget((namespace, name))
        return
    _enqueue(namespace, name)


def _child(labels: dict, namespace: str, **_) -> None:
    _enqueue(namespace, labels.get(INSTANCE))


for _group_version, _plural in (("batch/v1", "jobs"), ("apps/v1", "deployments"), ("v1", "persistentvolumeclaims"),
                                ("v1", "services"), ("policy/v1", "poddisruptionbudgets")):
    _g, _, _v = _group_version.rpartition("/")
    kopf.on.event(_g, _v, _plural, labels=CHILD_LABELS, id=f"child-{_plural}")(
        lambda labels, namespace, **kw: _child(labels, namespace))


@kopf.on.probe(id="queue")
def queue_probe(**_) -> int:
    return len(CONTROLLER.pending) if CONTROLLER else -1

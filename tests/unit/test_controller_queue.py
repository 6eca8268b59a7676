"""The controller's work queue and reconcile, without an API server: de-duplication, the dirty set, backoff,
and a model swap. The API is a small in-memory fake (FakeKube) that stores what the controller applies; the
tests play the other controllers' part (binding the volume, finishing Jobs, readying pods) by editing it.
tests/cluster runs the same controller against a real API server."""

from __future__ import annotations

import asyncio
import copy
import uuid

import pytest

from qwen_operator import API_VERSION, KIND, builders
from qwen_operator.builders import OperatorDefaults
from qwen_operator.controller import Controller, ControllerConfig
from qwen_operator.kube import ApiError

NS = "team-a"
K1, K2 = (NS, "one"), (NS, "two")


class FakeKube:
    """The calls the controller makes on `kube.Kube`, on a dict of objects. Apply keeps the status and bumps
    metadata.generation when the spec changes, as the API server does; nothing else is simulated."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str, str], dict] = {}
        self.events: list[tuple[str, str, str]] = []
        self.deleted: list[tuple[str, str]] = []
        self.created: list[str] = []

    @staticmethod
    def _key(obj: dict) -> tuple[str, str, str, str]:
        return obj["apiVersion"], obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict | None:
        return copy.deepcopy(self.objects.get((api_version, kind, namespace, name)))

    def list(self, api_version: str, kind: str, namespace: str, selector: dict | None = None) -> list[dict]:
        return [copy.deepcopy(o) for (av, k, ns, _), o in sorted(self.objects.items())
                if (av, k, ns) == (api_version, kind, namespace)
                and all((o["metadata"].get("labels") or {}).get(a) == b for a, b in (selector or {}).items())]

    def create(self, obj: dict) -> dict | None:
        self.created.append(obj["metadata"]["name"])
        if self._key(obj) in self.objects:
            return None
        return self.apply(obj)

    def apply(self, obj: dict) -> dict:
        key = self._key(obj)
        live = self.objects.get(key)
        new = copy.deepcopy(obj)
        meta = new["metadata"]
        meta["uid"] = live["metadata"]["uid"] if live else str(uuid.uuid4())
        generation = live["metadata"].get("generation", 1) if live else 1
        if live is not None and live.get("spec") != new.get("spec"):
            generation += 1
        meta["generation"] = generation
        if live is not None and "status" in live:
            new["status"] = live["status"]
        self.objects[key] = new
        return copy.deepcopy(new)

    def merge_patch(self, obj: dict, patch: dict) -> dict:
        live = self.objects[self._key(obj)]
        live.setdefault("spec", {}).update(patch.get("spec", {}))
        return copy.deepcopy(live)

    def delete(self, api_version: str, kind: str, namespace: str, name: str, propagation: str = "Background") -> bool:
        self.deleted.append((kind, name))
        return self.objects.pop((api_version, kind, namespace, name), None) is not None

    def patch_status(self, namespace: str, name: str, status: dict) -> dict:
        obj = self.objects[(API_VERSION, KIND, namespace, name)]
        current = obj.setdefault("status", {})
        for k, v in status.items():
            if v is None:
                current.pop(k, None)
            else:
                current[k] = v
        return copy.deepcopy(obj)

    def list_qwen(self, namespace: str | None) -> list[dict]:
        return [copy.deepcopy(o) for (av, k, ns, _), o in self.objects.items()
                if (av, k) == (API_VERSION, KIND) and namespace in (None, ns)]

    def has_api(self, group_version: str, resource: str) -> bool:
        return False  # no Prometheus Operator

    def event(self, involved: dict, type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))

    # ---- what other controllers would do ----------------------------------------------------------------
    def set_status(self, api_version: str, kind: str, name: str, status: dict) -> None:
        self.objects[(api_version, kind, NS, name)]["status"] = status


def config(workers: int = 4) -> ControllerConfig:
    return ControllerConfig(namespaces=[NS], defaults=OperatorDefaults(image="registry.example/qwen:1"),
                            resync_seconds=3600, workers=workers)


class Scripted(Controller):
    """A controller whose reconcile only records calls, optionally waits on a gate and raises scripted errors:
    the queue's behaviour, apart from what a reconcile does."""

    def __init__(self, workers: int = 4) -> None:
        super().__init__(FakeKube(), config(workers))
        self.calls: list[tuple[str, str]] = []
        self.finished: list[tuple[str, str]] = []
        self.gates: dict[tuple[str, str], asyncio.Event] = {}
        self.errors: dict[tuple[str, str], list[Exception]] = {}
        self.inside: set[tuple[str, str]] = set()
        self.overlaps = 0

    async def reconcile(self, key) -> None:
        if key in self.inside:
            self.overlaps += 1
        self.inside.add(key)
        self.calls.append(key)
        try:
            if key in self.gates:
                await self.gates[key].wait()
            errors = self.errors.get(key)
            if errors:
                raise errors.pop(0)
        finally:
            self.inside.discard(key)
            self.finished.append(key)


async def until(condition, timeout: float = 10.0) -> None:
    """Wait for `condition` (a bound, never a measurement: the tests assert what happened, not how fast)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


def idle(c: Controller) -> bool:
    return not c.pending and not c.active and not c.dirty and c.queue.empty()


@pytest.fixture
async def scripted():
    controllers: list[Scripted] = []

    def make(workers: int = 4) -> Scripted:
        controllers.append(Scripted(workers))
        return controllers[-1]

    yield make
    for c in controllers:
        await c.stop()


# ---- the queue --------------------------------------------------------------------------------------


async def test_a_key_enqueued_many_times_is_reconciled_once(scripted):
    c = scripted()
    for _ in range(5):
        c.enqueue(K1)
    c.enqueue(K2)
    c.enqueue(K1)
    assert c.pending == {K1, K2} and c.queue.qsize() == 2
    await c.start()
    await until(lambda: len(c.finished) == 2 and idle(c))
    assert sorted(c.calls) == [K1, K2]


async def test_a_change_during_a_reconcile_runs_it_once_more_never_twice_at_once(scripted):
    c = scripted(workers=4)
    gate = c.gates[K1] = asyncio.Event()
    await c.start()
    c.enqueue(K1)
    await until(lambda: K1 in c.active)
    for _ in range(3):  # events while the reconcile runs: remembered once, not queued for a free worker
        c.enqueue(K1)
    assert c.dirty == {K1} and K1 not in c.pending and c.queue.empty()
    c.enqueue(K2)  # other keys go on meanwhile
    await until(lambda: K2 in c.finished)
    assert c.finished == [K2]
    gate.set()
    await until(lambda: c.finished.count(K1) == 2 and idle(c))
    assert c.calls.count(K1) == 2 and c.overlaps == 0  # nothing is left that could run it a third time


async def test_failures_retry_with_doubling_backoff_capped_at_a_minute(scripted, monkeypatch):
    c = scripted(workers=1)
    c.errors[K1] = [ApiError(500, "Internal Server Error")] * 9 + [ApiError(409, "Conflict")]
    loop = asyncio.get_running_loop()
    scheduled: list[tuple[float, tuple]] = []
    real_call_later = loop.call_later

    def call_later(delay, callback, *args):  # the controller's retries are recorded, not waited for
        if getattr(callback, "__self__", None) is c and callback.__name__ == "enqueue":
            scheduled.append((delay, args))
            return None
        return real_call_later(delay, callback, *args)

    monkeypatch.setattr(loop, "call_later", call_later)
    await c.start()
    c.enqueue(K1)
    for n in range(1, 11):
        await until(lambda: len(scheduled) == n and idle(c))
        assert c.failures[K1] == n
        c.enqueue(*scheduled[-1][1])  # the retry comes due
    assert [d for d, _ in scheduled] == [0.5, 1, 2, 4, 8, 16, 32, 60, 60, 60]
    await until(lambda: len(c.finished) == 11 and idle(c))
    assert K1 not in c.failures  # a success forgets the failures...
    c.errors[K1] = [ApiError(500, "Internal Server Error")]
    c.enqueue(K1)
    await until(lambda: len(scheduled) == 11 and idle(c))
    assert scheduled[-1] == (0.5, (K1,))  # ...so the next failure starts the backoff again


async def test_a_failed_reconcile_with_a_newer_change_runs_again_at_once(scripted, monkeypatch):
    c = scripted()
    gate = c.gates[K1] = asyncio.Event()
    c.errors[K1] = [RuntimeError("boom")]
    loop = asyncio.get_running_loop()
    scheduled = []
    real_call_later = loop.call_later
    monkeypatch.setattr(loop, "call_later", lambda d, cb, *a: scheduled.append(d) if getattr(cb, "__self__", None)
                        is c else real_call_later(d, cb, *a))
    await c.start()
    c.enqueue(K1)
    await until(lambda: K1 in c.active)
    c.enqueue(K1)
    gate.set()
    await until(lambda: len(c.finished) == 2 and idle(c))
    assert scheduled == [] and c.calls == [K1, K1] and K1 not in c.failures


# ---- reconciles on the fake API ---------------------------------------------------------------------


def qwen(kube: FakeKube, name: str, model: dict, generation: int = 1) -> None:
    obj = kube.objects.get((API_VERSION, KIND, NS, name))
    meta = {"name": name, "namespace": NS, "uid": obj["metadata"]["uid"] if obj else str(uuid.uuid4()),
            "generation": generation}
    kube.objects[(API_VERSION, KIND, NS, name)] = {"apiVersion": API_VERSION, "kind": KIND, "metadata": meta,
                                                   "spec": {"model": model},
                                                   "status": (obj or {}).get("status", {})}


def status(kube: FakeKube, name: str) -> dict:
    return kube.objects[(API_VERSION, KIND, NS, name)]["status"]


def jobs(kube: FakeKube) -> list[str]:
    return [o["metadata"]["name"] for o in kube.list("batch/v1", "Job", NS)]


def served(kube: FakeKube, name: str) -> str | None:
    dep = kube.get("apps/v1", "Deployment", NS, name)
    return dep["metadata"]["annotations"][builders.ANNOTATION_MODEL_KEY] if dep else None


def finish_job(kube: FakeKube, name: str, ok: bool = True) -> None:
    cond = "Complete" if ok else "Failed"
    kube.set_status("batch/v1", "Job", name, {"conditions": [{"type": cond, "status": "True"}],
                                              **({"succeeded": 1} if ok else {"failed": 4})})


def ready_pods(kube: FakeKube, name: str) -> None:
    dep = kube.objects[("apps/v1", "Deployment", NS, name)]
    n = dep["spec"]["replicas"]
    dep["status"] = {"observedGeneration": dep["metadata"]["generation"], "replicas": n, "readyReplicas": n,
                     "updatedReplicas": n}


async def test_a_new_model_is_served_only_once_its_cache_is_complete():
    kube = FakeKube()
    c = Controller(kube, config())
    old = {"name": "Qwen/Qwen2.5-0.5B-Instruct"}
    new = {"name": "Qwen/Qwen2.5-1.5B-Instruct"}
    qwen(kube, "chat", old)

    await c.reconcile(("team-a", "chat"))
    assert status(kube, "chat")["reason"] == "CachePending" and jobs(kube) == []  # the volume is not bound yet
    kube.set_status("v1", "PersistentVolumeClaim", "chat-cache", {"phase": "Bound"})
    await c.reconcile(("team-a", "chat"))
    (old_job,) = jobs(kube)
    assert status(kube, "chat")["phase"] == "Downloading" and served(kube, "chat") is None
    finish_job(kube, old_job)
    await c.reconcile(("team-a", "chat"))
    assert served(kube, "chat") == "huggingface:Qwen/Qwen2.5-0.5B-Instruct@main"
    ready_pods(kube, "chat")
    await c.reconcile(("team-a", "chat"))
    assert status(kube, "chat")["phase"] == "Ready"

    qwen(kube, "chat", new, generation=2)  # the model changes: a new Job, the pods keep the old model
    await c.reconcile(("team-a", "chat"))
    new_job = next(j for j in jobs(kube) if j != old_job)
    assert served(kube, "chat") == "huggingface:Qwen/Qwen2.5-0.5B-Instruct@main"
    st = status(kube, "chat")
    assert st["phase"] == "Downloading" and "still serving Qwen/Qwen2.5-0.5B-Instruct@main" in st["message"]
    assert st["cache"]["modelPath"] == "/cache/Qwen--Qwen2.5-1.5B-Instruct/main" and not st["cache"]["ready"]

    finish_job(kube, new_job)  # complete: the pods switch, the superseded Job goes
    await c.reconcile(("team-a", "chat"))
    assert served(kube, "chat") == "huggingface:Qwen/Qwen2.5-1.5B-Instruct@main"
    assert jobs(kube) == [new_job] and ("Job", old_job) in kube.deleted
    ready_pods(kube, "chat")
    await c.reconcile(("team-a", "chat"))
    assert status(kube, "chat")["phase"] == "Ready" and status(kube, "chat")["cache"]["ready"]
    assert [e[1] for e in kube.events if e[1] != "MonitoringCRDsMissing"] == [
        "CachePending", "Downloading", "RollingOut", "Ready", "Downloading", "RollingOut", "Ready"]


async def test_a_failed_fetch_of_a_new_model_keeps_the_old_one_serving():
    kube = FakeKube()
    c = Controller(kube, config())
    qwen(kube, "chat", {"name": "demo", "source": "demo"})
    await c.reconcile(("team-a", "chat"))
    kube.set_status("v1", "PersistentVolumeClaim", "chat-cache", {"phase": "Bound"})
    await c.reconcile(("team-a", "chat"))
    finish_job(kube, jobs(kube)[0])
    await c.reconcile(("team-a", "chat"))
    ready_pods(kube, "chat")
    qwen(kube, "chat", {"name": "Qwen/Does-Not-Exist"}, generation=2)
    await c.reconcile(("team-a", "chat"))
    finish_job(kube, next(j for j in jobs(kube) if kube.get("batch/v1", "Job", NS, j).get("status") is None),
               ok=False)
    await c.reconcile(("team-a", "chat"))
    st = status(kube, "chat")
    assert (st["phase"], st["reason"]) == ("Degraded", "DownloadFailed")
    assert st["message"].endswith("still serving the demo model") and served(kube, "chat") == "demo"


async def test_the_peer_key_is_made_once_and_again_only_while_pods_are_not_ready():
    """The Secret of the pods' shared key is created before the Deployment (never read, never rewritten); while
    the pods are all ready the operator does not ask again, and when they are not (a Secret deleted by hand
    leaves new pods waiting on it) it creates one again."""
    kube = FakeKube()
    c = Controller(kube, config())
    qwen(kube, "chat", {"name": "demo", "source": "demo"})
    await c.reconcile(("team-a", "chat"))
    secret = kube.get("v1", "Secret", NS, "chat-peer-key")
    key = secret["stringData"]["key"]
    assert len(key) >= 32 and kube.created == ["chat-peer-key"]
    kube.set_status("v1", "PersistentVolumeClaim", "chat-cache", {"phase": "Bound"})
    await c.reconcile(("team-a", "chat"))
    finish_job(kube, jobs(kube)[0])
    await c.reconcile(("team-a", "chat"))  # the Deployment appears
    assert served(kube, "chat") == "demo" and kube.created == ["chat-peer-key"]
    await c.reconcile(("team-a", "chat"))  # its pods are not ready yet: asked again
    assert kube.created == ["chat-peer-key"] * 2
    ready_pods(kube, "chat")
    for _ in range(3):
        await c.reconcile(("team-a", "chat"))
    assert len(kube.created) == 2  # all ready: no more
    assert kube.get("v1", "Secret", NS, "chat-peer-key")["stringData"]["key"] == key  # never rewritten
    del kube.objects[("v1", "Secret", NS, "chat-peer-key")]
    kube.objects[("apps/v1", "Deployment", NS, "chat")]["status"]["readyReplicas"] = 0
    await c.reconcile(("team-a", "chat"))
    assert kube.get("v1", "Secret", NS, "chat-peer-key")["stringData"]["key"] != key


async def test_a_deleted_deployment_is_forgotten():
    kube = FakeKube()
    c = Controller(kube, config())
    c.failures[K1] = 3
    c.phases[K1] = "Ready"
    await c.reconcile(K1)  # not there any more
    assert K1 not in c.failures and K1 not in c.phases and kube.objects == {}


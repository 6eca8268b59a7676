"""Builders, the CRD and the spec models, on pure data: every object the operator makes is valid Kubernetes."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from qwen_operator import builders, crd, sizing
from qwen_operator.builders import OperatorDefaults, Owner
from qwen_operator.spec import QwenDeploymentSpec, check_semantics, parse_quantity

ROOT = Path(__file__).resolve().parents[2]
OWNER = Owner("chat", "team-a", "0c7f6a1e-1111-2222-3333-444455556666")
DEFAULTS = OperatorDefaults(image="registry.example/qwen-inference:1")
K8S = "1.37.0"


def spec(**kw) -> QwenDeploymentSpec:
    kw.setdefault("model", {"name": "Qwen/Qwen2.5-0.5B-Instruct"})
    return QwenDeploymentSpec.model_validate(kw)


SPECS = {
    "cpu": spec(),
    "cpu-rwx-3": spec(replicas=3, cache={"accessMode": "ReadWriteMany", "size": "5Gi"}),
    "gpu-2": spec(model={"name": "Qwen/Qwen2.5-7B-Instruct"}, device="gpu", gpus=2,
                  tolerations=[{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]),
    "demo": spec(model={"name": "demo", "source": "demo"}),
    "pvc": spec(model={"name": "m", "source": "pvc", "path": "a/b"}, cache={"existingClaim": "models"}),
    "full": spec(model={"name": "Qwen/Qwen2.5-1.5B-Instruct", "revision": "v1.0", "servedModelName": "chat",
                        "tokenSecretRef": {"name": "hf"}, "hubEndpoint": "https://hf-mirror.example"},
                 replicas=2, dtype="bfloat16", engine={"maxConcurrency": 8, "threads": 3, "maxModelLen": 4096,
                                                       "kvCacheTokens": 32768, "quantize": "int8"},
                 resources={"requests": {"cpu": 2, "memory": "6Gi"}, "limits": {"cpu": "3", "memory": "6Gi"}},
                 imagePullSecrets=[{"name": "regcred"}], nodeSelector={"pool": "cpu"}, priorityClassName="high",
                 env=[{"name": "X", "value": "1"}, {"name": "Y", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
                 podAnnotations={"a": "b"}, service={"type": "LoadBalancer", "port": 80},
                 auth={"apiKeySecretRef": {"name": "keys"}},
                 affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                     {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
                 monitoring={"serviceMonitor": {"labels": {"release": "kps"}, "interval": "15s"}}),
}


def all_objects(s: QwenDeploymentSpec) -> list[dict]:
    key = builders.model_key(s)
    objs = [builders.build_pvc(OWNER, s), builders.build_fetch_job(OWNER, s, DEFAULTS),
            builders.build_deployment(OWNER, s, DEFAULTS, key), builders.build_service(OWNER, s),
            builders.build_pdb(OWNER, s)]
    return [o for o in objs if o is not None]


# ---- the CRD -----------------------------------------------------------------------------------------


def test_crd_file_is_the_rendering_of_the_models():
    assert (ROOT / "crds" / "qwendeployments.yaml").read_text() == crd.render(), \
        "run `python -m qwen_operator.crd > crds/qwendeployments.yaml`"


def test_chart_crd_is_the_crd():
    assert (ROOT / "charts/qwen-operator/crds/qwendeployments.yaml").read_bytes() == \
        (ROOT / "crds/qwendeployments.yaml").read_bytes()


def _walk(model: type[BaseModel], schema: dict, path: str, seen: list[str]) -> None:
    props = schema["properties"]
    assert set(props) == {f.alias or n for n, f in model.model_fields.items()}, path
    for name, field in model.model_fields.items():
        alias = field.alias or name
        sub, here = props[alias], f"{path}.{alias}"
        seen.append(here)
        ann = field.annotation
        args = [a for a in typing.get_args(ann) if a is not type(None)] or [ann]
        inner = args[0]
        if typing.get_origin(inner) is typing.Literal:
            assert sub["enum"] == list(typing.get_args(inner)), here
        if field.default is not None and not callable(field.default) and field.default is not ... and \
                type(field.default).__name__ != "PydanticUndefinedType":
            assert sub.get("default") == field.default, here
        for meta in field.metadata:
            for attr, key in (("ge", "minimum"), ("le", "maximum"), ("gt", "minimum"), ("max_length", "maxLength"),
                              ("pattern", "pattern")):
                if getattr(meta, attr, None) is not None:
                    if key == "maxLength" and sub.get("type") == "array":
                        key = "maxItems"
                    assert sub[key] == getattr(meta, attr), (here, attr)
            if getattr(meta, "gt", None) is not None:
                assert sub.get("exclusiveMinimum") is True, here
        if field.is_required():
            assert alias in schema.get("required", []), here
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            _walk(inner, sub, here, seen)
        elif typing.get_origin(inner) is list:
            item = typing.get_args(inner)[0]
            assert sub["type"] == "array", here
            if isinstance(item, type) and issubclass(item, BaseModel):
                _walk(item, sub["items"], here + "[]", seen)


def test_crd_schema_agrees_with_the_pydantic_model_field_by_field():
    from qwen_operator.spec import QwenDeploymentStatus

    doc = yaml.safe_load((ROOT / "crds" / "qwendeployments.yaml").read_text())
    root = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    seen: list[str] = []
    _walk(QwenDeploymentSpec, root["spec"], "spec", seen)
    _walk(QwenDeploymentStatus, root["status"], "status", seen)
    assert len(seen) > 80
    assert "spec.monitoring.prometheusRule.thresholds.p99LatencySeconds" in seen


def test_crd_has_printer_columns_scale_and_status():
    doc = yaml.safe_load((ROOT / "crds" / "qwendeployments.yaml").read_text())
    v = doc["spec"]["versions"][0]
    names = [c["name"] for c in v["additionalPrinterColumns"] if not c.get("priority")]
    assert names == ["Model", "Device", "Replicas", "Ready", "Phase", "Age"]
    assert {c["name"] for c in v["additionalPrinterColumns"] if c.get("priority")} >= {"Endpoint"}
    assert v["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    assert "status" in v["subresources"]
    assert doc["spec"]["names"]["shortNames"] == ["qwd"]


# ---- objects are valid Kubernetes --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SPECS))
def test_built_objects_validate_against_kubernetes_schemas(name):
    for obj in all_objects(SPECS[name]):
        kubernetes_validate.validate(obj, K8S, strict=True)


def _prometheus_operator_schema(kind: str) -> dict:
    import subprocess

    r = subprocess.run([str(ROOT / "scripts" / "k8s-bin"), "crds"], capture_output=True, text=True, check=True)
    folder = Path(r.stdout.strip())
    doc = yaml.safe_load((folder / f"monitoring.coreos.com_{kind}.yaml").read_text())
    return doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_monitoring_objects_validate_against_the_prometheus_operator_crds(name):
    s = SPECS[name]
    sm, pr = builders.build_service_monitor(OWNER, s), builders.build_prometheus_rule(OWNER, s)
    # the CRDs carry Go regular expressions that Python cannot compile as a metaschema check: validate only
    for obj, kind in ((sm, "servicemonitors"), (pr, "prometheusrules")):
        schema = _prometheus_operator_schema(kind)
        jsonschema.Draft7Validator(schema).validate(obj)
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True


def test_disabled_monitoring_builds_nothing():
    s = spec(monitoring={"serviceMonitor": {"enabled": False}, "prometheusRule": {"enabled": False}})
    assert builders.build_service_monitor(OWNER, s) is None and builders.build_prometheus_rule(OWNER, s) is None


# ---- what the objects say ----------------------------------------------------------------------------


def server(dep: dict) -> dict:
    return dep["spec"]["template"]["spec"]["containers"][0]


def env(dep: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in server(dep)["env"]}


def test_labels_and_ownership():
    for obj in all_objects(SPECS["cpu"]):
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "qwen-inference"
        assert labels["app.kubernetes.io/instance"] == "chat"
        assert labels["app.kubernetes.io/managed-by"] == "qwen-operator"
        assert labels["app.kubernetes.io/component"] in ("cache", "fetch", "server", "monitoring")
        refs = obj["metadata"].get("ownerReferences")
        if obj["kind"] == "PersistentVolumeClaim":
            assert refs is None  # retained by default
        else:
            assert refs == [{"apiVersion": "qwen-operator.io/v1alpha1", "kind": "QwenDeployment", "name": "chat",
                             "uid": OWNER.uid, "controller": True, "blockOwnerDeletion": True}]
    unretained = spec(cache={"retainOnDelete": False})
    assert builders.build_pvc(OWNER, unretained)["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid


def test_pods_pass_restricted_pod_security():
    for s in SPECS.values():
        for obj in (builders.build_deployment(OWNER, s, DEFAULTS, builders.model_key(s)),
                    builders.build_fetch_job(OWNER, s, DEFAULTS)):
            pod = obj["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
            for c in pod["containers"]:
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
                assert sc["capabilities"]["drop"] == ["ALL"]
            assert all("hostPath" not in v for v in pod["volumes"])


def test_cpu_deployment():
    s = SPECS["cpu"]
    dep = builders.build_deployment(OWNER, s, DEFAULTS, builders.model_key(s))
    c = server(dep)
    e = env(dep)
    assert e["QWEN_MODEL"] == "/cache/Qwen--Qwen2.5-0.5B-Instruct/main"
    assert e["QWEN_DEVICE"] == "cpu" and e["HF_HUB_OFFLINE"] == "1"
    assert e["QWEN_THREADS"] == {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}}
    assert c["resources"]["limits"] == {"cpu": "2", "memory": "3Gi"}
    assert c["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["readinessProbe"]["httpGet"]["path"] == "/health" and c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 300
    assert {"name": "cache", "mountPath": "/cache", "readOnly": True} in c["volumeMounts"]
    assert dep["spec"]["strategy"] == {"type": "Recreate"}  # a ReadWriteOnce cache
    pod = dep["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > c["lifecycle"]["preStop"]["sleep"]["seconds"] + 25
    assert "affinity" not in pod


def test_the_pods_share_a_key_to_read_each_others_responses():
    """Every pod names itself to the others (its IP, from the downward API) and mounts the key they share, from
    a Secret made once with a random key, owned by the QwenDeployment."""
    s = SPECS["cpu"]
    dep = builders.build_deployment(OWNER, s, DEFAULTS, builders.model_key(s))
    e, pod = env(dep), dep["spec"]["template"]["spec"]
    assert e["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert e["QWEN_PEER_URL"] == "http://$(POD_IP):8000"
    names = [v["name"] for v in server(dep)["env"]]
    assert names.index("POD_IP") < names.index("QWEN_PEER_URL")  # $(POD_IP) refers to an earlier variable
    mount = next(m for m in server(dep)["volumeMounts"] if m["name"] == "peer-key")
    assert e["QWEN_PEER_KEY_FILE"] == mount["mountPath"] + "/key" and mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == "peer-key")
    secret = builders.build_peer_secret(OWNER, "k" * 43)
    assert volume["secret"]["secretName"] == secret["metadata"]["name"] == f"{OWNER.name}-peer-key"
    assert secret["stringData"] == {"key": "k" * 43} and secret["type"] == "Opaque"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid
    # the server accepts what the pod gets
    from qwen_inference.settings import setting_env_names

    assert {"QWEN_PEER_URL", "QWEN_PEER_KEY_FILE"} <= setting_env_names()


def test_multi_replica_placement_follows_the_access_mode():
    rwx = SPECS["cpu-rwx-3"]
    dep = builders.build_deployment(OWNER, rwx, DEFAULTS, builders.model_key(rwx))
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate"
    assert "affinity" not in dep["spec"]["template"]["spec"]
    rwo = spec(replicas=3)
    dep = builders.build_deployment(OWNER, rwo, DEFAULTS, builders.model_key(rwo))
    term = dep["spec"]["template"]["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert builders.build_pdb(OWNER, rwo)["spec"]["maxUnavailable"] == 1
    assert builders.build_pdb(OWNER, SPECS["cpu"]) is None


def test_gpu_deployment():
    s = SPECS["gpu-2"]
    dep = builders.build_deployment(OWNER, s, DEFAULTS, builders.model_key(s))
    c = server(dep)
    pod = dep["spec"]["template"]["spec"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert env(dep)["QWEN_DEVICE"] == "cuda"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"} in pod["tolerations"]
    dshm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert dshm["emptyDir"]["medium"] == "Memory"
    job_pod = builders.build_fetch_job(OWNER, s, DEFAULTS)["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in job_pod["tolerations"])  # fetched where it is served
    assert "nvidia.com/gpu" not in str(job_pod["containers"][0]["resources"])  # without taking a GPU
    gpu_image = OperatorDefaults(image="cpu:1", image_gpu="cuda:1")
    assert server(builders.build_deployment(OWNER, s, gpu_image, builders.model_key(s)))["image"] == "cuda:1"


def test_startup_budget_grows_with_the_model():
    small = sizing.startup_seconds("Qwen/Qwen2.5-0.5B-Instruct", "huggingface", "cpu", "auto")
    big = sizing.startup_seconds("Qwen/Qwen2.5-7B-Instruct", "huggingface", "cpu", "auto")
    gpu = sizing.startup_seconds("Qwen/Qwen2.5-7B-Instruct", "huggingface", "gpu", "auto")
    assert 300 <= small < gpu < big
    assert sizing.default_cache_size("Qwen/Qwen2.5-7B-Instruct", "huggingface") == "20Gi"
    assert sizing.default_cache_size("demo", "demo") == "1Gi"
    assert sizing.params_billions("Qwen/Qwen2.5-Coder-14B-Instruct", "huggingface") == 14.7
    assert sizing.params_billions("someone/mystery", "huggingface") == sizing.DEFAULT_PARAMS_B


def test_full_spec_reaches_the_pods():
    s = SPECS["full"]
    dep = builders.build_deployment(OWNER, s, DEFAULTS, builders.model_key(s))
    pod = dep["spec"]["template"]["spec"]
    e = env(dep)
    assert e["QWEN_SERVED_MODEL_NAME"] == "chat" and e["QWEN_MAX_CONCURRENCY"] == "8"
    assert e["QWEN_QUANTIZE"] == "int8" and env(builders.build_deployment(OWNER, SPECS["cpu"], DEFAULTS, builders.model_key(
        SPECS["cpu"])))["QWEN_QUANTIZE"] == "none"
    assert e["QWEN_THREADS"] == "3" and e["QWEN_MAX_MODEL_LEN"] == "4096" and e["QWEN_KV_CACHE_TOKENS"] == "32768"
    assert "QWEN_ROPE_SCALING" not in e  # the model's own rotary embedding, unless the spec scales it
    scaled = QwenDeploymentSpec.model_validate(
        {**s.model_dump(by_alias=True, exclude_none=True),
         "engine": {"ropeScaling": {"ropeType": "yarn", "factor": 4, "originalMaxPositionEmbeddings": 32768}}})
    assert json.loads(env(builders.build_deployment(OWNER, scaled, DEFAULTS, builders.model_key(scaled)))[
        "QWEN_ROPE_SCALING"]) == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert e["QWEN_API_KEY_FILE"] == "/etc/qwen/api-keys/api-keys"
    assert e["X"] == "1" and e["Y"] == {"secretKeyRef": {"name": "s", "key": "k"}}
    assert {"name": "api-keys", "secret": {"secretName": "keys"}} in pod["volumes"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}] and pod["nodeSelector"] == {"pool": "cpu"}
    assert pod["priorityClassName"] == "high" and "nodeAffinity" in pod["affinity"]
    assert dep["spec"]["template"]["metadata"]["annotations"]["a"] == "b"
    assert server(dep)["resources"] == {"requests": {"cpu": "2", "memory": "6Gi"}, "limits": {"cpu": "3", "memory": "6Gi"}}
    svc = builders.build_service(OWNER, s)
    assert svc["spec"]["type"] == "LoadBalancer" and svc["spec"]["ports"][0]["port"] == 80
    job = builders.build_fetch_job(OWNER, s, DEFAULTS)
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["args"] == ["download", "Qwen/Qwen2.5-1.5B-Instruct", "--cache-dir", "/cache", "--revision", "v1.0",
                         "--source", "huggingface", "--stall-timeout", "300"]
    jenv = {x["name"]: x.get("value", x.get("valueFrom")) for x in c["env"]}
    assert jenv["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert jenv["HF_ENDPOINT"] == jenv["MODELSCOPE_ENDPOINT"] == "https://hf-mirror.example"
    assert jenv["MODELSCOPE_API_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2, 3]
    sm = builders.build_service_monitor(OWNER, s)
    assert sm["metadata"]["labels"]["release"] == "kps" and sm["spec"]["endpoints"][0]["interval"] == "15s"
    assert builders.endpoint(OWNER, s) == "http://chat.team-a.svc:80/v1"


@pytest.mark.parametrize("name, args, path", [
    ("demo", ["make-demo", "--cache-dir", "/cache"], "/cache/demo"),
    ("pvc", ["verify", "/cache/a/b"], "/cache/a/b"),
    ("cpu", ["download", "Qwen/Qwen2.5-0.5B-Instruct", "--cache-dir", "/cache", "--revision", "main",
             "--source", "huggingface", "--stall-timeout", "300"], "/cache/Qwen--Qwen2.5-0.5B-Instruct/main"),
])
def test_fetch_jobs_and_model_paths(name, args, path):
    s = SPECS[name]
    job = builders.build_fetch_job(OWNER, s, DEFAULTS)
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == args
    assert builders.model_path(builders.model_key(s)) == path
    assert len(job["metadata"]["name"]) <= 63


def test_existing_claim_makes_no_pvc():
    s = SPECS["pvc"]
    assert builders.build_pvc(OWNER, s) is None
    assert builders.claim_name(OWNER, s) == "models"


def test_a_new_model_changes_nothing_in_the_pods_until_it_is_served():
    old = spec(model={"name": "Qwen/Qwen2.5-0.5B-Instruct"})
    new = spec(model={"name": "Qwen/Qwen2.5-7B-Instruct"})
    key = builders.model_key(old)
    a = builders.build_deployment(OWNER, old, DEFAULTS, key)
    b = builders.build_deployment(OWNER, new, DEFAULTS, key)  # still serving the old key
    assert a == b
    c = builders.build_deployment(OWNER, new, DEFAULTS, builders.model_key(new))
    assert c["spec"]["template"]["metadata"]["annotations"] != a["spec"]["template"]["metadata"]["annotations"]
    assert env(c)["QWEN_SERVED_MODEL_NAME"] == "Qwen/Qwen2.5-7B-Instruct"
    assert builders.job_name(OWNER, builders.model_key(old)) != builders.job_name(OWNER, builders.model_key(new))


def test_semantic_checks():
    assert check_semantics(SPECS["full"]) == []
    bad = spec(resources={"requests": {"memory": "8Gi"}, "limits": {"memory": "4Gi"}})
    assert check_semantics(bad) == ["resources.requests.memory (8Gi) is more than resources.limits.memory (4Gi)"]
    bad = spec(engine={"maxModelLen": 4096, "kvCacheTokens": 1024})
    assert "cannot hold one sequence" in check_semantics(bad)[0]
    bad = spec(device="gpu", gpus=2, resources={"limits": {"nvidia.com/gpu": 1}})
    assert "disagrees with gpus" in check_semantics(bad)[0]


@pytest.mark.parametrize("q, value", [("1Gi", 2**30), ("500m", 0.5), ("2", 2), (3, 3), ("1.5G", 1.5e9), ("1e3", 1000)])
def test_quantities(q, value):
    assert parse_quantity(q) == pytest.approx(value)
    with pytest.raises(ValueError):
        parse_quantity("ten")


def test_sizing_knows_each_generation_by_name():
    """Qwen3.5-4B is not Qwen3-4B: sizes are looked up per generation, and the hybrid models' recurrent
    state for every slot is part of the pod's memory."""
    assert sizing.generation("Qwen/Qwen3.5-2B") == "qwen3.5" and sizing.generation("Qwen/Qwen3.6-27B") == "qwen3.5"
    assert sizing.generation("Qwen/Qwen3-4B-Instruct-2507") == "qwen3"
    assert sizing.generation("Qwen/Qwen2.5-0.5B-Instruct") == "qwen2.5" and sizing.generation("x/llama") is None
    q35 = sizing.model_size("Qwen/Qwen3.5-4B", "huggingface")
    q3 = sizing.model_size("Qwen/Qwen3-4B", "huggingface")
    assert q35.params_b != q3.params_b and q35.state_mib_per_sequence > 0 and q3.state_mib_per_sequence == 0
    assert q35.checkpoint_params_b > q35.params_b  # the vision tower is cached, never loaded
    # the 2B's cache holds its whole checkpoint (4.5 GB in bf16) with room to spare
    assert sizing.default_cache_size("Qwen/Qwen3.5-2B", "huggingface") == "7Gi"
    few = sizing.default_resources("Qwen/Qwen3.5-2B", "huggingface", "cpu", "bfloat16", 0, max_concurrency=1)
    many = sizing.default_resources("Qwen/Qwen3.5-2B", "huggingface", "cpu", "bfloat16", 0, max_concurrency=64)
    assert int(many["limits"]["memory"][:-2]) - int(few["limits"]["memory"][:-2]) == 1  # 63 x 19.3 MiB
    dense = sizing.default_resources("Qwen/Qwen3-1.7B", "huggingface", "cpu", "bfloat16", 0, max_concurrency=64)
    assert dense == sizing.default_resources("Qwen/Qwen3-1.7B", "huggingface", "cpu", "bfloat16", 0, 1)
    assert sizing.startup_seconds("Qwen/Qwen3.5-9B", "huggingface", "cpu", "auto") > \
        sizing.startup_seconds("Qwen/Qwen3.5-0.8B", "huggingface", "cpu", "auto")


def test_the_server_keeps_why_it_exited():
    from qwen_operator.builders import OperatorDefaults, Owner, build_deployment, model_key
    from qwen_operator.spec import QwenDeploymentSpec

    spec = QwenDeploymentSpec.model_validate({"model": {"name": "demo", "source": "demo"}})
    dep = build_deployment(Owner("d", "ns", "u"), spec, OperatorDefaults(), model_key(spec))
    assert dep["spec"]["template"]["spec"]["containers"][0]["terminationMessagePolicy"] == "FallbackToLogsOnError"

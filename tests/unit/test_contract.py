"""The contract between the operator and the inference programs (qwen_inference/contract.py), checked from
both sides: what the operator writes is what qwen-serve and qwen-model read, and the other way round."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from qwen_inference import contract
from qwen_inference.cli import ModelCLI, model_main, serve_main
from qwen_inference.contract import ModelKey, ServerEnv, TerminationMessage
from qwen_inference.modelcache import folder_bytes, model_path
from qwen_inference.settings import ServeSettings, setting_env_names, unknown_env
from qwen_operator import builders, status
from qwen_operator.builders import OperatorDefaults, Owner
from qwen_operator.spec import QwenDeploymentSpec

ROOT = Path(__file__).resolve().parents[2]
OWNER = Owner("chat", "team-a", "0c7f6a1e-1111-2222-3333-444455556666")
DEFAULTS = OperatorDefaults(image="registry.example/qwen-inference:1")

SPECS = [
    {"model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"}},
    {"model": {"name": "demo", "source": "demo"}},
    {"model": {"name": "m", "source": "pvc", "path": "a/b"}, "cache": {"existingClaim": "models"}},
    {"model": {"name": "Qwen/Qwen2.5-7B-Instruct", "source": "modelscope", "revision": "v1.0",
               "servedModelName": "chat"},
     "device": "gpu", "gpus": 2, "dtype": "bfloat16",
     "engine": {"maxConcurrency": 8, "maxQueue": 3, "threads": 3, "maxModelLen": 4096, "kvCacheTokens": 32768,
                "ropeScaling": {"ropeType": "yarn", "factor": 4, "originalMaxPositionEmbeddings": 32768},
                "maxTokens": 100, "requestTimeoutSeconds": 60},
     "auth": {"apiKeySecretRef": {"name": "keys"}}},
    {"model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"}, "engine": {"quantize": "int8"}},
]


def server_env(raw: dict) -> list[dict]:
    spec = QwenDeploymentSpec.model_validate(raw)
    dep = builders.build_deployment(OWNER, spec, DEFAULTS, builders.model_key(spec))
    return dep["spec"]["template"]["spec"]["containers"][0]["env"]


# ---- environment ------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", SPECS)
def test_every_qwen_variable_the_operator_writes_is_a_server_setting(raw):
    written = {e["name"] for e in server_env(raw) if e["name"].startswith("QWEN_")}
    assert written <= ServerEnv.names()
    assert not written - setting_env_names(), f"not qwen-serve settings: {written - setting_env_names()}"


def test_the_contract_names_only_server_settings():
    assert ServerEnv.names() <= setting_env_names(), ServerEnv.names() - setting_env_names()
    for name in ServerEnv.names():
        assert name == contract.env_name(name.removeprefix("QWEN_").lower())


def test_the_pod_environment_configures_the_server_as_the_spec_says(monkeypatch, tmp_path):
    """The values, not just the names: the env of a pod, read by the real settings object."""
    for name in list(os.environ):
        if name.upper().startswith("QWEN_"):
            monkeypatch.delenv(name)
    keys = tmp_path / "api-keys"
    keys.write_text("k1\n")
    peer_key = tmp_path / "peer-key"
    peer_key.write_text("a" * 43)
    for e in server_env(SPECS[3]):
        if "value" in e:
            value = e["value"]
            if e["name"] == ServerEnv.API_KEY_FILE:
                assert value == "/etc/qwen/api-keys/api-keys"  # the Secret's mount; here a local copy
                value = str(keys)
            if e["name"] == ServerEnv.PEER_KEY_FILE:
                assert value == f"{builders.PEER_KEY_MOUNT}/key"  # the peer-key Secret's mount; here a local copy
                value = str(peer_key)
            monkeypatch.setenv(e["name"], value.replace("$(POD_IP)", "10.1.2.3"))  # as the kubelet expands it
    s = ServeSettings()
    assert (s.model, s.model_name, s.device, s.dtype) == ("/cache/Qwen--Qwen2.5-7B-Instruct/v1.0", "chat", "cuda",
                                                          "bfloat16")
    assert (s.max_concurrency, s.max_queue, s.threads, s.max_model_len, s.kv_cache_tokens) == (8, 3, 3, 4096, 32768)
    assert (s.max_tokens_cap, s.request_timeout, s.host, s.port) == (100, 60.0, "0.0.0.0", builders.SERVER_PORT)
    assert s.rope_scaling.parameters() == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert s.api_keys() == ["k1"]
    assert (s.peer_url, s.peer_key()) == (f"http://10.1.2.3:{builders.SERVER_PORT}", b"a" * 43)


def test_unknown_qwen_variables_are_refused_with_the_closest_name(monkeypatch, capsys):
    monkeypatch.setenv("QWEN_MAX_QUEUES", "3")
    with pytest.raises(ValidationError) as exc:
        ServeSettings()
    assert "QWEN_MAX_QUEUES is not a qwen-serve setting; did you mean QWEN_MAX_QUEUE?" in str(exc.value)
    assert serve_main(["--port", "0"]) == contract.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("qwen-serve: the environment variable QWEN_MAX_QUEUES") and "QWEN_MAX_QUEUE?" in err
    # case does not matter to the settings, so not to the check either; a name like nothing gets a pointer
    assert unknown_env({"qwen_dtpye": "x", "QWEN_ZZZZZZZZ": "1", "HOME": "/", "QWENX": "1"}) == [
        "the environment variable QWEN_ZZZZZZZZ is not a qwen-serve setting (qwen-serve --help lists the "
        "settings; --max-queue, say, is QWEN_MAX_QUEUE)",
        "the environment variable qwen_dtpye is not a qwen-serve setting; did you mean QWEN_DTYPE?",
    ]


def test_names_of_the_other_programs_pass():
    env = {"QWEN_MODEL_CACHE_DIR": "/c", "QWEN_TERMINATION_LOG": "/t", "QWEN_SOAK": "long",
           "QWEN_OPERATOR_NAMESPACES": "a", "QWEN_BENCH_LEVELS": "1", "QWEN_K8S_VERSION": "v1",
           "QWEN_MODEL_DOWNLOAD": "{}", "QWEN_DEV_CLUSTER_STATE": "/s"}
    assert unknown_env(env) == []


def test_the_allowed_names_are_the_ones_the_programs_read():
    """Each name let through is read somewhere, and qwen-model's are its subcommands."""
    from qwen_inference.bench.cli import BenchSettings
    from qwen_operator.settings import OperatorSettings

    assert {n for n in contract.OTHER_ENV if n.startswith("QWEN_MODEL_")} == {
        ModelCLI.model_config["env_prefix"] + f.upper() for f in ModelCLI.model_fields}
    assert set(contract.OTHER_ENV_PREFIXES) == {OperatorSettings.model_config["env_prefix"],
                                                BenchSettings.model_config["env_prefix"]}
    assert "os.environ.get(TERMINATION_LOG_ENV" in (ROOT / "inference/qwen_inference/cli.py").read_text()
    scripts = "".join((ROOT / p).read_text() for p in ("scripts/k8s-bin", "scripts/devcluster.py", "tests/conftest.py",
                                                        "tests/server/test_soak.py", "tests/e2e/kind.sh",
                                                        "tests/cluster/test_keda.py", "scripts/nodeagent/network.py",
                                                        "inference/qwen_inference/engine/kernels/__init__.py"))
    for name in contract.OTHER_ENV - {contract.TERMINATION_LOG_ENV}:
        assert name.startswith("QWEN_MODEL_") or name in scripts, name


def test_every_qwen_variable_named_in_the_project_passes_the_server():
    """A QWEN_* variable a script, chart, test or doc sets or reads must not stop qwen-serve from starting
    when it leaks into its environment."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    constants = set()
    named = set()
    for rel in files:
        path = ROOT / rel
        if path.suffix not in ("", ".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".json", ".tpl", ".txt") \
                and path.name != "Makefile" or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        named |= set(re.findall(r"\bQWEN_[A-Z0-9_]*[A-Z0-9]\b", text))
        constants |= set(re.findall(r"^\s*(QWEN_[A-Z0-9_]+)\s*[:=]", text, re.M)) if path.suffix == ".py" else set()
    named -= constants  # Python constants (QWEN_DEFAULT_SYSTEM_PROMPT), not variables
    assert "QWEN_MAX_QUEUE" in named and "QWEN_SOAK" in named  # the scan sees code and Makefile
    problems = unknown_env({n: "" for n in named if not n.startswith(contract.OTHER_ENV_PREFIXES)})
    # the only unknown names are the misspellings the tests use on purpose
    assert all(re.search(r"QWEN_(MAX_QUEUES|ZZZZZZZZ)\b", p) for p in problems), problems


def test_the_operator_imports_the_contract_without_the_server():
    """The operator image has no torch or fastapi: nothing it imports may pull them in."""
    code = ("import sys, qwen_inference.contract, qwen_operator.builders, qwen_operator.status, "
            "qwen_operator.controller, qwen_operator.handlers, qwen_operator.main, qwen_operator.crd; "
            "print(sorted(m for m in ('torch', 'fastapi', 'transformers', 'starlette', 'uvicorn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ---- exit codes -------------------------------------------------------------------------------------


def test_the_fetch_job_fails_at_once_exactly_on_the_codes_qwen_model_gives_for_good(tmp_path):
    job = builders.build_fetch_job(OWNER, QwenDeploymentSpec.model_validate(SPECS[0]), DEFAULTS)
    (rule,) = job["spec"]["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["operator"] == "In"
    assert rule["onExitCodes"]["values"] == [contract.EXIT_USAGE, contract.EXIT_PERMANENT] == [2, 3]
    assert contract.EXIT_FAILED not in rule["onExitCodes"]["values"]
    assert contract.EXIT_STALLED not in rule["onExitCodes"]["values"]
    assert model_main(["verify", str(tmp_path)]) == contract.EXIT_PERMANENT  # an empty folder is broken for good


# ---- the termination message ------------------------------------------------------------------------


def test_what_qwen_model_leaves_is_what_the_status_reads(tiny_model, tmp_path, monkeypatch):
    log = tmp_path / "termination-log"
    log.write_text("")
    monkeypatch.setenv(contract.TERMINATION_LOG_ENV, str(log))
    assert model_main(["verify", str(tiny_model)]) == contract.EXIT_OK
    text = log.read_text()
    assert TerminationMessage.parse(text) == TerminationMessage(path=str(tiny_model),
                                                                bytes=folder_bytes(tiny_model))
    pod = {"status": {"phase": "Succeeded", "containerStatuses": [{"state": {"terminated": {
        "exitCode": 0, "reason": "Completed", "message": text}}}]}}
    assert status.cached_bytes([pod]) == folder_bytes(tiny_model) > 0


@pytest.mark.parametrize("text", [None, "", "ok: /cache/x", '{"path": "/x"}', '{"path": "/x", "bytes": -1}',
                                  '["path"]', '{"path": "/x", "bytes": "many"}'])
def test_anything_else_in_a_termination_message_is_no_size(text):
    assert TerminationMessage.parse(text) is None
    pod = {"status": {"containerStatuses": [{"state": {"terminated": {"exitCode": 0, "message": text}}}]}}
    assert status.cached_bytes([pod]) is None


def test_a_termination_message_fits_what_the_kubelet_keeps():
    with pytest.raises(ValueError, match="4096"):
        TerminationMessage(path="x" * 5000, bytes=1).dumps()


# ---- the model key ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key,text,folder,words", [
    (ModelKey.hub("huggingface", "Qwen/Qwen2.5-0.5B-Instruct", "main"), "huggingface:Qwen/Qwen2.5-0.5B-Instruct@main",
     "Qwen--Qwen2.5-0.5B-Instruct/main", "Qwen/Qwen2.5-0.5B-Instruct@main from huggingface"),
    (ModelKey.hub("modelscope", "Qwen/Qwen3-8B", "refs/pr/1"), "modelscope:Qwen/Qwen3-8B@refs/pr/1",
     "Qwen--Qwen3-8B/refs--pr--1", "Qwen/Qwen3-8B@refs/pr/1 from modelscope"),
    (ModelKey.pvc("models/q7"), "pvc:models/q7", "models/q7", "the model at models/q7 in the volume"),
    (ModelKey.demo(), "demo", "demo", "the demo model"),
])
def test_model_keys_round_trip(key, text, folder, words):
    assert str(key) == text and ModelKey.parse(text) == key
    assert key.folder() == folder and key.describe() == words
    if key.is_hub:  # the operator serves a hub model from where qwen-model download puts it
        assert str(model_path(Path("/cache"), key.name, key.revision)) == builders.model_path(key)


@pytest.mark.parametrize("text", ["", "huggingface:Qwen/X", "huggingface:@main", "hf:Qwen/X@main", "pvc:",
                                  "demo:demo", "Qwen/X@main", "huggingface:Qwen/X@main@v2", "pvc"])
def test_malformed_model_keys_are_refused(text):
    with pytest.raises(ValueError):
        ModelKey.parse(text)


def test_model_keys_are_built_once_from_the_spec():
    keys = [builders.model_key(QwenDeploymentSpec.model_validate(raw)) for raw in SPECS]
    assert [str(k) for k in keys] == ["huggingface:Qwen/Qwen2.5-0.5B-Instruct@main", "demo", "pvc:a/b",
                                      "modelscope:Qwen/Qwen2.5-7B-Instruct@v1.0",
                                      "huggingface:Qwen/Qwen2.5-0.5B-Instruct@main"]
    with pytest.raises(ValueError):
        ModelKey("pvc", "a", "main")
    with pytest.raises(ValueError):
        ModelKey.hub("pvc", "a", "main")


def test_an_unreadable_serving_annotation_serves_nothing():
    dep = {"metadata": {"annotations": {builders.ANNOTATION_MODEL_KEY: "edited by hand"}}}
    assert status.serving_key(dep) is None
    dep["metadata"]["annotations"][builders.ANNOTATION_MODEL_KEY] = "demo"
    assert status.serving_key(dep) == ModelKey.demo()
    assert status.serving_key(None) is None

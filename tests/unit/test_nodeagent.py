"""The process-node agent's pure parts: what a pod spec means (env, downward API, commands, users, restarts,
termination messages) and which program an image runs. The agent itself runs pods in tests/cluster."""

from __future__ import annotations

import base64
import sys

import pytest

from ..conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from nodeagent import images, podspec  # noqa: E402

POD = {
    "metadata": {"name": "web-1", "namespace": "team", "uid": "u-1", "labels": {"app": "web"},
                 "annotations": {"note": "hi"}},
    "spec": {"nodeName": "process-node-1", "serviceAccountName": "runner",
             "containers": [{"name": "main", "resources": {"limits": {"cpu": "1500m", "memory": "1Gi"},
                                                           "requests": {"cpu": "250m"}}},
                            {"name": "side"}]},
    "status": {"podIP": "10.200.1.7", "podIPs": [{"ip": "10.200.1.7"}], "hostIP": "10.200.0.1"},
}
SECRET = {"kind": "Secret", "metadata": {"name": "creds", "namespace": "team"},
          "data": {"token": base64.b64encode(b"s3cret").decode()}}
CONFIG = {"kind": "ConfigMap", "metadata": {"name": "cfg", "namespace": "team"}, "data": {"mode": "fast", "n": "3"}}


def lookup(kind, name):
    return {("Secret", "creds"): SECRET, ("ConfigMap", "cfg"): CONFIG}.get((kind, name))


def env_of(container, image_env=None):
    return podspec.container_env(POD, container, image_env or {"PATH": "/venv/bin", "HOME": "/root"}, lookup,
                                 {"cpu": "2", "memory": "8Gi"})


def test_env_sources_in_order_with_expansion():
    c = {"name": "main", "resources": POD["spec"]["containers"][0]["resources"],
         "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
         "env": [
             {"name": "HOME", "value": "/tmp"},
             {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
             {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}},
             {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
             {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
             {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
             {"name": "THREADS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}}},
             {"name": "MILLI", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1m"}}},
             {"name": "MEM_MI", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
             {"name": "URL", "value": "http://$(IP):8000/$(MODE)/$(UNDEFINED)/$$(IP)"},
             {"name": "MISSING_OK", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "x", "optional": True}}},
         ]}
    env = env_of(c)
    assert env["PATH"] == "/venv/bin" and env["HOME"] == "/tmp" and env["HOSTNAME"] == "web-1"
    assert env["CFG_mode"] == "fast" and env["CFG_n"] == "3"
    assert env["TOKEN"] == "s3cret" and env["MODE"] == "fast" and env["POD"] == "web-1"
    assert env["IP"] == "10.200.1.7" and env["APP"] == "web"
    assert env["THREADS"] == "2"  # 1500m rounded up, as the downward API does
    assert env["MILLI"] == "250" and env["MEM_MI"] == "1024"
    assert env["URL"] == "http://10.200.1.7:8000/fast/$(UNDEFINED)/$(IP)"
    assert "MISSING_OK" not in env


def test_cpu_limit_defaults_to_node_allocatable():
    env = env_of({"name": "side", "env": [
        {"name": "T", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
        {"name": "OTHER", "valueFrom": {"resourceFieldRef": {"containerName": "main", "resource": "limits.memory",
                                                             "divisor": "1Gi"}}}]})
    assert env["T"] == "2" and env["OTHER"] == "1"


@pytest.mark.parametrize("var, message", [
    ({"name": "X", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "token"}}}, 'secret "nope" not found'),
    ({"name": "X", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "other"}}},
     "couldn't find key other in Secret team/creds"),
    ({"name": "X", "valueFrom": {"configMapKeyRef": {"name": "gone", "key": "a"}}}, 'configmap "gone" not found'),
    ({"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.nothing"}}}, "fieldRef 'spec.nothing'"),
    ({"name": "X", "valueFrom": {"resourceFieldRef": {"resource": "limits.gpu"}}}, "resourceFieldRef 'limits.gpu'"),
])
def test_env_errors_are_create_container_config_errors(var, message):
    with pytest.raises(podspec.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        env_of({"name": "main", "env": [var]})


def test_command_line_follows_entrypoint_and_cmd_rules():
    env = {"MODEL": "/cache/demo"}
    assert podspec.command_line({}, ["qwen-serve"], ["--help"], env) == ["qwen-serve", "--help"]
    assert podspec.command_line({"args": ["--model", "$(MODEL)"]}, ["qwen-serve"], ["--help"], env) == \
        ["qwen-serve", "--model", "/cache/demo"]
    assert podspec.command_line({"command": ["qwen-model"], "args": ["verify", "$(MODEL)"]}, ["qwen-serve"],
                                ["--help"], env) == ["qwen-model", "verify", "/cache/demo"]
    assert podspec.command_line({"command": ["python"]}, ["qwen-serve"], ["--help"], env) == ["python"]


def test_users_groups_and_ports():
    pod = {"spec": {"securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 2000,
                                        "supplementalGroups": [3000]}}}
    assert podspec.user_of(pod, {}, "0:0") == (1000, 1000, [2000, 3000])
    assert podspec.user_of(pod, {"securityContext": {"runAsUser": 5}}, None)[0] == 5
    assert podspec.user_of({"spec": {}}, {}, "1000:1000") == (1000, 1000, [])
    with pytest.raises(podspec.ConfigError, match="runAsNonRoot and image will run as root"):
        podspec.user_of({"spec": {"securityContext": {"runAsNonRoot": True}}}, {}, None)
    c = {"name": "server", "ports": [{"name": "http", "containerPort": 8000}]}
    assert podspec.probe_port(c, "http") == 8000 and podspec.probe_port(c, 9000) == 9000
    with pytest.raises(podspec.ConfigError, match="not a port"):
        podspec.probe_port(c, "metrics")


def test_restart_rules_backoff_and_phase():
    assert [podspec.backoff_seconds(n) for n in (1, 2, 3, 4, 9, 20)] == [0, 10, 20, 40, 300, 300]
    assert podspec.should_restart("Always", 0) and podspec.should_restart("OnFailure", 1)
    assert not podspec.should_restart("OnFailure", 0) and not podspec.should_restart("Never", 1)
    assert podspec.pod_phase("Never", ["terminated"], [0], [False]) == "Succeeded"
    assert podspec.pod_phase("Never", ["terminated", "terminated"], [0, 2], [False, False]) == "Failed"
    assert podspec.pod_phase("Always", ["waiting"], [1], [True]) == "Running"  # crash loop
    assert podspec.pod_phase("Always", ["waiting"], [None], [False]) == "Pending"  # never started


def test_termination_message_file_or_log_tail():
    log = "".join(f"line {i}\n" for i in range(200))
    assert podspec.termination_message("from the file", log, "FallbackToLogsOnError", 1) == "from the file"
    tail = podspec.termination_message("", log, "FallbackToLogsOnError", 1)
    assert tail.endswith("line 199\n") and tail.count("\n") == 80
    assert podspec.termination_message("", log, "File", 1) == ""
    assert podspec.termination_message("", log, "FallbackToLogsOnError", 0) == ""
    assert len(podspec.termination_message("x" * 10000, "", "File", 1)) == 4096


def test_the_project_images_map_to_their_entrypoints():
    imgs = images.load_images()
    assert set(imgs) == {"qwen-inference", "qwen-operator"}
    inf = images.resolve(imgs, "ghcr.io/qwen-operator/qwen-inference:0.1.0")
    assert inf.entrypoint == ["qwen-serve"] and inf.workdir == "/app" and inf.user == "1000:1000"
    assert inf.env["QWEN_PORT"] == "8000" and inf.env["PYTHONUNBUFFERED"] == "1"  # from the base stage
    assert inf.env["PATH"].startswith(str(ROOT / ".venv" / "bin"))
    assert images.resolve(imgs, "qwen-operator@sha256:abc").entrypoint == ["qwen-operator"]
    assert images.resolve(imgs, "localhost:5000/x/qwen-inference").name == "Dockerfile.inference"
    with pytest.raises(images.ImageError, match='image "busybox:1.36" is not available on a process node'):
        images.resolve(imgs, "busybox:1.36")


def test_dockerfile_parsing_follows_stages_args_and_shell_form():
    text = """ARG T=cpu
FROM python AS base
ENV A=1 \\
    B="two words"
FROM base AS flavour-cpu
ENV C=3
FROM flavour-${T} AS final
WORKDIR /srv
USER 7
CMD run --fast
"""
    img = images.parse_dockerfile("x", text, "/v/bin")
    assert img.env["A"] == "1" and img.env["B"] == "two words" and img.env["C"] == "3"
    assert img.workdir == "/srv" and img.user == "7" and img.entrypoint == []
    assert img.cmd == ["/bin/sh", "-c", "run --fast"]

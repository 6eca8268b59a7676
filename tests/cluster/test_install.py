"""The Helm chart against the real API server: lint, server-side dry run, install, and the CRD it carries."""

from __future__ import annotations

import json
import subprocess

from ..conftest import ROOT
from .conftest import OPERATOR_NS, RELEASE, render_chart

CHART = ROOT / "charts" / "qwen-operator"


def helm(cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(cluster.bins / "helm"), "--kubeconfig", str(cluster.dc.kubeconfig_path), *args],
                       capture_output=True, text=True, timeout=180)
    if check and r.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)}: {r.stderr}")
    return r


def test_helm_lint(cluster):
    r = helm(cluster, "lint", str(CHART), "--strict", "--kube-version", "1.37.2")
    assert "0 chart(s) failed" in r.stdout


def test_chart_renders_and_the_api_server_accepts_it(cluster):
    for sets in ([], ["watchNamespaces={team-a,team-b}", "networkPolicy.enabled=true",
                      "metrics.serviceMonitor.enabled=true", "qwenDeployments[0].name=demo",
                      "qwenDeployments[0].spec.model.name=demo", "qwenDeployments[0].spec.model.source=demo"]):
        docs = render_chart(cluster, *sets)
        kinds = {d["kind"] for d in docs}
        assert {"Deployment", "ServiceAccount", "Service", "ConfigMap", "CustomResourceDefinition"} <= kinds
        for ns in ("team-a", "team-b"):
            cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NS}})
        text = "\n---\n".join(json.dumps(d) for d in docs if d["kind"] != "CustomResourceDefinition")
        r = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=text, check=False)
        assert r.returncode == 0, r.stderr


def test_namespaced_mode_uses_roles_not_a_cluster_role():
    from .conftest import Cluster  # noqa: F401  (the chart renders without a cluster)

    import yaml

    out = subprocess.run([str(ROOT / "scripts" / "k8s-bin"), "dir"], capture_output=True, text=True, check=True)
    helm_bin = out.stdout.strip() + "/helm"
    r = subprocess.run([helm_bin, "template", "x", str(CHART), "--kube-version", "1.37.2",
                        "--set", "watchNamespaces={a,b}"], capture_output=True, text=True, check=True)
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    roles = [d for d in docs if d["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["a", "b"]
    cluster_roles = [d for d in docs if d["kind"] == "ClusterRole"]
    assert [c["metadata"]["name"] for c in cluster_roles] == ["x-qwen-operator-discovery"]
    assert all(rule["resources"] == ["customresourcedefinitions"] for rule in cluster_roles[0]["rules"])
    dep = next(d for d in docs if d["kind"] == "Deployment")
    env = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["QWEN_OPERATOR_NAMESPACES"] == "a,b"


def test_helm_is_a_release_build_that_assumes_a_current_kubernetes():
    """scripts/k8s-bin builds helm with the version flags of helm's own Makefile: it reports its release and,
    without a cluster, a current Kubernetes, so the chart's `kubeVersion: >=1.30.0-0` holds for `helm template`."""
    out = subprocess.run([str(ROOT / "scripts" / "k8s-bin"), "dir"], capture_output=True, text=True, check=True)
    helm_bin = out.stdout.strip() + "/helm"
    version = subprocess.run([helm_bin, "version", "--template", "{{.Version}}"], capture_output=True, text=True,
                             check=True).stdout
    pinned = next(line.split(":-")[1].rstrip("}") for line in (ROOT / "scripts" / "k8s-bin").read_text().splitlines()
                  if line.startswith("HELM_VERSION="))
    assert version == pinned
    r = subprocess.run([helm_bin, "template", "x", str(CHART)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "kind: Deployment" in r.stdout


def test_install_bundle_is_accepted_by_the_api_server(cluster):
    r = cluster.kubectl("apply", "--server-side", "--dry-run=server", "--force-conflicts", "-f",
                        str(ROOT / "manifests" / "install.yaml"), check=False)
    assert r.returncode == 0, r.stderr
    assert "customresourcedefinition.apiextensions.k8s.io/qwendeployments.qwen-operator.io" in r.stdout


def test_helm_install_brings_up_a_model(cluster):
    ns = cluster.namespace("helm")
    helm(cluster, "install", "qwen-install", str(CHART), "--namespace", ns, "--wait", "--timeout", "120s",
         "--set", "qwenDeployments[0].name=demo", "--set", "qwenDeployments[0].spec.model.name=demo",
         "--set", "qwenDeployments[0].spec.model.source=demo", "--set", "watchNamespaces={" + ns + "}")
    dep = cluster.get("deployment", "qwen-install-qwen-operator", ns)
    assert dep["status"]["readyReplicas"] == 1
    assert cluster.qwd("demo", ns) is not None
    cm = cluster.get("configmaps", namespace=ns, selector="grafana_dashboard=1")
    assert len(cm) == 1 and any(k.endswith(".json") for k in cm[0]["data"])
    r = helm(cluster, "list", "-n", ns, "-o", "json")
    assert json.loads(r.stdout)[0]["status"] == "deployed"
    helm(cluster, "uninstall", "qwen-install", "-n", ns, "--wait")
    assert cluster.get("deployment", "qwen-install-qwen-operator", ns) is None


def test_bad_values_fail_with_a_clear_message(cluster):
    r = helm(cluster, "template", "x", str(CHART), "--kube-version", "1.37.2", "--set", "logLevel=loud", check=False)
    assert r.returncode != 0 and "logLevel" in r.stderr
    r = helm(cluster, "template", "x", str(CHART), "--kube-version", "1.37.2", "--set", "resyncSeconds=-1",
             check=False)
    assert r.returncode != 0 and "resyncSeconds" in r.stderr
    r = helm(cluster, "template", "x", str(CHART), "--kube-version", "1.37.2",
             "--set", "qwenDeployments[0].spec.model.name=demo", check=False)
    assert r.returncode != 0 and "name" in r.stderr
    r = helm(cluster, "template", "x", str(CHART), "--kube-version", "1.37.2",
             "--set", "autoscaling.prometheusAddress=prometheus:9090", check=False)
    assert r.returncode != 0 and "prometheusAddress" in r.stderr


def test_autoscaling_values_reach_the_operator(cluster):
    docs = render_chart(cluster, "autoscaling.prometheusAddress=http://prometheus-operated.monitoring.svc:9090",
                        "autoscaling.httpAddOn.scalerAddress=scaler.keda-system:9090", "clusterDomain=example.org")
    dep = next(d for d in docs if d["kind"] == "Deployment")
    env = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["QWEN_OPERATOR_PROMETHEUS_ADDRESS"] == "http://prometheus-operated.monitoring.svc:9090"
    assert env["QWEN_OPERATOR_KEDA_HTTP_SCALER_ADDRESS"] == "scaler.keda-system:9090"
    assert env["QWEN_OPERATOR_KEDA_HTTP_INTERCEPTOR_HOST"] == "keda-add-ons-http-interceptor-proxy.keda.svc.cluster.local"
    assert env["QWEN_OPERATOR_CLUSTER_DOMAIN"] == "example.org"
    # and the operator's settings take them
    from qwen_operator.settings import OperatorSettings

    s = OperatorSettings(**{k.removeprefix("QWEN_OPERATOR_").lower(): v for k, v in env.items()
                            if k.startswith("QWEN_OPERATOR_") and k != "QWEN_OPERATOR_NAMESPACES"})
    assert s.prometheus_address.startswith("http://prometheus-operated") and s.keda_http_interceptor_port == 8080
    default = {e["name"] for e in next(d for d in render_chart(cluster) if d["kind"] == "Deployment")
               ["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "QWEN_OPERATOR_PROMETHEUS_ADDRESS" not in default


def test_release_name_matches_the_fixture():
    assert RELEASE == "qwen"

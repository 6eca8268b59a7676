"""A real Prometheus scrapes a live qwen-serve on loopback while traffic (with failures) flows: every metric
the rules and the dashboard use exists with the expected labels, every dashboard query parses and returns
data, and the error-rate alert (with its `for` shortened in a test copy) goes to firing."""

from __future__ import annotations

import re
import subprocess
import threading
import time

import httpx
import pytest
import yaml

from qwen_operator import dashboard
from qwen_operator.rules import prometheus_rule_groups
from qwen_operator.spec import Thresholds

from ..conftest import free_port, running_server
from .conftest import tool

NS, SVC = "test-ns", "chat"


@pytest.fixture(scope="module")
def live(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prometheus")
    with running_server(tiny_model, served_model_name="tiny") as server:
        groups = prometheus_rule_groups(NS, SVC, Thresholds())
        for g in groups:
            g["interval"] = "1s"
            for r in g["rules"]:
                if "for" in r:
                    r["for"] = "2s"
        (tmp / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
        port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(tmp / "rules.yaml")],
            "scrape_configs": [{
                "job_name": "qwen", "honor_labels": True, "metrics_path": "/metrics",
                "static_configs": [{"targets": [f"127.0.0.1:{server.port}"],
                                    "labels": {"namespace": NS, "service": SVC}}],
            }],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        proc = subprocess.Popen([tool("prometheus"), f"--config.file={tmp / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                                 "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=open(tmp / "log", "wb"))
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if httpx.get(url + "/-/ready", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            else:
                pytest.fail("Prometheus did not become ready: " + (tmp / "log").read_text()[-2000:])
            traffic(server)
            yield server, url
        finally:
            proc.terminate()
            proc.wait(20)


def traffic_round(server, i: int) -> None:
    """One success, one server error (an injected generation failure) and one client error."""
    engine = server.state.model.engine

    def poison(seqs):
        if any(s.handle.request_id.startswith("fail-") for s in seqs):
            raise RuntimeError("injected failure")

    engine.fault_hook = poison
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        threads = [threading.Thread(target=c.post, args=("/v1/chat/completions",),
                                    kwargs={"json": {**body, "stream": i % 2 == 0}}),
                   threading.Thread(target=c.post, args=("/v1/chat/completions",),
                                    kwargs={"json": body, "headers": {"X-Request-ID": f"fail-{i}"}})]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        c.post("/v1/chat/completions", json={"messages": []})


def traffic(server) -> None:
    """Successes, client errors and server errors, over a few scrapes."""
    for i in range(12):
        traffic_round(server, i)
        time.sleep(0.4)


def query(url: str, expr: str) -> list[dict]:
    r = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert r["status"] == "success", (expr, r)
    return r["data"]["result"]


def eventually(check, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


METRICS = {
    "http_requests_total": {"method", "endpoint", "status_code", "namespace", "service"},
    "http_request_duration_seconds_bucket": {"method", "endpoint", "le"},
    "active_connections": {"namespace", "service"},
    "model_inference_duration_seconds_bucket": {"le"},
    "qwen_time_to_first_token_seconds_bucket": {"le"},
    "qwen_time_per_output_token_seconds_bucket": {"le"},
    "qwen_e2e_request_latency_seconds_bucket": {"le"},
    "qwen_request_queue_seconds_bucket": {"le"},
    "qwen_requests_running": set(),
    "qwen_requests_waiting": set(),
    "qwen_kv_cache_usage_ratio": set(),
    "qwen_prompt_tokens_total": set(),
    "qwen_generation_tokens_total": set(),
    "qwen_request_success_total": {"finish_reason"},
    "qwen_request_errors_total": {"reason"},
    "qwen_model_loaded": set(),
    "process_cpu_seconds_total": set(),
    "process_resident_memory_bytes": set(),
}


@pytest.mark.parametrize("metric, labels", sorted(METRICS.items()))
def test_every_metric_exists_with_its_labels(live, metric, labels):
    _, url = live
    result = eventually(lambda: query(url, f'{metric}{{namespace="{NS}",service="{SVC}"}}'))
    assert result, metric
    have = set().union(*(r["metric"].keys() for r in result))
    assert labels | {"namespace", "service"} <= have, (metric, have)
    if metric == "http_requests_total":
        chat = [r["metric"] for r in result if r["metric"]["endpoint"] == "/v1/chat/completions"]
        assert {m["status_code"] for m in chat} >= {"200", "400", "500"}


def test_every_metric_the_rules_use_is_exposed(live):
    exposed = set(METRICS) | {m.removesuffix("_bucket") for m in METRICS}
    groups = prometheus_rule_groups(NS, SVC, Thresholds())
    own = set()
    for g in groups:
        for r in g["rules"]:
            for name in re.findall(r"\b(http_[a-z_]+|qwen_[a-z_]+|active_connections|model_[a-z_]+)\b", r["expr"]):
                own.add(name)
    assert own and own <= exposed, own - exposed


def dashboard_exprs() -> list[str]:
    out = []
    for expr in dashboard.queries():
        out.append(expr.replace("$namespace", NS).replace("$deployment", SVC).replace("$__rate_interval", "30s"))
    return out


@pytest.mark.parametrize("expr", dashboard_exprs())
def test_every_dashboard_query_parses_and_returns_data(live, expr):
    _, url = live
    if "kube_" in expr:
        # kube-state-metrics does not run here: the query must parse, and test_rules.py evaluates it on its series
        query(url, expr)
        return
    result = eventually(lambda: query(url, expr))
    assert result, expr


def test_dashboard_variables_find_the_deployment(live):
    _, url = live
    r = httpx.get(url + "/api/v1/label/namespace/values", params={"match[]": "qwen_model_loaded"}).json()
    assert NS in r["data"]
    r = httpx.get(url + "/api/v1/label/service/values",
                  params={"match[]": f'qwen_model_loaded{{namespace="{NS}"}}'}).json()
    assert SVC in r["data"]


def test_recording_rules_produce_series(live):
    _, url = live
    for record in ("qwen:request_rate:5m", "qwen:error_ratio:5m", "qwen:request_latency_seconds:p99",
                   "qwen:time_to_first_token_seconds:p95", "qwen:generation_tokens:rate5m"):
        assert eventually(lambda: query(url, record)), record


def test_the_error_rate_alert_fires(live):
    server, url = live

    def firing():
        alerts = httpx.get(url + "/api/v1/alerts").json()["data"]["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "QwenHighErrorRate" and a["state"] == "firing"]

    stop = threading.Event()

    def keep_failing():  # errors keep coming while Prometheus evaluates, as in an incident
        while not stop.is_set():
            traffic_round(server, 0)
            time.sleep(0.3)

    t = threading.Thread(target=keep_failing, daemon=True)
    t.start()
    try:
        alerts = eventually(firing, timeout=90)
    finally:
        stop.set()
        t.join(30)
    assert alerts, httpx.get(url + "/api/v1/alerts").json()
    a = alerts[0]
    assert a["labels"]["namespace"] == NS and a["labels"]["service"] == SVC and a["labels"]["severity"] == "critical"
    assert a["annotations"]["runbook_url"].endswith("#alert-qwenhigherrorrate")
    # and the latency alert, with a 5 s threshold, stays silent for a tiny model
    alerts = httpx.get(url + "/api/v1/alerts").json()["data"]["alerts"]
    assert not [x for x in alerts if x["labels"]["alertname"] == "QwenHighLatency"]

"""Hostile input never costs the server: schemathesis drives every route of the OpenAPI schema, and no
request yields a 5xx or a hang; the server is idle and leak-free afterwards. The examples come from a fixed seed
(a red run reruns red); `make fuzz` draws twenty times as many fresh ones."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from ..conftest import FUZZ_SCALE, running_server


@pytest.fixture(scope="module")
def fuzz_server(tiny_model):
    with running_server(tiny_model, max_tokens_cap=24, default_max_tokens=8, max_concurrency=4, max_queue=16,
                        served_model_name="tiny") as s:
        yield s


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


def test_no_input_yields_a_server_error(api_schema, fuzz_server):
    from hypothesis import given

    operations = [r.ok() for r in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/responses", "/v1/messages", "/v1/models",
                                              "/health", "/metrics"}
    statuses: dict[str, list[int]] = {}
    for op in operations:
        examples = {"/v1/chat/completions": 150, "/v1/responses": 80, "/v1/messages": 80, "/v1/completions": 60,
                    "/v1/responses/input_tokens": 40, "/v1/messages/count_tokens": 40}.get(op.path, 10) * FUZZ_SCALE

        @given(case=op.as_strategy())
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
        def call(case):
            response = case.call(base_url=fuzz_server.url, timeout=60)
            statuses.setdefault(op.path, []).append(response.status_code)
            assert response.status_code < 500, (op.path, case.body, response.status_code, response.text[:300])
            if op.path.startswith("/v1/messages") and response.status_code >= 400:  # Anthropic's shape
                body = response.json()
                assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
                assert body["error"]["message"]
            elif op.path.startswith("/v1/") and response.status_code >= 400:
                err = response.json()["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["message"]

        call()
    chat = statuses["/v1/chat/completions"]
    assert len(chat) >= 100  # the fuzzer really drove the chat route, with valid and invalid bodies
    assert 200 in chat and 400 in chat, sorted(set(chat))
    for route in ("/v1/responses", "/v1/messages"):
        got = statuses[route]
        assert len(got) >= 50 and 200 in got and 400 in got, (route, sorted(set(got)))


def test_afterwards_the_server_is_idle_and_leak_free(fuzz_server):
    import httpx

    engine = fuzz_server.state.model.engine
    assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0
    assert engine.allocator.used_blocks == 0 and engine.allocator.reserved == 0
    assert httpx.get(fuzz_server.url + "/health").status_code == 200

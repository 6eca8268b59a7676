"""Responses shared between replicas (`--peer-url`, `--peer-key-file`): two servers, as two replicas behind one
Service; a response made by one is carried on, read, listed, streamed again, cancelled and deleted through the
other; ids a client made up reach no replica."""

from __future__ import annotations

import time

import httpx
import pytest

from qwen_inference.peers import Peers

from ..conftest import free_port, running_server
from .scripted import Scripted, client
from .test_responses_background import Gate, wait_ended

KEY = "a key the replicas share, 0123456789"


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("peer") / "key"
    path.write_text(KEY + "\n")
    return path


def replica(tiny_model, key_file):
    port = free_port()
    return running_server(tiny_model, port=port, peer_url=f"http://127.0.0.1:{port}", peer_key_file=str(key_file),
                          max_concurrency=4)


@pytest.fixture(scope="module")
def pair(tiny_model, key_file):
    with replica(tiny_model, key_file) as a, replica(tiny_model, key_file) as b:
        yield a, b


def test_a_conversation_goes_on_through_another_replica(pair):
    a, b = pair
    ca, cb = client(a), client(b)
    first = ca.responses.create(model="tiny", input="Name a colour.", instructions="Be brief.", max_output_tokens=4,
                                temperature=0)
    assert first.id.startswith("resp_") and Peers(a.settings.peer_url, KEY.encode()).origin(first.id) is None
    assert Peers(b.settings.peer_url, KEY.encode()).origin(first.id) == a.settings.peer_url
    # the follow-up on B sees the conversation A kept: the same prompt and greedy reply as on A
    on_b = cb.responses.create(model="tiny", input="And another?", previous_response_id=first.id,
                               max_output_tokens=4, temperature=0)
    on_a = ca.responses.create(model="tiny", input="And another?", previous_response_id=first.id,
                               max_output_tokens=4, temperature=0)
    assert on_b.usage.input_tokens == on_a.usage.input_tokens and on_b.output_text == on_a.output_text
    assert cb.responses.input_tokens.count(model="tiny", input="And another?",
                                           previous_response_id=first.id).input_tokens == on_a.usage.input_tokens
    # read and listed through B, as A answers
    assert cb.responses.retrieve(first.id).model_dump() == ca.responses.retrieve(first.id).model_dump()
    assert [i.model_dump() for i in cb.responses.input_items.list(first.id)] == \
        [i.model_dump() for i in ca.responses.input_items.list(first.id)]
    # the query as sent, repeated names and all
    query = "limit=1&order=asc&include=reasoning.encrypted_content&include=message.output_text.logprobs"
    assert httpx.get(b.url + f"/v1/responses/{first.id}/input_items?{query}").json() == \
        httpx.get(a.url + f"/v1/responses/{first.id}/input_items?{query}").json()
    rb, ra = (httpx.get(x.url + f"/v1/responses/{first.id}/input_items?limit=1000") for x in (b, a))
    assert rb.status_code == ra.status_code == 400 and rb.json()["error"]["param"] == ra.json()["error"]["param"]
    # deleted through B: gone from A
    assert cb.responses.delete(first.id) is None
    assert httpx.get(a.url + f"/v1/responses/{first.id}").status_code == 404
    r = httpx.get(b.url + f"/v1/responses/{first.id}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_found"
    r = httpx.post(b.url + "/v1/responses", json={"input": "x", "previous_response_id": first.id})
    assert r.status_code == 404 and r.json()["error"]["param"] == "previous_response_id"


def test_a_background_response_is_streamed_again_and_cancelled_through_another_replica(pair):
    a, b = pair
    ca, cb = client(a), client(b)
    with Scripted(a) as s, Gate(a, "peer-bg", after=2) as gate:
        s.say("peer-bg", "word " * 30, end=False)
        started = ca.responses.create(model="tiny", input="Go on", max_output_tokens=30, background=True,
                                      extra_headers={"X-Request-ID": "peer-bg"})
        assert gate.reached.wait(30)
        assert cb.responses.retrieve(started.id).status == "in_progress"
        r = httpx.post(b.url + "/v1/responses", json={"input": "x", "previous_response_id": started.id})
        assert r.status_code == 400 and r.json()["error"]["code"] == "response_not_ended", r.text
        assert cb.responses.cancel(started.id).status == "cancelled"
        gate.release.set()
    assert ca.responses.retrieve(started.id).status == "cancelled"
    replayed = list(cb.responses.retrieve(started.id, stream=True))
    assert [e.model_dump() for e in replayed] == [e.model_dump() for e in ca.responses.retrieve(started.id,
                                                                                                stream=True)]
    assert replayed[0].type == "response.created"
    done = ca.responses.create(model="tiny", input="hi", max_output_tokens=3, background=True)
    wait_ended(ca, done.id)
    events = list(cb.responses.retrieve(done.id, stream=True, starting_after=1))
    assert events[0].sequence_number == 2 and events[-1].type in ("response.completed", "response.incomplete")


def test_ids_a_client_made_up_reach_no_replica(pair, tiny_model, key_file):
    a, b = pair
    made = client(a).responses.create(model="tiny", input="hi", max_output_tokens=2).id
    _, hex_, where, mac = made.split("_")
    # another replica's address under A's signature, a broken signature, a signature made with another key
    other = Peers("http://127.0.0.1:1", b"not the replicas' key, 0123456789").new_id()
    for rid in (f"resp_{hex_}_{Peers('x', b'').new_id().split('_')[2]}_{mac}", f"resp_{hex_}_{where}_{'0' * 32}",
                other, f"resp_{hex_}", "resp_a_b_c_d"):
        started = time.monotonic()
        r = httpx.get(b.url + f"/v1/responses/{rid}", timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_found", (rid, r.text)
        assert time.monotonic() - started < 5
    # the internal route answers only another replica
    assert httpx.get(a.url + f"/internal/responses/{made}").status_code == 404
    assert httpx.get(a.url + f"/internal/responses/{made}", headers={"x-qwen-peer": "0" * 32}).status_code == 404
    signed = Peers(a.settings.peer_url, KEY.encode()).signed(made)
    assert httpx.get(a.url + f"/internal/responses/{made}", headers=signed).json()["body"]["id"] == made


def test_a_replica_that_cannot_be_reached_is_a_502(pair, key_file):
    _, b = pair
    gone = Peers(f"http://127.0.0.1:{free_port()}", KEY.encode()).new_id()  # signed, but nobody listens there
    r = httpx.get(b.url + f"/v1/responses/{gone}", timeout=30)
    assert r.status_code == 502 and r.json()["error"]["code"] == "peer_unreachable", r.text
    r = httpx.post(b.url + "/v1/responses", json={"input": "x", "previous_response_id": gone}, timeout=30)
    assert r.status_code == 502 and r.json()["error"]["param"] == "previous_response_id", r.text
    metrics = httpx.get(b.url + "/metrics").text
    assert 'qwen_request_errors_total{reason="peer"}' in metrics


def test_an_ipv6_pod_address_is_bracketed(tmp_path):
    from qwen_inference.settings import ServeSettings

    key = tmp_path / "key"
    key.write_text(KEY)
    for given, url in (("http://fd00::5:8000", "http://[fd00::5]:8000"),
                       ("http://[fd00::5]:8000", "http://[fd00::5]:8000"),
                       ("http://10.1.2.3:8000", "http://10.1.2.3:8000"),
                       ("https://peer.example:9443", "https://peer.example:9443")):
        assert ServeSettings(model="demo", peer_url=given, peer_key_file=str(key)).peer_url == url
    # and such an id names that replica, which another one reaches
    a, b = Peers("http://[fd00::5]:8000", KEY.encode()), Peers("http://10.1.2.3:8000", KEY.encode())
    assert b.origin(a.new_id()) == "http://[fd00::5]:8000"
    assert httpx.URL("http://[fd00::5]:8000/internal/responses/x").host == "fd00::5"


def test_peer_settings_go_together_and_need_a_real_key(tmp_path):
    from pydantic import ValidationError

    from qwen_inference.settings import ServeSettings

    short = tmp_path / "short"
    short.write_text("tiny\n")
    for kwargs, message in (({"peer_url": "http://10.0.0.1:8000"}, "go together"),
                            ({"peer_key_file": str(short)}, "go together"),
                            ({"peer_url": "http://10.0.0.1:8000", "peer_key_file": str(short)}, "at least 16"),
                            ({"peer_url": "http://10.0.0.1:8000", "peer_key_file": str(tmp_path / "none")},
                             "cannot be read"),
                            ({"peer_url": "10.0.0.1:8000/x", "peer_key_file": str(short)}, "peer_url")):
        with pytest.raises(ValidationError, match=message):
            ServeSettings(model="demo", **kwargs)

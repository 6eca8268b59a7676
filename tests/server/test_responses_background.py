"""Background responses (`background: true`): kept from the start, run whatever the client does, polled with GET,
streamed again from any event with `starting_after`, cancelled with POST .../cancel; through the official client."""

from __future__ import annotations

import logging
import threading
import time

import httpx
import pytest

from .scripted import Scripted, client, failing


class Gate:
    """Holds the engine's step once request `rid` has written `after` tokens, until `release` is set (the engine
    runs in a thread of its own: the server goes on answering meanwhile)."""

    def __init__(self, server, rid: str, after: int) -> None:
        self.engine, self.rid, self.after = server.state.model.engine, rid, after
        self.reached, self.release = threading.Event(), threading.Event()

    def _process(self, logits, sampled) -> None:
        self._inner(logits, sampled)
        if any(s.handle.request_id == self.rid and len(s.output_ids) >= self.after for s in sampled):
            self.reached.set()
            self.release.wait(60)

    def __enter__(self) -> "Gate":
        self._inner = self.engine._process
        self.engine._process = self._process
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.engine._process = self._inner


def wait_ended(c, rid: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        r = c.responses.retrieve(rid)
        if r.status not in ("queued", "in_progress"):
            return r
        assert time.monotonic() < deadline, r.status
        time.sleep(0.05)


def written(c, rid: str, start: str, timeout: float = 30.0):
    """The response once its output so far starts with `start` (the engine's tokens reach it through the event
    loop, a moment after the step that made them)."""
    deadline = time.monotonic() + timeout
    while True:
        r = c.responses.retrieve(rid)
        if r.output_text.startswith(start) or time.monotonic() > deadline:
            return r
        time.sleep(0.02)


def idle(server, timeout: float = 30.0) -> bool:
    """The engine runs and waits for nothing."""
    engine = server.state.model.engine
    deadline = time.monotonic() + timeout
    while engine._running or engine._waiting:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def background_lines(caplog, rid: str) -> list:
    """The access log's lines for background response `rid`, written when it ends."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [r for r in caplog.records if r.getMessage() == "background response" and r.response_id == rid]
        if lines:
            return lines
        time.sleep(0.02)
    return []


def test_a_background_response_is_polled_to_the_reply_a_foreground_one_gives(srv, caplog):
    c = client(srv)
    body = dict(model="tiny", input="Say something", max_output_tokens=12, temperature=0)
    plain = c.responses.create(**body)
    with caplog.at_level(logging.INFO, logger="qwen_inference.access"):
        started = c.responses.create(**body, background=True, user="u-7", extra_headers={"X-Request-ID": "bg-poll"})
        assert (started.status, started.background, started.output) == ("queued", True, [])
        done = wait_ended(c, started.id)
        [line] = background_lines(caplog, started.id)
    assert done.background and done.status == plain.status
    assert done.output_text == plain.output_text
    assert done.usage.output_tokens == plain.usage.output_tokens
    assert (line.request_id, line.status, line.output_tokens, line.user) == ("bg-poll", done.status,
                                                                             done.usage.output_tokens, "u-7")
    # kept as any stored response is: it carries a conversation on
    follow = c.responses.create(model="tiny", input="And then?", previous_response_id=done.id, max_output_tokens=2)
    assert follow.status in ("completed", "incomplete")


def test_a_background_stream_outlives_its_client_and_resumes_after_any_event(server):
    c = client(server)
    with Scripted(server) as s, Gate(server, "bg-stream", after=3) as gate:
        s.say("bg-stream", "one two three four five six seven eight nine ten")
        seen = []
        with c.responses.create(model="tiny", input="Count", max_output_tokens=40, background=True, stream=True,
                                extra_headers={"X-Request-ID": "bg-stream"}) as stream:
            for ev in stream:
                seen.append(ev)
                if ev.type == "response.output_text.delta":
                    break  # the client goes away mid-reply, while the engine is held
        assert gate.reached.wait(30)
        rid = seen[0].response.id
        assert (seen[0].type, seen[0].response.status, seen[1].type) == ("response.created", "queued",
                                                                         "response.in_progress")
        assert c.responses.retrieve(rid).status == "in_progress"
        gate.release.set()
        resumed = list(c.responses.retrieve(rid, stream=True, starting_after=seen[-1].sequence_number))
    assert resumed[-1].type == "response.completed"
    events = seen + resumed
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == resumed[-1].response.output_text == "one two three four five six seven eight nine ten"
    # the whole stream again, from its first event, and from the last (nothing after it)
    again = list(c.responses.retrieve(rid, stream=True))
    assert [e.model_dump() for e in again] == [e.model_dump() for e in events]
    assert list(c.responses.retrieve(rid, stream=True, starting_after=events[-1].sequence_number)) == []
    assert c.responses.retrieve(rid).output_text == text


def test_cancel_stops_a_background_response_and_frees_the_engine(server, caplog):
    c = client(server)
    with caplog.at_level(logging.INFO, logger="qwen_inference.access"), Scripted(server) as s, \
            Gate(server, "bg-cancel", after=3) as gate:
        s.say("bg-cancel", "word " * 60, end=False)
        started = c.responses.create(model="tiny", input="Go on", max_output_tokens=60, background=True,
                                     extra_headers={"X-Request-ID": "bg-cancel"})
        assert gate.reached.wait(30)
        running = written(c, started.id, "word word")
        assert running.status == "in_progress" and running.output_text.startswith("word word")
        # a conversation cannot go on from a response that has not ended
        r = httpx.post(server.url + "/v1/responses", json={"input": "x", "previous_response_id": started.id},
                       timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id", r.text
        cancelled = c.responses.cancel(started.id)
        assert cancelled.status == "cancelled" and cancelled.output_text.startswith("word word")
        gate.release.set()
        [line] = background_lines(caplog, started.id)
    assert (line.status, line.error) == ("cancelled", "cancelled")
    assert idle(server)  # the engine dropped it
    after = c.responses.retrieve(started.id)
    assert after.status == "cancelled" and after.output_text == cancelled.output_text
    assert c.responses.cancel(started.id).status == "cancelled"  # an ended response comes back as it is
    events = list(c.responses.retrieve(started.id, stream=True))
    assert events[-1].type == "response.output_item.done" and events[-1].item.status == "incomplete"
    # a cancelled response still carries a conversation on
    assert c.responses.create(model="tiny", input="x", previous_response_id=started.id, max_output_tokens=2).id
    # a finished background response is returned as it is
    done = c.responses.create(model="tiny", input="hi", max_output_tokens=2, background=True)
    ended = wait_ended(c, done.id)
    assert c.responses.cancel(done.id).model_dump() == ended.model_dump()


def test_deleting_a_running_background_response_stops_it(server):
    c = client(server)
    with Scripted(server) as s, Gate(server, "bg-delete", after=2) as gate:
        s.say("bg-delete", "word " * 60, end=False)
        started = c.responses.create(model="tiny", input="Go on", max_output_tokens=60, background=True,
                                     extra_headers={"X-Request-ID": "bg-delete"})
        assert gate.reached.wait(30)
        assert c.responses.delete(started.id) is None
        gate.release.set()
    assert idle(server)
    assert httpx.get(server.url + f"/v1/responses/{started.id}", timeout=30).status_code == 404


def test_a_failed_background_response_is_kept_failed_with_its_error(server, caplog):
    c = client(server)
    with caplog.at_level(logging.INFO, logger="qwen_inference.access"), failing(server, "bg-poison"):
        started = c.responses.create(model="tiny", input="hi", max_output_tokens=4, background=True,
                                     extra_headers={"X-Request-ID": "bg-poison"})
        done = wait_ended(c, started.id)
        [line] = background_lines(caplog, started.id)
    assert done.status == "failed" and done.error.code == "internal_error"
    assert "injected failure" in done.error.message
    events = list(c.responses.retrieve(started.id, stream=True))
    assert events[-1].type == "response.failed" and events[-1].response.error.message == done.error.message
    assert (line.status, line.error) == ("failed", "internal_error")
    assert c.responses.create(model="tiny", input="hi", max_output_tokens=2).status in ("completed", "incomplete")


@pytest.mark.parametrize("body, param", [
    ({"background": True, "store": False}, "background"),
    ({"background_options": {"completion_window": "soonest"}}, "background_options"),
    ({"background": True, "background_options": {"completion_window": "2h"}}, "background_options.completion_window"),
    ({"background": True, "background_options": {"other": 1}}, "background_options.other"),
])
def test_bad_background_requests_are_400(server, body, param):
    r = httpx.post(server.url + "/v1/responses", json={"input": "hi", "max_output_tokens": 2, **body}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_only_background_responses_stream_again_or_cancel(server):
    c = client(server)
    fg = c.responses.create(model="tiny", input="hi", max_output_tokens=2)
    url = server.url + f"/v1/responses/{fg.id}"
    r = httpx.get(url, params={"stream": "true"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream", r.text
    r = httpx.post(url + "/cancel", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "not_background", r.text
    r = httpx.get(url, params={"starting_after": "2"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "starting_after", r.text
    r = httpx.get(url, params={"stream": "true", "include_obfuscation": "true"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "include_obfuscation", r.text
    r = httpx.post(server.url + "/v1/responses/resp_nothing/cancel", timeout=30)
    assert r.status_code == 404, r.text
    # with background_options that ask for what the server does anyway, a background response is made
    bg = httpx.post(server.url + "/v1/responses", timeout=30, json={
        "input": "hi", "max_output_tokens": 2, "background": True,
        "background_options": {"completion_window": "soonest", "continuation_id": "c-1"}}).json()
    assert wait_ended(c, bg["id"]).status in ("completed", "incomplete")

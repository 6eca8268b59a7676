"""The chat page in headless Chromium (Debian's): type, send, watch the reply stream, stop, see errors."""

from __future__ import annotations

import shutil

import pytest

from ..conftest import running_server
from .scripted import Scripted

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.browser
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.fail("Chromium is missing: `make test` installs it (scripts/system-deps)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context()
    pg = ctx.new_page()
    yield pg
    ctx.close()


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def test_type_send_and_see_a_streamed_reply(server, page):
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
    page.fill("#max-tokens", "12")
    page.fill("#temperature", "0")
    send(page, "Hello there")
    page.wait_for_selector(".msg.user")
    assert page.inner_text(".msg.user") == "Hello there"
    page.wait_for_function("document.getElementById('status').textContent.includes('tokens/s')", timeout=60000)
    reply = page.inner_text(".msg.assistant")
    assert reply.strip()
    status = page.inner_text("#status")
    assert status.startswith("12 tokens") and "finished: length" in status
    # the reply equals what the API gives for the same conversation
    import httpx

    api = httpx.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 12, "temperature": 0}).json()
    assert reply == api["choices"][0]["message"]["content"]
    # a second turn carries the history
    send(page, "And then?")
    page.wait_for_function("document.querySelectorAll('.msg.assistant').length == 2 && "
                           "!document.querySelector('.streaming')", timeout=60000)
    assert page.locator(".msg.user").count() == 2


def test_stop_button_cancels_the_request(server, page):
    engine = server.state.model.engine
    page.goto(server.url + "/")
    page.fill("#max-tokens", "1800")
    send(page, "Write forever")
    page.wait_for_function("document.querySelector('.msg.assistant') && "
                           "document.querySelector('.msg.assistant').textContent.length > 10", timeout=60000)
    assert engine.stats()["running"] == 1
    page.click("#stop")
    page.wait_for_function("document.getElementById('status').textContent === 'stopped'")
    import time

    deadline = time.monotonic() + 10
    while engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats()["running"] == 0
    assert page.is_enabled("#send") and not page.is_enabled("#stop")


def test_errors_are_shown(server, page):
    page.goto(server.url + "/")
    page.fill("#max-tokens", "999999")
    send(page, "too many tokens")
    page.wait_for_selector(".msg.error")
    text = page.inner_text(".msg.error")
    assert text.startswith("400:") and "max_tokens" in text


def test_401_asks_for_the_key_and_then_works(tiny_model, page):
    with running_server(tiny_model, api_key="sesame") as s:
        page.goto(s.url + "/")
        assert not page.is_visible("#api-key")
        page.fill("#max-tokens", "3")
        send(page, "hi")
        page.wait_for_selector(".msg.error")
        assert page.inner_text(".msg.error").startswith("401:")
        assert page.is_visible("#api-key")
        page.fill("#api-key", "sesame")
        send(page, "hi again")
        page.wait_for_function("document.getElementById('status').textContent.includes('tokens/s')",
                               timeout=60000)
        assert page.locator(".msg.assistant").count() == 1


def test_429_is_explained(tiny_model, page):
    import threading

    import httpx

    with running_server(tiny_model, max_concurrency=1, max_queue=0) as s:
        busy = threading.Thread(target=lambda: httpx.post(s.url + "/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "x"}], "max_tokens": 1500}))
        busy.start()
        engine = s.state.model.engine
        import time

        deadline = time.monotonic() + 30
        while not engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.02)
        page.goto(s.url + "/")
        send(page, "am I let in?")
        page.wait_for_selector(".msg.error")
        text = page.inner_text(".msg.error")
        assert text.startswith("429:") and "retry in" in text
        for h in list(engine._running):
            h.handle.cancel()
        busy.join(60)


def test_reasoning_shows_collapsed_above_the_answer(qwen3_server, page):
    """Qwen3 opens its thinking block itself: the page shows the reasoning folded above the answer, and sends
    it back with the next turn."""
    with Scripted(qwen3_server) as script:
        script.say(None, "<think>\nFirst, greet.\n</think>\n\nHello!")
        page.goto(qwen3_server.url + "/")
        page.select_option("#thinking", "on")
        with page.expect_request("**/v1/chat/completions") as sent:
            send(page, "hi")
        assert sent.value.post_data_json["chat_template_kwargs"] == {"enable_thinking": True}
        page.wait_for_function("document.getElementById('status').textContent.includes('tokens/s')", timeout=60000)
        details = page.locator(".msg.assistant details.reasoning")
        assert details.count() == 1
        assert details.evaluate("d => !d.open && d.nextElementSibling.className === 'answer'")
        assert not page.is_visible(".reasoning-text")
        assert page.text_content(".reasoning-text") == "First, greet."
        assert page.inner_text(".msg.assistant .answer") == "Hello!"
        page.click("details.reasoning summary")
        assert page.is_visible(".reasoning-text")
        # the next turn carries the reasoning back, as the chat template expects it
        page.select_option("#thinking", "off")
        with page.expect_request("**/v1/chat/completions") as sent:
            send(page, "and then?")
        body = sent.value.post_data_json
        assert body["messages"][1] == {"role": "assistant", "content": "Hello!", "reasoning_content": "First, greet."}
        assert body["chat_template_kwargs"] == {"enable_thinking": False}
        page.wait_for_function("document.querySelectorAll('.msg.assistant').length == 2 && "
                               "!document.querySelector('.streaming')", timeout=60000)


def test_an_attached_image_is_sent_with_the_message(qwen35_server, server, page, tmp_path):
    import base64

    import httpx

    from ..unit.test_qwen3_5_images import picture

    url = picture(64, 96, 9)
    png = tmp_path / "picture.png"
    png.write_bytes(base64.b64decode(url.split(",", 1)[1]))
    page.goto(qwen35_server.url + "/")
    page.fill("#max-tokens", "8")
    page.fill("#temperature", "0")
    page.select_option("#thinking", "off")
    page.set_input_files("#image", str(png))
    page.wait_for_function("document.getElementById('attached').textContent === '1 image'")
    send(page, "What is this?")
    page.wait_for_function("document.getElementById('status').textContent.includes('tokens/s')", timeout=60000)
    assert page.locator(".msg.user img").count() == 1 and page.inner_text("#attached") == ""
    api = httpx.post(qwen35_server.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                  {"type": "image_url", "image_url": {"url": url}}]}],
        "max_tokens": 8, "temperature": 0, "chat_template_kwargs": {"enable_thinking": False}}).json()
    assert page.inner_text(".msg.assistant .answer") == api["choices"][0]["message"]["content"]
    # a model without a vision tower says so
    page.goto(server.url + "/")
    page.set_input_files("#image", str(png))
    page.wait_for_function("document.getElementById('attached').textContent === '1 image'")
    send(page, "What is this?")
    page.wait_for_selector(".msg.error")
    assert "reads no images" in page.inner_text(".msg.error")

"""Images in chat completions on a real server: the openai client's image_url parts read by Qwen3.5's vision
tower, the tokens they take, and every way an image is refused."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest

from ..unit.test_qwen3_5_images import picture


def png_bytes(width: int, height: int, seed: int) -> bytes:
    return base64.b64decode(picture(width, height, seed).split(",", 1)[1])


def image_message(*urls: str, text: str = "What is in the picture?") -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        *({"type": "image_url", "image_url": {"url": u}} for u in urls)]}


@pytest.fixture
def oai(qwen35_server):
    return openai.OpenAI(base_url=qwen35_server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture
def http(qwen35_server):
    with httpx.Client(base_url=qwen35_server.url, timeout=120) as c:
        yield c


def ask(oai, *urls, stream=False, ignore_eos=True, **kw):
    return oai.chat.completions.create(model="tiny", messages=[image_message(*urls)], max_tokens=8, temperature=0,
                                       stream=stream, extra_body={"ignore_eos": ignore_eos}, **kw)


def encoded(http) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("qwen_image_encode_seconds_count"):
            return float(line.split()[-1])
    raise AssertionError("no qwen_image_encode_seconds_count")


def test_an_image_is_read_and_counted(oai, http, qwen35_server):
    one, other = picture(64, 64, 11), picture(64, 64, 12)
    before = encoded(http)
    first, again, different = ask(oai, one), ask(oai, one), ask(oai, other)
    # prompts shorter than the 64 tokens a hybrid model's state is kept for at the least: each image encoded again
    assert encoded(http) - before == 3
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.choices[0].message.content != different.choices[0].message.content  # the pixels matter
    text_only = oai.chat.completions.create(model="tiny", messages=[image_message()], max_tokens=1)
    images = qwen35_server.state.model.images
    grid = images.processor([__import__("PIL.Image").Image.open(io.BytesIO(png_bytes(64, 64, 1)))])[1][0]
    tokens = images.processor.tokens(grid)
    # the template's one placeholder and its two vision markers, the placeholder widened to the image's tokens
    assert first.usage.prompt_tokens == text_only.usage.prompt_tokens + 2 + tokens
    counted = http.post("/tokenize", json={"model": "tiny", "messages": [image_message(one)]}).json()
    assert counted["count"] == first.usage.prompt_tokens


def test_streaming_gives_the_same_reply(oai):
    url = picture(96, 64, 3)
    whole = ask(oai, url).choices[0].message.content
    parts = [c.choices[0].delta.content or "" for c in ask(oai, url, stream=True) if c.choices]
    assert "".join(parts) == whole


def test_two_images_in_one_message_and_a_later_turn(oai):
    a, b = picture(64, 64, 4), picture(64, 96, 5)
    both = oai.chat.completions.create(model="tiny", messages=[image_message(a, b)], max_tokens=4, temperature=0)
    swapped = oai.chat.completions.create(model="tiny", messages=[image_message(b, a)], max_tokens=4, temperature=0)
    assert both.usage.prompt_tokens == swapped.usage.prompt_tokens
    turns = [image_message(a), {"role": "assistant", "content": "A picture."}, {"role": "user", "content": "More?"}]
    later = oai.chat.completions.create(model="tiny", messages=turns, max_tokens=4, temperature=0)
    alone = oai.chat.completions.create(model="tiny", messages=[image_message(a)], max_tokens=1)
    assert later.usage.prompt_tokens > alone.usage.prompt_tokens


@pytest.mark.parametrize("part, param, words", [
    ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, "content.1.image_url.url",
     "data URL"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, "content.1.image_url.url",
     "base64"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}},
     "content.1.image_url.url", "image"),
    ({"type": "image_url", "image_url": {"url": picture(64, 64, 1), "detail": "low"}}, "detail", "detail"),
    ({"type": "image_url", "image_url": {}}, "url", "Field required"),
    ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, "type", "not supported"),
])
def test_bad_image_parts_get_400_naming_the_field(http, part, param, words):
    refused(http, "/v1/chat/completions", {"model": "tiny", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, part]}]}, param, words)


def refused(http, route: str, body: dict, param: str, words: str) -> None:
    r = http.post(route, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert param in err["param"] and words.lower() in err["message"].lower(), err


def test_images_outside_user_messages_and_too_many_are_refused(http, qwen35_server):
    url = picture(64, 64, 1)
    system = {"role": "system", "content": [{"type": "image_url", "image_url": {"url": url}}]}
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": [system, image_message()]})
    assert r.status_code == 400 and "user messages only" in r.json()["error"]["message"]
    limit = qwen35_server.state.settings.max_images
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": [image_message(*[url] * (limit + 1))]})
    assert r.status_code == 400 and f"at most {limit} images" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == f"messages.0.content.{limit + 1}.image_url.url"


def test_a_model_without_a_vision_tower_refuses_images(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": [image_message(picture(64, 64, 1))]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert "reads no images" in err["message"] and err["param"] == "messages.0.content.1.image_url.url"


def test_responses_read_input_image_parts(http, oai):
    url = picture(64, 96, 7)
    chat = ask(oai, url, ignore_eos=False)
    r = oai.responses.create(model="tiny", max_output_tokens=8, temperature=0, store=False,
                             input=[{"role": "user", "content": [
                                 {"type": "input_text", "text": "What is in the picture?"},
                                 {"type": "input_image", "image_url": url, "detail": "auto"}]}])
    assert r.usage.input_tokens == chat.usage.prompt_tokens  # the same prompt as chat completions renders
    assert r.output_text == chat.choices[0].message.content
    counted = http.post("/v1/responses/input_tokens", json={"model": "tiny", "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "What is in the picture?"}, {"type": "input_image", "image_url": url}]}]})
    assert counted.json()["input_tokens"] == chat.usage.prompt_tokens


@pytest.mark.parametrize("part, param, words", [
    ({"type": "input_image", "image_url": "https://example.com/cat.png"}, "input.0.content.1.image_url", "data URL"),
    ({"type": "input_image", "file_id": "file-1"}, "file_id", "data URL"),
    ({"type": "input_image"}, "image_url", "needs image_url"),
    ({"type": "input_image", "image_url": picture(64, 64, 1), "detail": "low"}, "detail", "detail"),
    ({"type": "input_file", "file_data": "x"}, "type", "not supported"),
])
def test_responses_refuse_bad_images_naming_the_field(http, part, param, words):
    refused(http, "/v1/responses", {"model": "tiny", "store": False, "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Hi"}, part]}]}, param, words)


def test_messages_read_base64_image_blocks(http, oai):
    url = picture(96, 64, 8)
    chat = ask(oai, url, ignore_eos=False)
    media, data = url[len("data:"):].split(";base64,")
    body = {"model": "tiny", "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in the picture?"},
        {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}]}]}
    r = http.post("/v1/messages", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["input_tokens"] == chat.usage.prompt_tokens
    assert r.json()["content"][-1]["text"] == chat.choices[0].message.content
    counted = http.post("/v1/messages/count_tokens", json={k: v for k, v in body.items() if k in ("model", "messages")})
    assert counted.json()["input_tokens"] == chat.usage.prompt_tokens


@pytest.mark.parametrize("block, words", [
    ({"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}, "fetches nothing"),
    ({"type": "image", "source": {"type": "base64", "media_type": "image/png"}}, "needs media_type and data"),
    ({"type": "image", "source": {"type": "base64", "media_type": "image/tiff", "data": "AAAA"}}, "image/tiff"),
    ({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "@@"}}, "base64"),
])
def test_messages_refuse_bad_images(http, block, words):
    body = {"model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": [block]}]}
    r = http.post("/v1/messages", json=body)
    assert r.status_code == 400, r.text
    msg = r.json()["error"]["message"]
    assert r.json()["type"] == "error" and words.lower() in msg.lower(), r.json()
    assert msg.startswith("messages.0.content.0.source."), msg  # Anthropic's errors name the field in the message


def test_a_cached_prompt_does_not_encode_its_image_again(oai, http):
    url = picture(64, 64, 13)
    long = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": "Describe it. " * 60}]}
    before = encoded(http)
    replies = [oai.chat.completions.create(model="tiny", messages=[long], max_tokens=4, temperature=0)
               for _ in range(2)]
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content
    assert replies[1].usage.prompt_tokens_details.cached_tokens > 64
    assert encoded(http) - before == 1  # the second found the image in the prefix cache

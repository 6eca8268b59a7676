from __future__ import annotations

import pytest

from qwen_inference.detokenizer import IncrementalDetokenizer, StopStringMatcher


@pytest.mark.parametrize("text", ["Hello, world!", "naïve café — 日本語のテキスト 🙂🎉", "a\nb\n\nc  d", "x" * 50])
def test_incremental_decode_equals_whole_decode(tiny_tokenizer, text):
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tiny_tokenizer)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == tiny_tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_multibyte_character_split_over_byte_tokens_is_held_back(tiny_tokenizer):
    # 🦩 is four bytes; Qwen2.5's vocabulary has no token for it, so it arrives as two tokens of partial bytes
    ids = tiny_tokenizer("🦩", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tiny_tokenizer)
    out = [detok.add(i) for i in ids]
    assert out[:-1] == [""] * (len(ids) - 1) and out[-1] == "🦩"


def test_incomplete_character_at_the_end_is_flushed_as_replacement(tiny_tokenizer):
    ids = tiny_tokenizer("🦩", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tiny_tokenizer)
    for i in ids[:-1]:
        assert detok.add(i) == ""
    assert detok.flush() == "\ufffd"


def test_special_tokens_are_skipped(tiny_tokenizer):
    detok = IncrementalDetokenizer(tiny_tokenizer)
    assert detok.add(151645) == ""  # <|im_end|>
    ids = tiny_tokenizer("ok", add_special_tokens=False)["input_ids"]
    assert "".join(detok.add(i) for i in ids) + detok.flush() == "ok"


def feed_all(matcher: StopStringMatcher, pieces: list[str]) -> str:
    out = []
    for p in pieces:
        out.append(matcher.feed(p))
        if matcher.stopped:
            break
    out.append(matcher.flush())
    return "".join(out)


@pytest.mark.parametrize(
    "pieces, stops, expected, stopped",
    [
        (["Hello ", "wor", "ld!"], ["world"], "Hello ", True),
        (["abc", "def"], ["cd"], "ab", True),
        (["a", "b", "c", "d", "e"], ["cde", "bcx"], "ab", True),
        (["no stop ", "here"], ["STOP"], "no stop here", False),
        (["ends with a partial ST"], ["STOP"], "ends with a partial ST", False),
        (["xx", "END"], ["END", "xxE"], "", True),  # the earliest match wins
        (["text"], None, "text", False),
    ],
)
def test_stop_strings(pieces, stops, expected, stopped):
    m = StopStringMatcher(stops)
    assert feed_all(m, pieces) == expected
    assert m.stopped is stopped


def test_stop_matcher_holds_back_only_possible_prefixes():
    m = StopStringMatcher(["STOP"])
    assert m.feed("abcS") == "abc"  # "S" might start STOP
    assert m.feed("x") == "Sx"  # it did not
    assert m.feed("ST") == ""
    assert m.feed("OP and more") == ""
    assert m.stopped

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_inference.reasoning import ReasoningStream, Thinking, split_reasoning, thinking_mode

from ..conftest import FUZZ_SCALE


@pytest.mark.parametrize(
    ("prompt", "has_think", "mode"),
    [
        ("<|im_start|>assistant\n<think>\n", True, Thinking.IN_PROMPT),  # Qwen3.5, thinking on
        ("<|im_start|>assistant\n<think>\n\n</think>\n\n", True, Thinking.OFF),  # thinking off
        ("<|im_start|>assistant\n", True, Thinking.BY_MODEL),  # Qwen3, thinking on
        ("<|im_start|>assistant\n<think>\n", False, Thinking.OFF),  # no <think> token in the vocabulary
        ("<|im_start|>assistant\n", False, Thinking.OFF),  # Qwen2.5
    ],
)
def test_thinking_mode_from_the_rendered_prompt(prompt, has_think, mode):
    assert thinking_mode(prompt, has_think_tokens=has_think) is mode


@pytest.mark.parametrize(
    ("mode", "text", "reasoning", "content"),
    [
        # the prompt opened the block: only </think> appears
        (Thinking.IN_PROMPT, "\nLet me see.\nStill thinking.\n</think>\n\nThe answer is 4.",
         "Let me see.\nStill thinking.", "The answer is 4."),
        # the model opens it
        (Thinking.BY_MODEL, "<think>\nhmm\n</think>\n\nHello", "hmm", "Hello"),
        (Thinking.BY_MODEL, "\n<think>hmm</think>Hello", "hmm", "Hello"),
        # no block: all answer, whitespace kept
        (Thinking.BY_MODEL, "Hello <think>x</think>", None, "Hello <think>x</think>"),
        (Thinking.BY_MODEL, "\nHello", None, "\nHello"),
        # thinking disabled: nothing is split
        (Thinking.OFF, "<think>a</think>b", None, "<think>a</think>b"),
        # cut short inside the reasoning: all reasoning
        (Thinking.IN_PROMPT, "\nstill going", "still going", ""),
        (Thinking.BY_MODEL, "<think>\nstill going\n", "still going", ""),
        # a later tag in the answer stays answer text
        (Thinking.IN_PROMPT, "r</think>\n\na </think> b <think>", "r", "a </think> b <think>"),
        # empty reasoning
        (Thinking.IN_PROMPT, "\n\n</think>\n\nok", "", "ok"),
        # inner newlines of the reasoning stay
        (Thinking.IN_PROMPT, "a\n\nb\n</think>c", "a\n\nb", "c"),
        # a reply that is only a prefix of <think>
        (Thinking.BY_MODEL, "<thi", None, "<thi"),
    ],
)
def test_split(mode, text, reasoning, content):
    assert split_reasoning(text, mode) == (reasoning, content)


TEXTS = [
    (Thinking.IN_PROMPT, "\nLet me see.\n\nStill </thinking> thinking.\n</think>\n\nThe answer: 4.\n"),
    (Thinking.BY_MODEL, "\n<think>\nhmm </thi nk>\n\n</think>\n\n\nHello\n\nworld"),
    (Thinking.BY_MODEL, "<thin>not a block</think>"),
    (Thinking.IN_PROMPT, "no end at all\n\n"),
    (Thinking.OFF, "<think>x</think>\n\ny"),
]


@settings(max_examples=60 * FUZZ_SCALE, deadline=None)
@given(case=st.sampled_from(TEXTS), cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=12))
def test_streaming_equals_whole_for_any_chunking(case, cuts):
    mode, text = case
    bounds = sorted({c for c in cuts if c <= len(text)} | {0, len(text)})
    stream = ReasoningStream(mode)
    reasoning = content = ""
    for a, b in zip(bounds, bounds[1:]):
        d = stream.feed(text[a:b])
        reasoning += d.reasoning
        content += d.content
    d = stream.flush()
    reasoning += d.reasoning
    content += d.content
    whole_r, whole_c = split_reasoning(text, mode)
    assert (reasoning if stream.had_reasoning else None, content) == (whole_r, whole_c)


def test_streaming_holds_back_only_what_a_tag_may_need():
    s = ReasoningStream(Thinking.IN_PROMPT)
    assert s.feed("abc </th").reasoning == "abc "  # "</th" may be the start of </think>
    d = s.feed("ink>\n\nok")
    assert (d.reasoning, d.content) == ("", "ok")
    assert not s.in_reasoning
    # text after the end flows through as soon as it arrives
    assert s.feed(" more").content == " more"


def test_by_model_waits_only_until_the_reply_shows_whether_it_thinks():
    s = ReasoningStream(Thinking.BY_MODEL)
    assert not s.feed("\n<th")
    assert s.feed("ink>x").reasoning == "x"
    s = ReasoningStream(Thinking.BY_MODEL)
    assert s.feed("Hi").content == "Hi"

"""Reasoning blocks: what a Qwen model writes between `<think>` and `</think>` is its reasoning, the rest is
the answer.

Three cases, told apart by the rendered prompt (`thinking_mode`):

- `Thinking.IN_PROMPT`: the chat template opened the block in the prompt (Qwen3.5, Qwen3 thinking-only
  models): the reply starts inside the reasoning and only `</think>` appears in it.
- `Thinking.BY_MODEL`: the model may open the block itself (Qwen3 with `enable_thinking` on): the reply is
  reasoning only if it starts with `<think>` (after optional whitespace); otherwise it is all answer.
- `Thinking.OFF`: thinking is disabled (the template wrote an empty block into the prompt) or the model has
  no `<think>` token: nothing is split.

The split follows Qwen's own templates when they re-read a reply: the reasoning loses the newlines around
it, the answer loses the newlines that follow `</think>`. A reply cut short inside the reasoning is all
reasoning. A `<think>` or `</think>` that appears later in the answer stays answer text.

`split_reasoning` splits a whole reply; `ReasoningStream` splits text deltas as they come and yields the same
text in pieces (concatenated, its deltas equal the whole split).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

THINK_START = "<think>"
THINK_END = "</think>"


class Thinking(enum.Enum):
    OFF = "off"
    IN_PROMPT = "in_prompt"
    BY_MODEL = "by_model"


def thinking_mode(prompt: str, *, has_think_tokens: bool, start: str = THINK_START, end: str = THINK_END) -> Thinking:
    """How the reply to the rendered `prompt` may carry reasoning. `has_think_tokens`: whether the model's
    vocabulary has the thinking tokens at all (Qwen2.5's has not)."""
    if not has_think_tokens:
        return Thinking.OFF
    tail = prompt.rstrip()
    if tail.endswith(start):
        return Thinking.IN_PROMPT
    if tail.endswith(end):
        return Thinking.OFF
    return Thinking.BY_MODEL


@dataclass
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content)


def split_reasoning(text: str, mode: Thinking, *, start: str = THINK_START, end: str = THINK_END
                    ) -> tuple[str | None, str]:
    """(reasoning, content) of a whole reply; reasoning is None when the reply has no reasoning block."""
    stream = ReasoningStream(mode, start=start, end=end)
    d1 = stream.feed(text)
    d2 = stream.flush()
    reasoning = d1.reasoning + d2.reasoning
    return (reasoning if stream.had_reasoning else None), d1.content + d2.content


class ReasoningStream:
    """Splits a reply into reasoning and content, delta by delta.

    Text that could still turn out to be part of a tag, the newlines at the end of the reasoning (dropped if
    `</think>` follows) and the newlines right after `</think>` are held back until the next text decides."""

    # states
    _PRE = "pre"  # BY_MODEL: before the first non-whitespace text
    _REASONING = "reasoning"
    _CONTENT = "content"

    def __init__(self, mode: Thinking, *, start: str = THINK_START, end: str = THINK_END) -> None:
        self.mode = mode
        self.start, self.end = start, end
        self.buffer = ""
        self.had_reasoning = mode == Thinking.IN_PROMPT
        self._reasoning_begun = False  # leading newlines of the reasoning are dropped until text comes
        self._content_begun = mode != Thinking.IN_PROMPT  # newlines right after </think> are dropped
        if mode == Thinking.IN_PROMPT:
            self.state = self._REASONING
        elif mode == Thinking.BY_MODEL:
            self.state = self._PRE
        else:
            self.state = self._CONTENT

    @property
    def in_reasoning(self) -> bool:
        return self.state == self._REASONING

    def feed(self, text: str) -> ReasoningDelta:
        self.buffer += text
        out = ReasoningDelta()
        while True:
            if self.state == self._CONTENT:
                out.content += self._take_content(final=False)
                return out
            if self.state == self._PRE:
                stripped = self.buffer.lstrip()
                if not stripped:
                    return out  # only whitespace so far: undecided
                if stripped.startswith(self.start):
                    self.buffer = stripped[len(self.start):]
                    self.state = self._REASONING
                    self.had_reasoning = True
                    continue
                if self.start.startswith(stripped):
                    return out  # a prefix of <think>: undecided
                self.state = self._CONTENT  # the reply does not open a block: all answer
                continue
            # reasoning
            i = self.buffer.find(self.end)
            if i >= 0:
                out.reasoning += self._reasoning_text(self.buffer[:i], closing=True)
                self.buffer = self.buffer[i + len(self.end):]
                self.state = self._CONTENT
                self._content_begun = False
                continue
            keep = _partial_suffix(self.buffer, self.end)
            body = self.buffer[: len(self.buffer) - keep]
            # trailing newlines are held back: dropped if </think> follows them
            emit = body.rstrip("\n")
            out.reasoning += self._reasoning_text(emit, closing=False)
            self.buffer = self.buffer[len(emit):]
            return out

    def flush(self) -> ReasoningDelta:
        """The end of the reply: whatever was held back."""
        out = ReasoningDelta()
        if self.state == self._PRE:
            # only whitespace or a prefix of <think>: answer text
            self.state = self._CONTENT
        if self.state == self._REASONING:
            out.reasoning += self._reasoning_text(self.buffer.rstrip("\n"), closing=True)
            self.buffer = ""
        else:
            out.content += self._take_content(final=True)
        return out

    def _reasoning_text(self, text: str, *, closing: bool) -> str:
        if not self._reasoning_begun:
            text = text.lstrip("\n")
            if not text:
                return ""
            self._reasoning_begun = True
        return text.rstrip("\n") if closing else text

    def _take_content(self, *, final: bool) -> str:
        text, self.buffer = self.buffer, ""
        if not self._content_begun:
            text = text.lstrip("\n")
            if not text:
                return ""
            self._content_begun = True
        return text


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0

"""Incremental detokenization and stop strings that may span token boundaries."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is held back, at the end of the reply (an incomplete character becomes U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :] if len(text) > len(prefix) else ""


class StopStringMatcher:
    """Feeds text through, holding back just enough to see a stop string that arrives in pieces."""

    def __init__(self, stops: list[str] | None, keep: bool = False) -> None:
        self.stops = [s for s in (stops or []) if s]
        self.keep = keep  # the stop string met is part of the text given (vLLM's include_stop_str_in_output)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string reached (the first one in the text)

    def feed(self, text: str, search: bool = True) -> str:
        """Returns the text that is safe to emit; sets `stopped` when a stop string was reached. With `search`
        false (a reply still short of its min_tokens) no stop string is looked for in what is emitted, but a tail
        that may begin one is held back, so that a stop string ending after it is found."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        self.buffer += text
        found = [(i, -len(s), s) for s in self.stops if (i := self.buffer.find(s)) >= 0] if search else []
        if found:
            cut, _, self.matched = min(found)
            out, self.buffer = self.buffer[:cut + (len(self.matched) if self.keep else 0)], ""
            self.stopped = True
            return out
        keep = self._tail_to_keep()
        out = self.buffer[: len(self.buffer) - keep]
        self.buffer = self.buffer[len(self.buffer) - keep :]
        return out

    def _tail_to_keep(self) -> int:
        """The longest buffer suffix that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.buffer)), best, -1):
                if self.buffer.endswith(s[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return "" if self.stopped else out

"""Tool calls in what a Qwen model writes, turned into OpenAI `tool_calls`, whole or delta by delta.

Two formats (`style`):

- `"hermes"` (Qwen2.5, Qwen3): a JSON object in a tool-call block, one block per call::

      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>

  The call's `arguments` are the text of the `arguments` value exactly as the model wrote it (checked to be a
  JSON object); an `arguments` given as a string holding a JSON object is accepted too.

- `"qwen3_5_xml"` (Qwen3.5, Qwen3-Coder)::

      <tool_call>
      <function=get_weather>
      <parameter=city>
      Paris
      </parameter>
      </function>
      </tool_call>

  Parameters become a JSON object (`json.dumps(..., ensure_ascii=False)` formatting). As in Qwen's own parser,
  one newline after `<parameter=…>` and one before `</parameter>` are dropped, a value spelled `null` is null,
  and the value is typed by the tool's JSON-schema `parameters`: string types stay text (with the whitespace
  around it removed when the string has an enum, const, pattern, format or length), `integer` and
  `number` become numbers, `boolean` true/false, anything else is read as JSON (or a Python literal); a value
  that does not convert, or a parameter the schema does not name, stays a string.

A call counts only once its closing tag is there. Text outside calls is content; whitespace right before
and after a call is dropped. A malformed call (a block that does not parse, an unclosed block at the end of
the reply) stays content, tags and all.

Streaming (`ToolCallStream`): deltas of content and of OpenAI `tool_calls`. Each call first gets a delta with
its `index`, `id` (`call_<24 hex>`), `type: "function"` and `function.name` (arguments ""), then
`function.arguments` fragments. By default a call is held back until its block closes and parses, so that a
malformed one can still become content (two deltas per call). With `incremental=True` — for output that a
grammar already holds to the format (`tool_choice` "required" or a named function) — the name goes out as
soon as it is written and the arguments as they come. Either way, the concatenated deltas equal the whole
parse (`parse_tool_calls`).

`OutputParser` composes this with the reasoning split (`reasoning.ReasoningStream`): the text is split into
reasoning and content first, then each part goes through its own tool-call parser with one shared call
index, so that a call written inside the thinking block is found too (and removed from the reasoning). A
call still open when the thinking block closes stays reasoning text.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
from dataclasses import dataclass, field

from .reasoning import ReasoningStream, Thinking

STYLES = ("hermes", "qwen3_5_xml")
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

_HERMES_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*', re.S)
_XML_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>", re.S)
_XML_PARAMETER = re.compile(r"<parameter=([^>\n]+)>")
_STRING_TYPES = {"string", "str", "text", "varchar", "char", "enum"}
_INTEGER_TYPES = {"integer", "int", "int32", "int64", "uint", "long", "short", "unsigned"}
_NUMBER_TYPES = {"number", "float", "double", "num"}
_BOOLEAN_TYPES = {"boolean", "bool", "binary"}


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolCallDelta:
    """One entry of a streamed chunk's `delta.tool_calls`."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict:
        out: dict = {"index": self.index}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
        fn: dict = {}
        if self.name is not None:
            fn["name"] = self.name
        fn["arguments"] = self.arguments
        out["function"] = fn
        return out


def tool_schemas(tools: list[dict] | None) -> dict[str, dict]:
    """name -> JSON-schema `parameters`, from an OpenAI `tools` list (entries that are not functions are
    skipped)."""
    out: dict[str, dict] = {}
    for tool in tools or []:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            params = fn.get("parameters")
            out[fn["name"]] = params if isinstance(params, dict) else {}
    return out


# --- value scanning and typing -----------------------------------------------------------------------------


class _JsonValueScanner:
    """Finds where a JSON value ends, reading its text in pieces (strings and escapes aware)."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.started = False
        self.first = ""
        self.end: int | None = None  # offset just past the value, once complete
        self.pos = 0

    def scan(self, text: str) -> None:
        while self.end is None and self.pos < len(text):
            c = text[self.pos]
            self.pos += 1
            if not self.started:
                if c.isspace():
                    continue
                self.started, self.first = True, c
                if c == '"':
                    self.in_string = True
                elif c in "{[":
                    self.depth = 1
                else:
                    self.end = None  # scalars are not arguments
                    self.first = "scalar"
                    return
                continue
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif c == "\\":
                    self.escape = True
                elif c == '"':
                    self.in_string = False
                    if self.depth == 0:
                        self.end = self.pos
                continue
            if c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.end = self.pos


def _param_type(schema: dict | None) -> str | None:
    if not isinstance(schema, dict):
        return None
    t = schema.get("type")
    if isinstance(t, list):
        t = next((x for x in t if x != "null"), None)
    if isinstance(t, str):
        return t.lower()
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or []:
            st = _param_type(sub)
            if st and st != "null":
                return st
    if "enum" in schema and all(isinstance(v, str) for v in schema["enum"]):
        return "string"
    return None


_STRING_CONSTRAINTS = ("enum", "const", "pattern", "format", "minLength", "maxLength")


def _constrained_string(schema: dict | None) -> bool:
    """A string with an enum, pattern, format or length: its value is a token, not free text (surrounding
    whitespace is not part of it)."""
    return isinstance(schema, dict) and any(k in schema for k in _STRING_CONSTRAINTS)


def _is_string_param(schema: dict | None, known: bool) -> bool:
    """Free text, streamed as it comes (incremental mode)."""
    if not known:
        return True
    return _param_type(schema) in _STRING_TYPES and not _constrained_string(schema)


def convert_parameter(value: str, schema: dict | None, *, known: bool = True):
    """A Qwen XML parameter's text as a JSON value, typed by its schema (see the module docstring)."""
    if value.lower() == "null":
        return None
    if not known:
        return value
    t = _param_type(schema)
    if t in _STRING_TYPES:
        return value.strip(" \t\r\n") if _constrained_string(schema) else value
    v = value.strip()
    if t in _INTEGER_TYPES:
        try:
            return int(v)
        except ValueError:
            return value
    if t in _NUMBER_TYPES:
        try:
            return float(v) if ("." in v or "e" in v.lower() or "inf" in v.lower()) else int(v)
        except ValueError:
            return value
    if t in _BOOLEAN_TYPES:
        low = v.lower()
        return True if low == "true" else False if low == "false" else value
    try:
        return json.loads(v)
    except ValueError:
        pass
    try:
        lit = ast.literal_eval(v)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return value
    try:
        json.dumps(lit)
    except (TypeError, ValueError):
        return value
    return lit


def _strip_value(value: str) -> str:
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


# --- whole blocks ------------------------------------------------------------------------------------------


def _parse_hermes_block(inner: str) -> tuple[str, str] | None:
    head = _HERMES_HEAD.match(inner)
    if head is not None:
        try:
            name = json.loads('"' + head.group(1) + '"')
        except ValueError:
            return None
        scanner = _JsonValueScanner()
        rest = inner[head.end():]
        scanner.scan(rest)
        if scanner.end is not None and re.fullmatch(r"\s*\}\s*", rest[scanner.end:]):
            raw = rest[: scanner.end].strip()
            args = _arguments_text(raw)
            if args is not None:
                return name, args
    # other key orders or spacing: parse the object and re-serialise the arguments
    try:
        obj = json.loads(inner)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or set(obj) - {"name", "arguments"}:
        return None
    if "arguments" not in obj:
        return obj["name"], "{}"
    args = obj["arguments"]
    if isinstance(args, dict):
        return obj["name"], json.dumps(args, ensure_ascii=False)
    if isinstance(args, str):
        text = _arguments_text(json.dumps(args))
        return (obj["name"], text) if text is not None else None
    return None


def _arguments_text(raw: str) -> str | None:
    """The arguments as a JSON object's text: the object as written, or the content of a string holding one."""
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    if isinstance(value, dict):
        return raw
    if isinstance(value, str):
        try:
            inner = json.loads(value)
        except ValueError:
            return None
        return value if isinstance(inner, dict) else None
    return None


def _parse_xml_block(inner: str, schemas: dict[str, dict]) -> tuple[str, str] | None:
    m = re.fullmatch(r"\s*<function=([^>\n]+)>(.*)</function>\s*", inner, re.S)
    if m is None:
        return None
    name, body = m.group(1).strip(), m.group(2)
    if not name:
        return None
    props = (schemas.get(name) or {}).get("properties") or {}
    args: dict = {}
    pos = 0
    for pm in re.finditer(r"<parameter=([^>\n]+)>(.*?)</parameter>", body, re.S):
        if body[pos : pm.start()].strip():
            return None  # text between parameters: not the format
        key = pm.group(1).strip()
        args[key] = convert_parameter(_strip_value(pm.group(2)), props.get(key), known=key in props)
        pos = pm.end()
    if body[pos:].strip():
        return None
    return name, json.dumps(args, ensure_ascii=False)


def parse_tool_calls(text: str, style: str, tools: list[dict] | None = None) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole reply."""
    stream = ToolCallStream(style, tools)
    content = stream.feed(text)[0] + stream.flush()[0]
    return content, stream.calls


# --- streaming ---------------------------------------------------------------------------------------------


class _Counter:
    def __init__(self) -> None:
        self.n = 0

    def next(self) -> int:
        self.n += 1
        return self.n - 1


class ToolCallStream:
    """Tool calls out of text deltas (see the module docstring)."""

    def __init__(self, style: str, tools: list[dict] | None = None, *, incremental: bool = False,
                 counter: _Counter | None = None) -> None:
        if style not in STYLES:
            raise ValueError(f"unknown tool-call style {style!r}; known: {', '.join(STYLES)}")
        self.style = style
        self.schemas = tool_schemas(tools)
        self.incremental = incremental
        self.counter = counter or _Counter()
        self.calls: list[ToolCall] = []
        self.buffer = ""
        self.inside = False
        self.pending_ws = ""  # whitespace at the end of content, dropped if a call follows
        self.after_call = False  # drop whitespace right after a call
        self._live: _LiveCall | None = None

    # content outside calls ---------------------------------------------------------------------------------
    def _content(self, text: str, *, final: bool) -> str:
        if self.after_call:
            text = text.lstrip()
            if not text:
                return ""
            self.after_call = False
        text = self.pending_ws + text
        if final:
            self.pending_ws = ""
            return text
        body = text.rstrip()
        self.pending_ws = text[len(body):]
        return body

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self.buffer += text
        return self._process(final=False)

    def flush(self) -> tuple[str, list[ToolCallDelta]]:
        """The end of the reply: an unclosed call stays content (unless it was already streamed)."""
        content, deltas = self._process(final=True)
        if self.inside:
            self.inside = False
            live, self._live = self._live, None
            if live is not None and live.announced:
                deltas += live.finish()  # already out: it stands as streamed (a reply cut short)
                self.calls.append(ToolCall(live.id, live.name, "".join(live.sent)))
            else:
                content += self._content(TOOL_CALL_START + self.buffer, final=True)
        else:
            content += self._content(self.buffer, final=True)
        self.buffer = ""
        return content, deltas

    def _process(self, *, final: bool) -> tuple[str, list[ToolCallDelta]]:
        content, deltas = "", []
        while True:
            if not self.inside:
                i = self.buffer.find(TOOL_CALL_START)
                if i < 0:
                    keep = 0 if final else _partial_len(self.buffer, TOOL_CALL_START)
                    content += self._content(self.buffer[: len(self.buffer) - keep], final=False)
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    return content, deltas
                content += self._content(self.buffer[:i], final=False)
                self.buffer = self.buffer[i + len(TOOL_CALL_START):]
                self.inside = True
                self._scanner = _JsonValueScanner()
                if self.incremental:
                    self._live = _LiveCall(self)
                continue
            j = self._block_end(self.buffer, final)
            if j is None:
                if self._live is not None:
                    deltas += self._live.advance(self.buffer)
                return content, deltas
            inner = self.buffer[:j]
            self.buffer = self.buffer[j + len(TOOL_CALL_END):]
            self.inside = False
            c, d = self._close_block(inner)
            content += c
            deltas += d

    def _block_end(self, inner: str, final: bool) -> int | None:
        """Where the closing tag of the open block is: after the JSON value (hermes) or after `</function>`
        (xml), so that a tag written inside an argument does not end the call. Text that is not the format
        ends at the first closing tag; so does, at the end of the reply, a value that never closed."""
        first = inner.find(TOOL_CALL_END)
        fallback = first if final and first >= 0 else None
        if self.style == "hermes":
            stripped = inner.lstrip()
            if not stripped:
                return None
            if stripped[0] != "{":
                return first if first >= 0 else None
            self._scanner.scan(inner)
            if self._scanner.end is None:
                return fallback
            j = inner.find(TOOL_CALL_END, self._scanner.end)
            return j if j >= 0 else None
        m = _XML_FUNCTION.match(inner)
        if m is None:
            stripped = inner.lstrip()
            if not stripped or "<function=".startswith(stripped) or (
                    stripped.startswith("<function=") and ">" not in stripped and "\n" not in stripped):
                return fallback
            return first if first >= 0 else None
        pos = m.end()
        while True:
            rest = inner[pos:]
            s = rest.lstrip()
            pos += len(rest) - len(s)
            if s.startswith("<parameter="):
                k = inner.find("</parameter>", pos)
                if k < 0:
                    return fallback
                pos = k + len("</parameter>")
                continue
            if s.startswith("</function>"):
                j = inner.find(TOOL_CALL_END, pos + len("</function>"))
                return j if j >= 0 else None
            if not s or "<parameter=".startswith(s) or "</function>".startswith(s):
                return fallback
            j = inner.find(TOOL_CALL_END, pos)
            return j if j >= 0 else None

    def _close_block(self, inner: str) -> tuple[str, list[ToolCallDelta]]:
        live, self._live = self._live, None
        parsed = _parse_hermes_block(inner) if self.style == "hermes" else _parse_xml_block(inner, self.schemas)
        if live is not None:
            deltas = live.advance(inner)
            if live.announced:
                sent = "".join(live.sent)
                if parsed is not None and parsed[0] == live.name and parsed[1].startswith(sent):
                    if len(parsed[1]) > len(sent):
                        deltas += live._send(parsed[1][len(sent):])
                else:
                    deltas += live.finish()  # out already: it stands as streamed
                self.calls.append(ToolCall(live.id, live.name, "".join(live.sent)))
                self.pending_ws, self.after_call = "", True
                return "", deltas
        if parsed is None:
            # malformed: the block is content, tags and all
            return self._content(TOOL_CALL_START + inner + TOOL_CALL_END, final=False), []
        name, args = parsed
        call = ToolCall(new_call_id(), name, args)
        self.calls.append(call)
        index = self.counter.next()
        self.pending_ws, self.after_call = "", True
        return "", [ToolCallDelta(index=index, id=call.id, name=name),
                    ToolCallDelta(index=index, arguments=args)]


class _LiveCall:
    """A call streamed while it is written (`incremental=True`)."""

    def __init__(self, owner: ToolCallStream) -> None:
        self.owner = owner
        self.announced = False
        self.index = -1
        self.id = ""
        self.name = ""
        self.sent: list[str] = []
        self.n_sent = 0
        # hermes
        self.args_at = 0
        self.scanner = _JsonValueScanner()
        # xml
        self.pos = 0
        self.n_params = 0
        self.param: tuple[str, bool] | None = None  # (key, streamed as a string)
        self.value_at = 0
        self.value_sent = 0
        self.value_open = False
        self.closed = False

    def _announce(self, name: str) -> ToolCallDelta:
        self.announced = True
        self.name = name
        self.index = self.owner.counter.next()
        self.id = new_call_id()
        return ToolCallDelta(index=self.index, id=self.id, name=name)

    def _send(self, text: str) -> list[ToolCallDelta]:
        if not text:
            return []
        self.sent.append(text)
        self.n_sent += len(text)
        return [ToolCallDelta(index=self.index, arguments=text)]

    def advance(self, text: str) -> list[ToolCallDelta]:
        """`text`: the whole block so far."""
        if self.owner.style == "hermes":
            return self._advance_hermes(text)
        return self._advance_xml(text)

    def finish(self) -> list[ToolCallDelta]:
        """Close what is open, for a call that ends before its format does (XML only: a JSON object cut
        short cannot be mended)."""
        if self.owner.style == "hermes" or not self.announced or self.closed:
            return []
        out: list[ToolCallDelta] = []
        if self.param is not None:
            out += self._send('"' if self.value_open else "null")
            self.param = None
        out += self._send("{}" if self.n_params == 0 else "}")
        self.closed = True
        return out

    def _advance_hermes(self, text: str) -> list[ToolCallDelta]:
        out: list[ToolCallDelta] = []
        if not self.announced:
            head = _HERMES_HEAD.match(text)
            if head is None or head.end() == len(text):
                return out  # the name is not complete yet (or another shape: parsed whole at the end)
            try:
                name = json.loads('"' + head.group(1) + '"')
            except ValueError:
                return out
            out.append(self._announce(name))
            self.args_at = head.end()
        rest = text[self.args_at:]
        self.scanner.scan(rest)
        if self.scanner.first != "{":
            return out  # not started, or a string or scalar: sent whole when the block closes
        begin = len(rest) - len(rest.lstrip())
        upto = self.scanner.end if self.scanner.end is not None else self.scanner.pos
        out += self._send(rest[begin + self.n_sent : upto])
        return out

    def _advance_xml(self, text: str) -> list[ToolCallDelta]:
        out: list[ToolCallDelta] = []
        if not self.announced:
            m = _XML_FUNCTION.match(text)
            if m is None:
                return out
            out.append(self._announce(m.group(1).strip()))
            self.pos = m.end()
        props = (self.owner.schemas.get(self.name) or {}).get("properties") or {}
        while not self.closed:
            if self.param is None:
                rest = text[self.pos:]
                stripped = rest.lstrip()
                skip = len(rest) - len(stripped)
                if stripped.startswith("</function>"):
                    out += self._send("{}" if self.n_params == 0 else "}")
                    self.closed = True
                    break
                m = _XML_PARAMETER.match(stripped)
                if m is None:
                    break  # wait for more text
                key = m.group(1).strip()
                as_string = _is_string_param(props.get(key), key in props)
                out += self._send(("{" if self.n_params == 0 else ", ") + json.dumps(key, ensure_ascii=False) + ": ")
                self.n_params += 1
                self.param = (key, as_string)
                self.pos += skip + m.end()
                self.value_at, self.value_sent, self.value_open = self.pos, 0, False
                continue
            key, as_string = self.param
            body = text[self.value_at:]
            end = body.find("</parameter>")
            if end >= 0:
                value = _strip_value(body[:end])
                if as_string and self.value_open:
                    out += self._send(json.dumps(value[self.value_sent:], ensure_ascii=False)[1:-1] + '"')
                else:
                    v = convert_parameter(value, props.get(key), known=key in props)
                    out += self._send(json.dumps(v, ensure_ascii=False))
                self.pos = self.value_at + end + len("</parameter>")
                self.param = None
                continue
            if as_string:
                # stream the text, holding back a possible "</parameter>", the last newline (dropped if the
                # value ends there), and a value that may still spell "null"
                safe = body[: len(body) - _partial_len(body, "</parameter>")]
                if safe.endswith("\n"):
                    safe = safe[:-1]
                value = safe[1:] if safe.startswith("\n") else safe
                if not self.value_open:
                    if len(value) <= 4 and "null".startswith(value.lower()):
                        break
                    out += self._send('"')
                    self.value_open = True
                if len(value) > self.value_sent:
                    out += self._send(json.dumps(value[self.value_sent:], ensure_ascii=False)[1:-1])
                    self.value_sent = len(value)
            break
        return out


def _partial_len(text: str, tag: str) -> int:
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


# --- reasoning and tool calls together ---------------------------------------------------------------------


@dataclass
class OutputDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


@dataclass
class ParsedOutput:
    reasoning: str | None
    content: str
    tool_calls: list[ToolCall]


class OutputParser:
    """A reply's text deltas split into reasoning, content and tool calls (see the module docstring).
    `tool_style` None: no tool-call parsing."""

    def __init__(self, thinking: Thinking, tool_style: str | None = None, tools: list[dict] | None = None, *,
                 incremental: bool = False) -> None:
        self.reasoning = ReasoningStream(thinking)
        counter = _Counter()
        self.tool_style = tool_style
        if tool_style is not None:
            # calls inside the thinking block are not grammar-held: always parsed whole
            self.in_reasoning = ToolCallStream(tool_style, tools, counter=counter)
            self.in_content = ToolCallStream(tool_style, tools, incremental=incremental, counter=counter)
        self._reasoning_done = False

    @property
    def tool_calls(self) -> list[ToolCall]:
        if self.tool_style is None:
            return []
        return self.in_reasoning.calls + self.in_content.calls

    def feed(self, text: str) -> OutputDelta:
        return self._route(self.reasoning.feed(text), final=False)

    def flush(self) -> OutputDelta:
        return self._route(self.reasoning.flush(), final=True)

    def _route(self, rd, *, final: bool) -> OutputDelta:
        out = OutputDelta()
        if self.tool_style is None:
            out.reasoning, out.content = rd.reasoning, rd.content
            return out
        if rd.reasoning:
            c, d = self.in_reasoning.feed(rd.reasoning)
            out.reasoning += c
            out.tool_calls += d
        if not self._reasoning_done and (not self.reasoning.in_reasoning or final) and \
                self.reasoning.state != ReasoningStream._PRE:
            self._reasoning_done = True
            c, d = self.in_reasoning.flush()
            out.reasoning += c
            out.tool_calls += d
        if rd.content:
            c, d = self.in_content.feed(rd.content)
            out.content += c
            out.tool_calls += d
        if final:
            c, d = self.in_content.flush()
            out.content += c
            out.tool_calls += d
        return out


def parse_output(text: str, thinking: Thinking, tool_style: str | None = None,
                 tools: list[dict] | None = None) -> ParsedOutput:
    """Reasoning, content and tool calls of a whole reply."""
    parser = OutputParser(thinking, tool_style, tools)
    d1, d2 = parser.feed(text), parser.flush()
    return ParsedOutput(
        reasoning=(d1.reasoning + d2.reasoning) if parser.reasoning.had_reasoning else None,
        content=d1.content + d2.content,
        tool_calls=parser.tool_calls,
    )

"""OpenAI's wire format: requests are validated with these models, and responses are built from them.

Request models forbid fields they do not declare, so an unknown field is answered 400 naming it. Fields of
OpenAI's schema that this server does not implement are declared with `Refused(...)`: any value but the
ones that ask for nothing is answered 400 naming the field and saying why. Fields checked by the structured
output and tool-call code (structured.py) carry the JSON schema of what they accept, for the OpenAPI document."""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, PrivateAttr,
                      SerializerFunctionWrapHandler, Tag,
                      ValidationError, WithJsonSchema, field_validator, model_serializer, model_validator)

MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)


def Refused(why: str, *no_ops: Any) -> Any:
    """The type of a field of OpenAI's schema that this server does not implement: null, or one of `no_ops`
    (values that ask for nothing the server does not do), passes; anything else is refused with `why`. The
    OpenAPI schema lists the values that pass."""

    def check(value: Any) -> Any:
        if value is None or any(value == ok and type(value) is type(ok) for ok in no_ops):
            return value
        raise ValueError(why)

    return Annotated[Any, BeforeValidator(check), WithJsonSchema({"enum": [None, *no_ops], "description": why})]


# refused fields that more than one request type declares
CacheRetention = Refused("prompts are cached in memory only; prompt_cache_retention may be 'in_memory'", "in_memory")
CacheOptions = Refused("prompt caching takes no options here: full 16-token prompt blocks are cached for every request")
ServiceTier = Refused("this server has one service tier: 'auto' or 'default'", "auto", "default")
Moderation = Refused("moderation is not supported")
Verbosity = Refused("verbosity is not supported: Qwen's models have no such control")
Annotations = Refused("annotations are not supported", [])  # of a reply a client sends back whole
Namespace = Refused("tool namespaces are not supported")
AsyncCall = Refused("asynchronous tool calls are not supported", False)


class FieldError(ValueError):
    """A check across fields that names the field at fault (`api.common.validation_message` reads `param`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none", "is-instance"}
_TYPE_EXPR = re.compile(r"^[a-z][a-z-]*\[.*\]$", re.S)


def _branch_tag(part: Any) -> bool:
    """A location part that names a branch of a union (`str`, `list[TextPart]`, `literal['a','b']`), not a
    field: pydantic puts one in the location of each branch's errors."""
    return isinstance(part, str) and (part in _TYPE_NAMES or bool(_TYPE_EXPR.match(part)))


def first_error(errors: list[dict[str, Any]]) -> tuple[list[str], str]:
    """The location (fields and indexes) and message of the error to report from pydantic's list. Of a union's
    branches, the one that got deepest into the value is the one the client meant (a list of parts, not a
    string), so the deepest error is reported, with the branch names left out of its location."""
    if not errors:
        return [], "invalid request"

    def located(e: dict[str, Any]) -> tuple[list[str], str]:
        loc = [str(p) for p in e.get("loc", ()) if p != "body" and not _branch_tag(p)]
        msg = e.get("msg", "invalid value")
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):  # a check across fields that names the one at fault
            loc += [p for p in cause.param.split(".") if p]
            msg = str(cause)
        elif e.get("type") == "extra_forbidden":
            msg = "this server does not support this field"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        return loc, msg

    loc, msg = max((located(e) for e in errors), key=lambda lm: len(lm[0]))
    return loc, msg


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


_TEXT_ONLY = "this API reads text parts (images: /v1/chat/completions, as image_url parts)"
_NOT_TEXT = ("image_url", "input_audio", "file", "input_image", "input_file", "audio")


def _text_parts(v: Any) -> Any:
    """Content parts: a clear refusal of images, audio and files (the models served here read text)."""
    if isinstance(v, list):
        for i, part in enumerate(v):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in _NOT_TEXT:
                raise FieldError(f"{i}.type", f"{kind} parts are not supported: {_TEXT_ONLY}")
            if kind == "refusal":
                raise FieldError(f"{i}.type", "refusal parts are not supported; send the text as text")
    return v


class ImageURL(OpenAIModel):
    url: str = Field(min_length=1)  # a data URL: data:image/png;base64,...
    detail: str | None = None

    @field_validator("detail")
    @classmethod
    def _detail(cls, v: str | None) -> str | None:
        return _image_detail(v)


def _image_detail(v: str | None) -> str | None:
    if v not in (None, "auto", "high"):
        raise ValueError(f"detail {v!r} is not supported: every image is read at the full resolution the model's "
                         "image processor gives it (detail 'auto' or 'high')")
    return v


class ImagePart(OpenAIModel):
    type: Literal["image_url"]
    image_url: ImageURL
    _param: str | None = PrivateAttr(None)  # the field of another API's request it came from, for errors

    @classmethod
    def of(cls, url: str, param: str) -> "ImagePart":
        part = cls(type="image_url", image_url=ImageURL(url=url))
        part._param = param
        return part


def _text_and_images(text: str, image: str):
    """A check of content parts: text (`text`) and images (`image`, for a model that reads them); audio, files and
    refusals refused by name."""
    def check(v: Any) -> Any:
        if isinstance(v, list):
            for i, part in enumerate(v):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in _NOT_TEXT and kind != image:
                    raise FieldError(f"{i}.type", f"{kind} parts are not supported: send {text} and {image} parts")
                if kind == "refusal":
                    raise FieldError(f"{i}.type", "refusal parts are not supported; send the text as text")
        return v
    return check


_chat_parts = _text_and_images("text", "image_url")


def _part_tags(tags: dict[str, str]):
    """A discriminator of content parts by their type, tagged `part[...]` (a tag first_error leaves out of the
    location)."""
    def kind(v: Any) -> str | None:
        t = v.get("type") if isinstance(v, dict) else getattr(v, "type", None)
        return f"part[{tags[t]}]" if t in tags else None
    return Discriminator(kind, custom_error_type="invalid_part",
                         custom_error_message=f"a content part needs a type: {', '.join(tags)}")


ChatPart = Annotated[Annotated[TextPart, Tag("part[text]")] | Annotated[ImagePart, Tag("part[image]")],
                     _part_tags({"text": "text", "image_url": "image"})]


class ToolCallFunction(OpenAIModel):
    name: str = Field(min_length=1)
    arguments: str  # a JSON object, as text


class ToolCallParam(OpenAIModel):
    """A tool call of an earlier assistant turn."""

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[ChatPart], BeforeValidator(_chat_parts)] | None = None
    name: str | None = None  # passed to the chat template (Qwen's templates do not show it)
    tool_calls: list[ToolCallParam] | None = None  # assistant
    tool_call_id: str | None = None  # tool
    reasoning: str | None = None  # assistant: its reasoning (vLLM's name)
    reasoning_content: str | None = None  # assistant: its reasoning (the older name)
    refusal: Refused("refusal messages are not supported; send the text as content") = None
    audio: Refused("audio is not supported: this server serves text models") = None
    function_call: Refused("function_call is deprecated and not supported; use tool_calls") = None
    # a field of OpenAI's response messages (web-search citations), there when a client sends a reply back whole
    annotations: Annotations = None

    @model_validator(mode="after")
    def _by_role(self) -> "ChatMessage":
        role = self.role
        if role != "assistant":
            if self.content is None:
                raise FieldError("content", f"a {role} message needs content")
            for name in ("tool_calls", "reasoning", "reasoning_content"):
                if getattr(self, name) is not None:
                    raise FieldError(name, f"{name} is allowed in assistant messages only")
        elif self.content is None and not self.tool_calls and self.reasoning is None \
                and self.reasoning_content is None:
            raise FieldError("content", "an assistant message needs content or tool_calls")
        if role != "user" and self.images:
            raise FieldError("content", f"images are allowed in user messages only, not in {role} messages")
        if role == "tool" and not self.tool_call_id:
            raise FieldError("tool_call_id", "a tool message needs tool_call_id")
        if role != "tool" and self.tool_call_id is not None:
            raise FieldError("tool_call_id", "tool_call_id is allowed in tool messages only")
        if self.reasoning is not None and self.reasoning_content is not None \
                and self.reasoning != self.reasoning_content:
            raise FieldError("reasoning_content", "reasoning and reasoning_content differ: send one of them")
        return self

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler):
        """The OpenAPI schema says what `_by_role` checks: one shape per role, as OpenAI's own schema has it."""
        ref = handler(core_schema)
        target = handler.resolve_ref_schema(ref)
        props = target.pop("properties")
        target.pop("required", None)
        closed = target.pop("additionalProperties", False)
        target.pop("type", None)
        content = {k: v for k, v in props["content"].items() if k != "default"}
        content["anyOf"] = [t for t in content["anyOf"] if t != {"type": "null"}]
        variants = []
        for role in props["role"]["enum"]:
            shape = {k: v for k, v in props.items()
                     if role == "assistant" or k not in ("tool_calls", "reasoning", "reasoning_content")}
            if role != "tool":
                shape.pop("tool_call_id")
            shape["role"] = {"const": role, "type": "string"}
            required = ["role"]
            variant: dict[str, Any] = {"type": "object", "additionalProperties": closed}
            if role == "assistant":
                variant["anyOf"] = [{"required": [k], "properties": {k: {"not": {"type": "null"}}}}
                                    for k in ("content", "tool_calls", "reasoning", "reasoning_content")]
            else:
                shape["content"] = content
                required.append("content")
            if role == "tool":
                shape["tool_call_id"] = {"type": "string", "minLength": 1}
                required.append("tool_call_id")
            variants.append({**variant, "properties": shape, "required": required})
        target["oneOf"] = variants
        return ref

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    @property
    def images(self) -> list[ImagePart]:
        return [p for p in self.content if isinstance(p, ImagePart)] if isinstance(self.content, list) else []

    @property
    def thought(self) -> str | None:
        return self.reasoning if self.reasoning is not None else self.reasoning_content


NO_OBFUSCATION = "stream obfuscation is not supported; leave include_obfuscation out or set it to false"


class ResponsesStreamOptions(OpenAIModel):
    include_obfuscation: Refused(NO_OBFUSCATION, False) = None


class StreamOptions(ResponsesStreamOptions):
    """Chat and text completions' stream options: the Responses API's, and include_usage."""

    include_usage: bool = False


def _stops(v: str | list[str] | None) -> list[str] | None:
    if v is None:
        return None
    stops = [v] if isinstance(v, str) else v
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
    if any(s == "" for s in stops):
        raise ValueError("stop strings must not be empty")
    return stops


_JSON_SCHEMA = {"type": "object", "description": "a JSON schema"}
RESPONSE_FORMAT = {"oneOf": [
    {"type": "object", "properties": {"type": {"const": "text"}}, "required": ["type"], "additionalProperties": False},
    {"type": "object", "properties": {"type": {"const": "json_object"}}, "required": ["type"],
     "additionalProperties": False},
    {"type": "object", "properties": {"type": {"const": "json_schema"}, "json_schema": {
        "type": "object", "properties": {"name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                                         "description": {"type": "string"}, "schema": _JSON_SCHEMA,
                                         "strict": {"type": ["boolean", "null"]}},
        "required": ["name", "schema"], "additionalProperties": False}},
     "required": ["type", "json_schema"], "additionalProperties": False},
]}
STRUCTURED_OUTPUTS = {"type": "object", "description": "exactly one of json, regex, choice, grammar, json_object",
                      "properties": {"json": {"oneOf": [_JSON_SCHEMA, {"type": "string"}]}, "regex": {"type": "string"},
                                     "choice": {"type": "array", "items": {"type": "string"}},
                                     "grammar": {"type": "string"}, "json_object": {"type": "boolean"}},
                      "minProperties": 1, "maxProperties": 1, "additionalProperties": False}
TOOL = {"type": "object", "properties": {"type": {"const": "function"}, "function": {
    "type": "object", "properties": {"name": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,64}$"},
                                     "description": {"type": "string"}, "parameters": _JSON_SCHEMA,
                                     "strict": {"type": ["boolean", "null"]}},
    "required": ["name"]}}, "required": ["type", "function"]}
TOOL_CHOICE = {"oneOf": [{"enum": ["none", "auto", "required"]}, {
    "type": "object", "properties": {"type": {"const": "function"}, "function": {
        "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
        "additionalProperties": False}}, "required": ["type", "function"], "additionalProperties": False}]}
TEMPLATE_KWARGS = {"type": "object", "description": "variables of the chat template: enable_thinking, "
                   "preserve_thinking (Qwen3.5), or any other the model's template reads",
                   "properties": {"enable_thinking": {"type": "boolean"}, "preserve_thinking": {"type": "boolean"}}}

MAX_LOGIT_BIAS = 1024  # tokens one request may bias (OpenAI allows 300)
MAX_STOP_TOKEN_IDS = 64
_NOT_STORED = "this server does not store completions"


class SamplingFields(OpenAIModel):
    """What chat and text completions share: sampling, stop strings, streaming, and vLLM's extensions."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # vLLM: -1 or 0 turn it off
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, ge=0.01, le=10.0)  # vLLM
    min_p: float | None = Field(None, ge=0.0, le=1.0)  # vLLM, llama.cpp
    min_tokens: int | None = Field(None, ge=0)  # vLLM: no end before this many tokens
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)  # vLLM
    include_stop_str_in_output: bool = False  # vLLM: the stop string met stays at the end of the reply
    n: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # written to the access log
    ignore_eos: bool = False  # vLLM
    # token id (as text, JSON's keys being text) -> a bias of -100 to 100 added to its logit; ids are checked
    # against the model's vocabulary in GenerationService.sampling
    logit_bias: dict[str, float] | None = None
    # checked by structured.Grammars.for_response_format and for_structured_outputs (vLLM's)
    response_format: Annotated[Any, WithJsonSchema(RESPONSE_FORMAT)] = None
    structured_outputs: Annotated[Any, WithJsonSchema(STRUCTURED_OUTPUTS)] = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        return _stops(v)

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if not v:
            return None
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias holds {len(v)} tokens; at most {MAX_LOGIT_BIAS} are allowed")
        for key, bias in v.items():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"logit_bias key {key!r} is not a token id (a non-negative integer)")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias of token {key} is {bias}; biases must be from -100 to 100")
        return v

    @model_validator(mode="after")
    def _stream_options(self) -> "SamplingFields":
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "stream_options is only allowed when stream is true")
        if self.response_format is not None and self.structured_outputs is not None:
            raise FieldError("structured_outputs",
                             "response_format and structured_outputs cannot be combined: send one of them")
        return self

    @property
    def choices(self) -> int:
        return self.n or 1


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
# what each effort turns the model's thinking into: Qwen's models think or do not, with no budget in between
THINKING_BY_EFFORT: dict[str, bool] = {"none": False, "minimal": False, "low": True, "medium": True, "high": True,
                                       "xhigh": True, "max": True}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # checked by structured._check_tools and _check_tool_choice
    tools: Annotated[list[dict[str, Any]] | None, WithJsonSchema({"type": "array", "items": TOOL})] = None
    tool_choice: Annotated[Any, WithJsonSchema(TOOL_CHOICE)] = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: ReasoningEffort | None = None
    chat_template_kwargs: Annotated[dict[str, Any] | None, WithJsonSchema(TEMPLATE_KWARGS)] = None  # vLLM
    # vLLM: the most tokens the reply may reason for; then its reasoning is ended and the answer follows
    thinking_token_budget: int | None = Field(None, ge=0)
    # vLLM: continue_final_message goes on writing the last (assistant) message instead of starting a new one
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # accepted, with what they mean here
    prompt_cache_key: str | None = None  # prompt prefixes are cached for every request alike
    prompt_cache_retention: CacheRetention = None
    safety_identifier: str | None = None  # written to the access log
    service_tier: ServiceTier = None
    store: Refused(_NOT_STORED, False) = None
    modalities: Refused("this server answers text only: modalities may be ['text']", ["text"]) = None
    # refused
    metadata: Refused("metadata is kept with stored completions, which this server does not keep", {}) = None
    audio: Refused("audio output is not supported") = None
    functions: Refused("functions is deprecated and not supported; use tools") = None
    function_call: Refused("function_call is deprecated and not supported; use tool_choice") = None
    prediction: Refused("predicted outputs are not supported") = None
    verbosity: Verbosity = None
    web_search_options: Refused("web search is not supported") = None
    moderation: Moderation = None
    prompt_cache_options: CacheOptions = None

    @model_validator(mode="after")
    def _logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs needs logprobs: true")
        if self.continue_final_message:
            if self.add_generation_prompt:
                raise FieldError("continue_final_message",
                                 "continue_final_message needs add_generation_prompt: false")
            last = self.messages[-1]
            if last.role != "assistant" or last.tool_calls:
                raise FieldError("continue_final_message", "continue_final_message needs a last message from the "
                                 "assistant, with content and no tool_calls")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprobs_k(self) -> int | None:
        """None: no log-probabilities; k: the chosen token's and the k most likely."""
        return (self.top_logprobs or 0) if self.logprobs else None


TokenIds = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default; 0 (with echo) scores the prompt alone
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = Field(None, ge=1)
    suffix: Refused("suffix (insertion) is not supported") = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v: Any) -> Any:
        def ids(x: Any) -> bool:
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in x)

        if isinstance(v, str) or ids(v) or (isinstance(v, list) and (
                all(isinstance(x, str) for x in v) or all(ids(x) for x in v))):
            return v
        raise ValueError("prompt must be a string, a list of strings, a list of token ids (integers from 0), or a "
                         "list of lists of token ids")

    @model_validator(mode="after")
    def _checks(self) -> "CompletionRequest":
        if self.best_of is not None and self.best_of != self.choices:
            raise FieldError("best_of", "best_of must equal n (or be left out): this server returns every "
                             "sequence it generates")
        if self.max_tokens == 0 and not self.echo:
            raise FieldError("max_tokens", "max_tokens may be 0 only with echo: true (to score the prompt)")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            return []
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TokenizeRequest(OpenAIModel):
    """vLLM's /tokenize: a `prompt`, or `messages` rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (vLLM's)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: Annotated[list[dict[str, Any]] | None, WithJsonSchema({"type": "array", "items": TOOL})] = None
    chat_template_kwargs: Annotated[dict[str, Any] | None, WithJsonSchema(TEMPLATE_KWARGS)] = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise FieldError("prompt", "send either prompt or messages")
        if self.prompt is not None:
            for name in ("tools", "chat_template_kwargs"):
                if getattr(self, name) is not None:
                    raise FieldError(name, f"{name} goes with messages, not with a prompt")
            if self.continue_final_message:
                raise FieldError("continue_final_message", "continue_final_message goes with messages")
        if self.continue_final_message and self.add_generation_prompt:
            raise FieldError("continue_final_message", "continue_final_message needs add_generation_prompt: false")
        return self


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: TokenIds


# ---- responses ----------------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens found in the prefix cache, not computed again


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class FunctionOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionOut


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class ResponseMessage(BaseModel):
    """The reply: `reasoning` (and, for older clients, `reasoning_content`) is what the model wrote between
    <think> and </think>, null when it did not think; `tool_calls` is left out when there are none."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None

    @model_serializer(mode="wrap")
    def _no_empty_calls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out = handler(self)
        if not out.get("tool_calls"):
            out.pop("tool_calls", None)
        return out


FinishReason = Literal["stop", "length", "tool_calls"]


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    """What a chunk adds: the role in the first, then reasoning, content or tool-call fragments; fields left out
    are not sent."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @model_serializer(mode="wrap")
    def _only_given(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One streamed event. `usage` is sent (null until the last chunk) only when the request asked for it
    with stream_options.include_usage; `dumps` leaves it out otherwise."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None

    def dumps(self, include_usage: bool) -> str:
        return self.model_dump_json(exclude=None if include_usage else {"usage"})


class CompletionLogprobs(BaseModel):
    """The legacy shape: per token its text, log-probability (null for a prompt's first token), the most likely
    tokens with theirs (the chosen one included), and where its text starts in the choice's text."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(BaseModel):
    """A text completion, whole or (object the same, `finish_reason` null until a choice ends) one streamed
    event."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None

    def dumps(self, include_usage: bool) -> str:
        return self.model_dump_json(exclude=None if include_usage else {"usage"})


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    """The served model, with OpenAI's fields and Anthropic's (`type`, `display_name`, `created_at`), so that
    either API's client reads it."""
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "qwen-operator"
    max_model_len: int | None = None
    type: Literal["model"] = "model"
    display_name: str = ""
    created_at: str = "1970-01-01T00:00:00Z"  # `created`, as RFC 3339


class ModelList(BaseModel):
    """OpenAI's list, with the paging fields of Anthropic's."""
    object: Literal["list"] = "list"
    data: list[ModelCard]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def now() -> int:
    return int(time.time())


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code)).model_dump()


# ---- the Responses API (POST /v1/responses) ---------------------------------------------------------------
#
# A request's input items become chat messages (serving_responses.py), so everything chat completions do —
# the chat template, tools, reasoning, grammars, the prefix cache — serves this API too. Only function tools;
# text in, text out.

_NOT_HERE = {
    "item_reference": "item_reference is not supported: send the items themselves",
    "custom_tool_call": "custom tools are not supported: this server runs function tools",
    "custom_tool_call_output": "custom tools are not supported: this server runs function tools",
    "compaction": "compaction items are not supported",
}


class InputText(OpenAIModel):
    type: Literal["input_text", "output_text"]
    text: str
    prompt_cache_breakpoint: bool | None = None  # every full block of every prompt is cached here anyway
    annotations: Annotations = None  # output_text sent back whole
    logprobs: list[Any] | None = None  # output_text sent back whole: what was reported, read by nothing


TextParts = Annotated[list[InputText], BeforeValidator(_text_parts)]


class InputImage(OpenAIModel):
    type: Literal["input_image"]
    image_url: str | None = None  # a data URL
    detail: str | None = None
    file_id: Refused("file_id is not supported: send the image as a data URL in image_url") = None

    @field_validator("detail")
    @classmethod
    def _detail(cls, v: str | None) -> str | None:
        return _image_detail(v)

    @model_validator(mode="after")
    def _url(self) -> "InputImage":
        if not self.image_url:
            raise FieldError("image_url", "an input_image needs image_url (a data URL)")
        return self


_message_parts = _text_and_images("input_text", "input_image")


MessagePart = Annotated[Annotated[InputText, Tag("part[text]")] | Annotated[InputImage, Tag("part[image]")],
                        _part_tags({"input_text": "text", "output_text": "text", "input_image": "image"})]


class InputMessage(OpenAIModel):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | Annotated[list[MessagePart], BeforeValidator(_message_parts)]
    id: str | None = None  # an output message sent back whole
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: Literal["commentary", "final_answer"] | None = None

    @model_validator(mode="after")
    def _images_from_users(self) -> "InputMessage":
        if self.role != "user" and isinstance(self.content, list):
            for i, part in enumerate(self.content):
                if isinstance(part, InputImage):
                    raise FieldError(f"content.{i}", f"images are allowed in user messages only, not in {self.role} "
                                                     "messages")
        return self

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, InputText))

    @property
    def has_images(self) -> bool:
        return isinstance(self.content, list) and any(isinstance(p, InputImage) for p in self.content)


_NO_PROGRAMS = "programmatic tool calling is not supported"


class FunctionCallItem(OpenAIModel):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str  # a JSON object, as text
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    caller: Refused(_NO_PROGRAMS, {"type": "direct"}) = None
    namespace: Namespace = None
    async_: AsyncCall = Field(None, alias="async")


class FunctionCallOutputItem(OpenAIModel):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | TextParts
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    name: str | None = None  # the called function's, as its call names it
    caller: Refused(_NO_PROGRAMS, {"type": "direct"}) = None
    namespace: Namespace = None

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


class ReasoningText(OpenAIModel):
    type: Literal["reasoning_text"]
    text: str


class SummaryText(OpenAIModel):
    type: Literal["summary_text"]
    text: str


class ReasoningItem(OpenAIModel):
    """A reasoning item sent back: its text from `content`, or from `encrypted_content` as this server made it
    (serving_responses.reasoning_of)."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[SummaryText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


_ITEMS: dict[str, type[OpenAIModel]] = {"message": InputMessage, "function_call": FunctionCallItem,
                                        "function_call_output": FunctionCallOutputItem, "reasoning": ReasoningItem}


def _validated(model: type[BaseModel], value: Any) -> BaseModel:
    """`value` as `model`, its first error raised as a FieldError that names the field inside it."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        loc, msg = first_error(exc.errors())
        raise FieldError(".".join(loc), msg) from None


def parse_item(v: Any) -> Any:
    """One input item as its model, by its type (a message when it has none)."""
    if not isinstance(v, dict):
        raise ValueError("an input item must be an object")
    kind = v.get("type", "message")
    if kind in _NOT_HERE:
        raise FieldError("type", _NOT_HERE[kind])
    if kind not in _ITEMS:
        raise FieldError("type", f"items of type {kind!r} are not supported: send message, function_call, "
                         "function_call_output and reasoning items (this server runs function tools only)")
    return _validated(_ITEMS[kind], v)


def _input(v: Any) -> Any:
    if v is None or isinstance(v, str):
        return v
    if not isinstance(v, list):
        raise ValueError("input must be a string or a list of items")
    out = []
    for i, item in enumerate(v):
        try:
            out.append(parse_item(item))
        except FieldError as exc:
            raise FieldError(f"{i}.{exc.param}" if exc.param else str(i), str(exc)) from None
        except ValueError as exc:
            raise FieldError(str(i), str(exc)) from None
    return out


_TEXT_PARTS = {"anyOf": [{"type": "string"}, {"type": "array", "items": {
    "type": "object", "properties": {"type": {"enum": ["input_text", "output_text"]}, "text": {"type": "string"}},
    "required": ["type", "text"]}}]}
_STATUS = {"enum": ["in_progress", "completed", "incomplete"]}
INPUT_SCHEMA = {"anyOf": [{"type": "string", "minLength": 1}, {"type": "array", "minItems": 1, "items": {"oneOf": [
    {"type": "object", "description": "a message", "required": ["role", "content"], "properties": {
        "type": {"const": "message"}, "role": {"enum": ["user", "system", "developer", "assistant"]},
        "content": _TEXT_PARTS, "id": {"type": "string"}, "status": _STATUS}},
    {"type": "object", "description": "a function call of an earlier turn", "properties": {
        "type": {"const": "function_call"}, "call_id": {"type": "string", "minLength": 1},
        "name": {"type": "string", "minLength": 1}, "arguments": {"type": "string", "description": "a JSON object"},
        "id": {"type": "string"}, "status": _STATUS}, "required": ["type", "call_id", "name", "arguments"]},
    {"type": "object", "description": "a function call's result", "properties": {
        "type": {"const": "function_call_output"}, "call_id": {"type": "string", "minLength": 1},
        "output": _TEXT_PARTS, "id": {"type": "string"}, "status": _STATUS}, "required": ["type", "call_id", "output"]},
    {"type": "object", "description": "reasoning of an earlier turn: its text, or encrypted_content as this server "
     "wrote it", "properties": {
        "type": {"const": "reasoning"}, "summary": {"type": "array"}, "content": {"type": "array", "items": {
            "type": "object", "properties": {"type": {"const": "reasoning_text"}, "text": {"type": "string"}},
            "required": ["type", "text"]}}, "encrypted_content": {"type": "string"}, "id": {"type": "string"},
        "status": _STATUS}, "required": ["type"]}]}}]}


class FunctionTool(OpenAIModel):
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of an object
    strict: bool | None = None
    allowed_callers: Refused(_NO_PROGRAMS, ["direct"]) = None
    async_: AsyncCall = Field(None, alias="async")
    defer_loading: Refused("deferred tool loading is not supported", False) = None
    output_schema: Refused("output schemas of tools are not supported") = None

    def to_chat(self) -> dict[str, Any]:
        fn: dict[str, Any] = {"name": self.name}
        for key in ("description", "parameters", "strict"):
            if getattr(self, key) is not None:
                fn[key] = getattr(self, key)
        return {"type": "function", "function": fn}


def _tools_of_type(allowed: str, what: str):
    """A before-validator of a tool: a tool of another type than `allowed` is refused by name."""
    def check(v: Any) -> Any:
        kind = v.get("type") if isinstance(v, dict) else None
        if isinstance(kind, str) and kind != allowed:
            raise FieldError("type", f"tools of type {kind!r} are not supported: this server runs {what} only")
        return v

    return check


_tool = _tools_of_type("function", "function tools")


class NamedFunction(OpenAIModel):
    type: Literal["function"]
    name: str


def _tool_choice(v: Any) -> Any:
    if v is None or v in ("none", "auto", "required"):
        return v
    if isinstance(v, dict):
        if v.get("type") != "function":
            raise FieldError("type", f"tool_choice of type {v.get('type')!r} is not supported: use 'none', 'auto', "
                             "'required' or {'type': 'function', 'name': ...}")
        return _validated(NamedFunction, v)
    raise ValueError("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'name': ...}")


RESPONSES_TOOL_CHOICE = {"oneOf": [{"enum": ["none", "auto", "required"]}, {
    "type": "object", "properties": {"type": {"const": "function"}, "name": {"type": "string"}},
    "required": ["type", "name"], "additionalProperties": False}]}


class TextFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None  # json_schema: checked where the grammar compiles
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _fields(self) -> "TextFormat":
        if self.type != "json_schema":
            for name in ("name", "schema_", "description", "strict"):
                if getattr(self, name) is not None:
                    raise FieldError(name.rstrip("_"), f"{name.rstrip('_')} goes with type 'json_schema'")
        elif self.schema_ is None:
            raise FieldError("schema", "a json_schema format needs schema")
        return self

    def to_chat(self) -> dict[str, Any]:
        """As chat completions' response_format."""
        if self.type != "json_schema":
            return {"type": self.type}
        spec: dict[str, Any] = {"name": self.name, "schema": self.schema_}
        if self.description is not None:
            spec["description"] = self.description
        if self.strict is not None:
            spec["strict"] = self.strict
        return {"type": "json_schema", "json_schema": spec}


class TextConfig(OpenAIModel):
    format: TextFormat | None = None
    verbosity: Verbosity = None


class ReasoningConfig(OpenAIModel):
    effort: ReasoningEffort | None = None
    context: Refused("reasoning.context is not supported") = None
    mode: Refused("reasoning.mode is not supported") = None
    summary: Refused("reasoning summaries are not made: the reasoning itself comes as reasoning_text content; "
                     "leave summary out") = None
    generate_summary: Refused("reasoning summaries are not made; leave generate_summary out") = None


ENCRYPTED_REASONING = "reasoning.encrypted_content"
TEXT_LOGPROBS = "message.output_text.logprobs"
INCLUDABLE = (ENCRYPTED_REASONING, TEXT_LOGPROBS)


def _metadata(v: Any) -> Any:
    if isinstance(v, dict):
        if len(v) > 16:
            raise ValueError("at most 16 keys")
        for key, value in v.items():
            if len(key) > 64 or not isinstance(value, str) or len(value) > 512:
                raise FieldError(key, "metadata holds keys of at most 64 characters, string values of at most 512")
    return v


class ResponseInput(OpenAIModel):
    """What makes a response's prompt: shared by creating a response and counting its input tokens."""

    model_config = ConfigDict(json_schema_extra={"anyOf": [{"required": ["input"]},
                                                           {"required": ["previous_response_id"]}]})

    model: str | None = None
    input: Annotated[Any, BeforeValidator(_input), WithJsonSchema(INPUT_SCHEMA)] = None
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[Annotated[FunctionTool, BeforeValidator(_tool)]] | None = None
    tool_choice: Annotated[Any, BeforeValidator(_tool_choice), WithJsonSchema(RESPONSES_TOOL_CHOICE)] = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    # auto: the conversation's first items are dropped, whole turns, until the prompt and the reply fit
    truncation: Literal["auto", "disabled"] | None = None
    conversation: Refused("conversations are not supported: use previous_response_id or send the items") = None

    @model_validator(mode="after")
    def _some_input(self) -> "ResponseInput":
        if not self.input and self.previous_response_id is None:
            raise FieldError("input", "input is required (a string or a non-empty list of items)")
        return self

    @property
    def items(self) -> list[Any]:
        if isinstance(self.input, str):
            return [InputMessage(role="user", content=self.input)]
        return list(self.input or [])


class InputTokensRequest(ResponseInput):
    """POST /v1/responses/input_tokens: the prompt a response would have, counted."""

    personality: Refused("personalities are not supported") = None


class BackgroundOptions(OpenAIModel):
    completion_window: Literal["soonest"] | None = None  # the discounted 2h and 8h windows have no meaning here
    continuation_id: str | None = None  # a hint for ordering related requests; every request is served alike


class ResponsesRequest(ResponseInput):
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool | None = False
    stream_options: ResponsesStreamOptions | None = None
    store: bool | None = True
    metadata: Annotated[dict[str, str] | None, BeforeValidator(_metadata)] = None
    include: Annotated[list[str] | None, WithJsonSchema(
        {"type": "array", "items": {"enum": list(INCLUDABLE)}})] = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    user: str | None = None  # written to the access log
    safety_identifier: str | None = None  # written to the access log
    # accepted, with what they mean here
    prompt_cache_key: str | None = None  # prompt prefixes are cached for every request alike
    prompt_cache_retention: CacheRetention = None
    service_tier: ServiceTier = None
    background: bool | None = False
    background_options: BackgroundOptions | None = None
    # refused
    prompt: Refused("prompt templates are not supported") = None
    max_tool_calls: Refused("max_tool_calls limits built-in tools, which this server does not run") = None
    context_management: Refused("context management is not supported") = None
    access_programs: Refused("access programs are not supported") = None
    image: Refused("image output is not supported: this server serves text models") = None
    moderation: Moderation = None
    prompt_cache_options: CacheOptions = None

    @field_validator("include")
    @classmethod
    def _include(cls, v: list[str] | None) -> list[str] | None:
        for i, name in enumerate(v or ()):
            if name not in INCLUDABLE:
                raise FieldError(str(i), f"{name!r} is not supported: include may list "
                                 + " and ".join(repr(n) for n in INCLUDABLE))
        return v

    @model_validator(mode="after")
    def _checks(self) -> "ResponsesRequest":
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "stream_options is only allowed when stream is true")
        if self.background and self.store is False:
            raise FieldError("background", "a background response must be stored: leave store out or set it true")
        if self.background_options is not None and not self.background:
            raise FieldError("background_options", "background_options is only allowed when background is true")
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs", f"top_logprobs needs include: [{TEXT_LOGPROBS!r}]")
        return self

    @property
    def logprobs(self) -> bool:
        return TEXT_LOGPROBS in (self.include or ())


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class ResponseError(BaseModel):
    code: str
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class InputTokensDetails(BaseModel):
    cached_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int  # the tokens written before the reasoning ended


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponseObject(BaseModel):
    """A response, as returned, streamed in its lifecycle events and stored. `output` holds its items as
    plain objects: reasoning, message and function_call, in the order the model wrote them."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]
    background: bool = False
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[dict[str, Any]] = Field(default_factory=list)
    parallel_tool_calls: bool
    previous_response_id: str | None = None
    reasoning: dict[str, Any]
    store: bool
    temperature: float | None = None
    text: dict[str, Any]
    tool_choice: Any
    tools: list[dict[str, Any]]
    top_p: float | None = None
    top_logprobs: int | None = None
    truncation: Literal["auto", "disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)


class InputTokens(BaseModel):
    object: Literal["response.input_tokens"] = "response.input_tokens"
    input_tokens: int


class InputItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True


# ---- Anthropic's Messages API (POST /v1/messages) -------------------------------------------------------
#
# As with Responses, a request's messages become chat messages (serving_messages.py) and run on chat
# completions' path. Text, tool_use, tool_result and thinking blocks; client tools only.

_CACHED_ANYWAY = ("every prompt prefix is cached (full 16-token blocks, in memory) without asking, so "
                  "cache_control asks for nothing more")


class CacheControl(OpenAIModel):
    """Accepted wherever Anthropic's schema has it: the prefix cache keeps every prompt's prefix anyway."""
    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


_NO_TOOLSETS = "toolsets are not supported"


class MText(OpenAIModel):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None
    citations: Refused("citations are not supported", []) = None


class MImageSource(OpenAIModel):
    type: Literal["base64", "url", "file"]
    media_type: str | None = None
    data: str | None = None
    url: str | None = None
    file_id: str | None = None

    @model_validator(mode="after")
    def _base64(self) -> "MImageSource":
        if self.type != "base64":
            raise FieldError("type", f"image sources of type {self.type!r} are not supported: the server fetches "
                                     "nothing; send the image as base64")
        if not self.media_type or self.data is None:
            raise FieldError("data", "a base64 image source needs media_type and data")
        return self

    def data_url(self) -> str:
        return f"data:{self.media_type};base64,{self.data}"


class MImage(OpenAIModel):
    type: Literal["image"]
    source: MImageSource
    cache_control: CacheControl | None = None


class MToolUse(OpenAIModel):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]
    cache_control: CacheControl | None = None
    caller: Refused("only direct tool calls are supported", {"type": "direct"}) = None
    toolset_name: Refused(_NO_TOOLSETS) = None


class MToolResult(OpenAIModel):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[Annotated[MText, BeforeValidator(lambda v: _text_block(v, "tool results"))]] = ""
    is_error: bool | None = None  # the result's text is marked as an error (serving_messages.tool_result_text)
    cache_control: CacheControl | None = None
    toolset_name: Refused(_NO_TOOLSETS) = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)


class MThinking(OpenAIModel):
    type: Literal["thinking"]
    thinking: str
    signature: str


_BLOCKS = {"text": MText, "tool_use": MToolUse, "tool_result": MToolResult, "thinking": MThinking, "image": MImage}


def _text_block(v: Any, where: str) -> Any:
    kind = v.get("type") if isinstance(v, dict) else None
    if isinstance(kind, str) and kind != "text":
        raise FieldError("type", f"{where} may hold text blocks only, not {kind!r}: this server serves text models")
    return v


def _block(v: Any) -> Any:
    kind = v.get("type") if isinstance(v, dict) else None
    if isinstance(kind, str) and kind not in _BLOCKS:
        why = ("this server reads text and images" if kind in ("document", "search_result", "container_upload")
               else "this server runs client tools only" if "tool" in kind
               else "only thinking it wrote itself can be sent back" if kind == "redacted_thinking"
               else "not supported")
        raise FieldError("type", f"content blocks of type {kind!r} are not supported: {why}")
    return v


def _block_kind(v: Any) -> str | None:
    kind = v.get("type") if isinstance(v, dict) else getattr(v, "type", None)
    return f"block[{kind}]" if kind in _BLOCKS else None  # a tag first_error leaves out of the location


MBlock = Annotated[
    Annotated[MText, Tag("block[text]")] | Annotated[MToolUse, Tag("block[tool_use]")]
    | Annotated[MToolResult, Tag("block[tool_result]")] | Annotated[MThinking, Tag("block[thinking]")]
    | Annotated[MImage, Tag("block[image]")],
    Discriminator(_block_kind, custom_error_type="invalid_block",
                  custom_error_message="a content block needs a type: text, image, tool_use, tool_result or thinking"),
    BeforeValidator(_block)]
_BLOCKS_BY_ROLE = {"system": {"text"}, "user": {"text", "image", "tool_result"},
                   "assistant": {"text", "tool_use", "thinking"}}


class MMessage(OpenAIModel):
    role: Literal["user", "assistant", "system"]
    content: str | list[MBlock]

    @model_validator(mode="after")
    def _by_role(self) -> "MMessage":
        if isinstance(self.content, list):
            allowed = _BLOCKS_BY_ROLE[self.role]
            for i, block in enumerate(self.content):
                if block.type not in allowed:
                    raise FieldError(f"content.{i}.type", f"a {self.role} message may not hold {block.type} "
                                     f"blocks (it may hold: {', '.join(sorted(allowed))})")
        return self


class MTool(OpenAIModel):
    type: Literal["custom"] | None = None
    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any]  # a JSON schema of an object
    strict: bool | None = None
    cache_control: CacheControl | None = None
    eager_input_streaming: bool | None = None  # a call's input is streamed as it is written either way
    allowed_callers: Refused(_NO_PROGRAMS, ["direct"]) = None
    defer_loading: Refused("deferred tool loading is not supported", False) = None
    input_examples: Refused("input examples are not supported") = None

    def to_chat(self) -> dict[str, Any]:
        return FunctionTool(type="function", name=self.name, description=self.description,
                            parameters=self.input_schema, strict=self.strict).to_chat()


_mtool = _tools_of_type("custom", "client tools")


class MToolChoice(OpenAIModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _name(self) -> "MToolChoice":
        if (self.type == "tool") != (self.name is not None):
            raise FieldError("name", "a tool_choice of type 'tool' needs name" if self.type == "tool"
                             else f"name goes with type 'tool', not {self.type!r}")
        return self


class MThinkingConfig(OpenAIModel):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=1)
    display: Refused("thinking is returned as written, or left out with display 'omitted'; it is not summarized",
                     "omitted") = None

    @model_validator(mode="after")
    def _budget(self) -> "MThinkingConfig":
        if (self.type == "enabled") != (self.budget_tokens is not None):
            raise FieldError("budget_tokens", "thinking of type 'enabled' needs budget_tokens"
                             if self.type == "enabled" else "budget_tokens goes with type 'enabled'")
        if self.type == "disabled" and self.display is not None:
            raise FieldError("display", "display goes with thinking that is on")
        return self


class MOutputFormat(OpenAIModel):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class MOutputConfig(OpenAIModel):
    format: MOutputFormat | None = None
    effort: Refused("effort is not supported: Qwen's models have no such control (thinking turns reasoning on "
                    "or off)") = None


class MMetadata(OpenAIModel):
    user_id: str | None = None  # written to the access log


class MessagesInput(OpenAIModel):
    """What POST /v1/messages and /v1/messages/count_tokens share: what the prompt is made of."""

    model: str
    messages: list[MMessage] = Field(min_length=1)
    system: str | list[Annotated[MText, BeforeValidator(lambda v: _text_block(v, "system"))]] | None = None
    tools: list[Annotated[MTool, BeforeValidator(_mtool)]] | None = None
    tool_choice: MToolChoice | None = None
    thinking: MThinkingConfig | None = None
    output_config: MOutputConfig | None = None
    cache_control: CacheControl | None = None
    speed: Refused("this server has one speed", "standard") = None
    user_profile_id: Refused("user profiles are not supported") = None
    workspace_id: Refused("workspaces are not supported") = None


class MessagesRequest(MessagesInput):
    max_tokens: int = Field(ge=1)
    stream: bool | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    metadata: MMetadata | None = None
    service_tier: Refused("this server has one service tier: 'auto' or 'standard_only'", "auto",
                          "standard_only") = None
    container: Refused("containers are not supported: this server runs client tools only") = None
    diagnostics: Refused("diagnostics are not supported") = None
    inference_geo: Refused("this server runs where it is deployed: inference_geo is not supported") = None

    @field_validator("stop_sequences")
    @classmethod
    def _stop(cls, v: list[str] | None) -> list[str] | None:
        return _stops(v)


class MUsage(BaseModel):
    input_tokens: int  # not counting cache_read_input_tokens, as Anthropic counts
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class MessageObject(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[dict[str, Any]]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None = None
    stop_sequence: str | None = None
    usage: MUsage


class MessageTokens(BaseModel):
    input_tokens: int

"""The chat templates of each Qwen generation, written into the tokenizers the project makes.

The templates live as Jinja files in `chat_templates/`: `qwen2.5` (ChatML with Qwen2.5's default system prompt
and Hermes-style JSON tool calls), `qwen3` (adds <think> reasoning and the `enable_thinking` switch) and
`qwen3.5` (XML tool calls, the generation prompt always opens <think>, thinking off unless
`enable_thinking=true`, and `preserve_thinking=true` keeps the reasoning of every past assistant turn).
"""

from __future__ import annotations

from functools import cache
from importlib import resources

QWEN_DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

CHAT_TEMPLATES = ("qwen2.5", "qwen3", "qwen3.5")


@cache
def chat_template(name: str) -> str:
    """The Jinja source of one generation's chat template."""
    if name not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; choose one of {', '.join(CHAT_TEMPLATES)}")
    return (resources.files(__package__) / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


def __getattr__(name: str) -> str:
    # the Qwen2.5 template under its historical name, read when first asked for
    if name == "QWEN25_CHAT_TEMPLATE":
        return chat_template("qwen2.5")
    raise AttributeError(name)

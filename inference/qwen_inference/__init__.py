"""qwen-serve: an OpenAI-compatible inference server for small Qwen chat models."""

__version__ = "0.1.0"

"""The generation engine: one loop owns the model and decodes every running sequence together."""

from .engine import Engine, EngineDead, QueueFull, RequestHandle
from .sampling import SamplingParams

__all__ = ["Engine", "EngineDead", "QueueFull", "RequestHandle", "SamplingParams"]

"""The generation engine: one loop owns the model and decodes every running sequence together."""

from .engine import (Engine, EngineDead, FinishEvent, PromptLogprobsEvent, QueueFull, Request, RequestHandle,
                     TokenEvent)
from .sampling import SamplingParams

__all__ = ["Engine", "EngineDead", "FinishEvent", "PromptLogprobsEvent", "QueueFull", "Request", "RequestHandle",
           "SamplingParams", "TokenEvent"]

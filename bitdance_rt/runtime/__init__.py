"""The generation loop (the continuous-batching scheduler) and the backends it drives."""

from .loop import generate, generate_batched
from .request import Event, GenerationResult, Request
from .scheduler import Scheduler

__all__ = ["Event", "GenerationResult", "Request", "Scheduler", "generate", "generate_batched"]

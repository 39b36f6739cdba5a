"""The generation loop (written once) and the backends it drives."""

from .loop import GenerationResult, generate

__all__ = ["GenerationResult", "generate"]

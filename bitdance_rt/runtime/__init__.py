"""The generation loop (written once) and the backends it drives."""

from .loop import GenerationResult, generate, generate_batched

__all__ = ["GenerationResult", "generate", "generate_batched"]

"""PyTorch modules of BitDance, state-dict compatible with the official checkpoints."""

from .bitdance import BitDance
from .heads import DiffusionHead, MlpHead, TransformerHead
from .tokenizer import BinaryAutoencoder

__all__ = ["BitDance", "BinaryAutoencoder", "DiffusionHead", "MlpHead", "TransformerHead"]

"""Text-to-image configuration read from a checkpoint (official directory; other layouts: t2i/layouts.py).

The config dataclasses (T2IConfig, Qwen3Config, HeadConfig, ...) live in bitdance_rt.t2i_config,
the config layer that bitdance_rt.models may import; they are re-exported here, so
`from bitdance_rt.t2i.config import T2IConfig` keeps working. What is left here reads files.
"""

from __future__ import annotations

from pathlib import Path

from ..t2i_config import (
    DEFAULT_CFG,
    DEFAULT_MAX_TEXT_TOKENS,
    DEFAULT_STEPS,
    POS_EMBED_PIXELS,
    SUPPORTED_SIZES,
    T2I_CLASS,
    HeadConfig,
    Qwen3Config,
    T2IConfig,
    check_resolution,
    supported_sizes_text,
    vae_from_ddconfig,
)
from .layouts import detect_layout, read_official_config

__all__ = [
    "DEFAULT_CFG",
    "DEFAULT_MAX_TEXT_TOKENS",
    "DEFAULT_STEPS",
    "POS_EMBED_PIXELS",
    "SUPPORTED_SIZES",
    "T2I_CLASS",
    "HeadConfig",
    "Qwen3Config",
    "T2IConfig",
    "check_resolution",
    "supported_sizes_text",
    "vae_from_ddconfig",
    "read_checkpoint_config",
    "read_official_config",
]


def read_checkpoint_config(
    directory: str | Path, height: int, width: int, max_text_tokens: int = DEFAULT_MAX_TEXT_TOKENS
) -> T2IConfig:
    """The T2IConfig of a text-to-image checkpoint at one resolution (checked first): an official
    directory, or any other layout t2i/layouts.py detects from the path."""
    check_resolution(height, width)
    return detect_layout(directory).config(height, width, max_text_tokens)

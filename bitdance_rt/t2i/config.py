"""Text-to-image configuration read from an official checkpoint directory.

The config dataclasses (T2IConfig, Qwen3Config, HeadConfig, ...) live in bitdance_rt.t2i_config,
the config layer that bitdance_rt.models may import; they are re-exported here, so
`from bitdance_rt.t2i.config import T2IConfig` keeps working. What is left here reads files.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from ..t2i_config import (DEFAULT_CFG, DEFAULT_MAX_TEXT_TOKENS, DEFAULT_STEPS, POS_EMBED_PIXELS, SUPPORTED_SIZES,
                          T2I_CLASS, HeadConfig, Qwen3Config, T2IConfig, check_resolution, supported_sizes_text,
                          vae_from_ddconfig)

__all__ = ["DEFAULT_CFG", "DEFAULT_MAX_TEXT_TOKENS", "DEFAULT_STEPS", "POS_EMBED_PIXELS", "SUPPORTED_SIZES",
           "T2I_CLASS", "HeadConfig", "Qwen3Config", "T2IConfig", "check_resolution", "supported_sizes_text",
           "vae_from_ddconfig", "read_checkpoint_config"]


def _read_json(path: Path, what: str) -> dict:
    from ..checkpoint import require_file

    require_file(path, what)
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{what} {path}: not readable JSON ({exc})") from None


def read_checkpoint_config(directory: str | Path, height: int, width: int,
                           max_text_tokens: int = DEFAULT_MAX_TEXT_TOKENS) -> T2IConfig:
    """The T2IConfig of an official checkpoint directory at one resolution (checked first)."""
    check_resolution(height, width)
    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(f"text-to-image checkpoint directory not found: {d} (the BitDance-14B-16x/-64x "
                          "download: config.json, model*.safetensors, tokenizer.json, ae.safetensors, "
                          "ae_config.json, vision_head.safetensors, vision_head_config.json, projector.safetensors)")
    llm = Qwen3Config.from_json_dict(_read_json(d / "config.json", "Qwen3 LLM config"), str(d / "config.json"))
    head = HeadConfig.from_json_dict(_read_json(d / "vision_head_config.json", "vision head config"),
                                     str(d / "vision_head_config.json"))
    ae = _read_json(d / "ae_config.json", "autoencoder config")
    if ae.get("gan_decoder", False):
        raise ConfigError(f"{d / 'ae_config.json'}: gan_decoder=true is not supported")
    vae = vae_from_ddconfig(ae.get("ddconfig"), str(d / "ae_config.json"))
    name = f"{d.name or 'bitdance-t2i'}"
    return T2IConfig(name=name, llm=llm, head=head, vae=vae, height=int(height), width=int(width),
                     max_text_tokens=int(max_text_tokens)).validate()

"""The official layout: a directory with config.json, the BitDance-14B-16x / -64x download.

config.json + tokenizer.json + model.safetensors (or model.safetensors.index.json and its shards),
ae_config.json + ae.safetensors, vision_head_config.json + vision_head.safetensors,
projector.safetensors. (ImageNet models stay single .pt / .safetensors files: loading.py.)
"""

from __future__ import annotations

from pathlib import Path

from ..t2i_config import DEFAULT_MAX_TEXT_TOKENS, HeadConfig, Qwen3Config, check_resolution
from .layout_base import (
    LLM_INDEX,
    LLM_SINGLE,
    OFFICIAL,
    Layout,
    _autoencoder,
    _checked_header,
    _llm_key,
    _same,
    indexed_files,
    read_json,
    require_file,
)
from .safetensors_header import WeightFile, read_header

# official file -> part of its keys
PART_FILES = {"vision_head.safetensors": "head.", "projector.safetensors": "projector.", "ae.safetensors": "vae."}


class OfficialLayout(Layout):
    kind, identity_prefix = OFFICIAL, "t2i-dir"

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer.json"

    def config(self, height, width, max_text_tokens=DEFAULT_MAX_TEXT_TOKENS):
        check_resolution(height, width)
        d = self.path
        llm = Qwen3Config.from_json_dict(read_json(d / "config.json", "Qwen3 LLM config"), str(d / "config.json"))
        head = HeadConfig.from_json_dict(
            read_json(d / "vision_head_config.json", "vision head config"), str(d / "vision_head_config.json")
        )
        return self._t2i(llm, head, _autoencoder(d / "ae_config.json"), height, width, max_text_tokens)

    def _llm(self):
        return indexed_files(self.path, LLM_SINGLE, LLM_INDEX, "LLM weight")

    def weight_files(self):
        plan = [
            WeightFile.mapped(path, path.name, "model.", _checked_header(path, keys), _llm_key)
            for path, keys in self._llm()
        ]
        for name, part in PART_FILES.items():
            path = require_file(self.path / name, name.split(".")[0].replace("_", " ") + " weights")
            plan.append(WeightFile.mapped(path, name, part, read_header(path), _same))
        return plan

    def identity_files(self):
        names = [
            "config.json",
            "tokenizer.json",
            "ae_config.json",
            "vision_head_config.json",
            *PART_FILES,
            *(p.name for p, _ in self._llm()),
            *([LLM_INDEX] if (self.path / LLM_INDEX).is_file() else []),
        ]
        return [(n, self.path / n) for n in names]

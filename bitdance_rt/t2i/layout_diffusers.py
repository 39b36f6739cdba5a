"""The diffusers layout: a directory with model_index.json, the community port
github.com/Bili-Sakura/BitDance (src/bitdance_diffusers, written by its convert.py through
DiffusionPipeline.save_pretrained).

text_encoder/ is a transformers Qwen3ForCausalLM (config.json, model.safetensors or
model.safetensors.index.json + shards: the official LLM keys); tokenizer/tokenizer.json;
autoencoder/ (config.json {"ddconfig", "gan_decoder"}), diffusion_head/ (config.json: the
vision_head_config.json arguments) and projector/ (config.json {"in_dim", "out_dim", "hidden_act"})
each hold diffusion_pytorch_model.safetensors (or its .index.json + shards) with the keys of
ae.safetensors / vision_head.safetensors / projector.safetensors, which the converter loads strictly.
diffusers' own config entries ("_class_name", ...) are dropped. The port's ImageNet models are on the
Hub only: no public code shows their layout, so they are not read here.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError, ConfigError
from ..t2i_config import DEFAULT_MAX_TEXT_TOKENS, HeadConfig, Qwen3Config, check_resolution
from .layout_base import (
    DIFFUSERS,
    LLM_INDEX,
    LLM_SINGLE,
    PARTS,
    Layout,
    _autoencoder,
    _checked_header,
    _llm_key,
    _same,
    _without_diffusers_keys,
    indexed_files,
    read_json,
)
from .safetensors_header import WeightFile

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
# diffusers component folder -> part; the text encoder and tokenizer are transformers folders
DIFFUSERS_PARTS = {"diffusion_head": "head.", "projector": "projector.", "autoencoder": "vae."}
DIFFUSERS_COMPONENTS = ("text_encoder", "tokenizer", *DIFFUSERS_PARTS)


class DiffusersLayout(Layout):
    kind, identity_prefix = DIFFUSERS, "t2i-diffusers"

    def __init__(self, path: Path):
        super().__init__(path)
        index = read_json(self.path / "model_index.json", "diffusers pipeline index")
        missing = [c for c in DIFFUSERS_COMPONENTS if c not in index]
        if missing:
            raise CheckpointError(
                f"{self.path / 'model_index.json'}: not a BitDance pipeline: no {', '.join(missing)} "
                f"(BitDance's has {', '.join(DIFFUSERS_COMPONENTS)})"
            )

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer" / "tokenizer.json"

    def _config(self, component: str, what: str) -> dict:
        return read_json(self.path / component / "config.json", what)

    def config(self, height, width, max_text_tokens=DEFAULT_MAX_TEXT_TOKENS):
        check_resolution(height, width)
        d = self.path
        llm = Qwen3Config.from_json_dict(
            self._config("text_encoder", "Qwen3 LLM config"), str(d / "text_encoder" / "config.json")
        )
        head = HeadConfig.from_json_dict(
            _without_diffusers_keys(self._config("diffusion_head", "vision head config")),
            str(d / "diffusion_head" / "config.json"),
        )
        vae = _autoencoder(d / "autoencoder" / "config.json")
        proj = self._config("projector", "projector config")
        act = proj.get("hidden_act", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise ConfigError(
                f"{d / 'projector' / 'config.json'}: hidden_act {act!r}: BitDance's projector uses gelu_pytorch_tanh"
            )
        return self._t2i(llm, head, vae, height, width, max_text_tokens)

    def _parts(self):
        yield "text_encoder", "model.", LLM_SINGLE, LLM_INDEX, "LLM weight"
        for component, part in DIFFUSERS_PARTS.items():
            yield component, part, DIFFUSERS_WEIGHTS, DIFFUSERS_WEIGHTS + ".index.json", f"{PARTS[part]} weight"

    def weight_files(self):
        plan = []
        for component, part, single, index, what in self._parts():
            rename = _llm_key if part == "model." else _same
            for path, keys in indexed_files(self.path / component, single, index, what):
                plan.append(
                    WeightFile.mapped(path, f"{component}/{path.name}", part, _checked_header(path, keys), rename)
                )
        return plan

    def identity_files(self):
        files = [("model_index.json", self.path / "model_index.json"), ("tokenizer/tokenizer.json", self.tokenizer)]
        for component, _, single, index, what in self._parts():
            d = self.path / component
            files.append((f"{component}/config.json", d / "config.json"))
            files += [(f"{component}/{p.name}", p) for p, _ in indexed_files(d, single, index, what)]
            if (d / index).is_file():
                files.append((f"{component}/{index}", d / index))
        return files

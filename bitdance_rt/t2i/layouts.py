"""Text-to-image checkpoint layouts, detected from the path; one loader (t2i/loading.py) reads them all.

Each layout maps its files, key names and configs onto what the loader builds: BitDanceT2I's state
dict (the Qwen3 backbone `model.*`, `head.*`, `projector.*`, `vae.*`), a T2IConfig, and the
tokenizer.json the prompts are encoded with. So export, backends and manifests do not know which
layout the weights came from; only the weight identity (`identity()`, for export manifests) covers
the files of the layout actually read. Weights are read tensor by tensor from memory-mapped
safetensors; headers are parsed without reading any tensor. Missing files are one CheckpointError
naming the file.

The layouts, each in its module: official (layout_official.py), diffusers (layout_diffusers.py),
comfyui (layout_comfyui.py); what they share is layout_base.py and safetensors_header.py. This module
detects which one a path is, and keeps every name importable from `bitdance_rt.t2i.layouts`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import CheckpointError, ConfigError
from ..t2i_config import DEFAULT_MAX_TEXT_TOKENS, T2IConfig
from .layout_base import (
    COMFYUI,
    DIFFUSERS,
    LLM_INDEX,
    LLM_SINGLE,
    OFFICIAL,
    PARTS,
    SKIPPED_PREFIXES,
    Layout,
    indexed_files,
    read_json,
    require_file,
)  # noqa: F401
from .layout_comfyui import (
    COMFY_AUX,
    COMFY_DEFAULTS,
    COMFY_FOLDERS,
    COMFY_HEAD_PREFIXES,
    COMFY_PROJECTOR_PREFIXES,
    COMFY_ROLES,
    COMFY_SCALE_SUFFIXES,
    COMFY_TEXT_PREFIXES,
    COMFY_VAE_PREFIXES,
    ComfyUILayout,
    _role_of,
    comfy_from_file,
    comfy_in_dir,
    comfy_role,
)  # noqa: F401
from .layout_diffusers import DIFFUSERS_COMPONENTS, DIFFUSERS_PARTS, DIFFUSERS_WEIGHTS, DiffusersLayout  # noqa: F401
from .layout_official import PART_FILES, OfficialLayout  # noqa: F401
from .safetensors_header import FP8_DTYPES, WeightFile, read_header, scale_candidates  # noqa: F401


def read_official_config(
    directory: str | Path, height: int, width: int, max_text_tokens: int = DEFAULT_MAX_TEXT_TOKENS
) -> T2IConfig:
    """The T2IConfig of an official checkpoint directory (config.json, vision_head_config.json, ae_config.json)."""
    return OfficialLayout(Path(directory)).config(height, width, max_text_tokens)


def detect_layout(path: str | Path) -> Layout:
    """The layout of a text-to-image checkpoint path (see the module docstring)."""
    p = Path(path)
    if p.is_dir():
        if (p / "model_index.json").is_file():
            return DiffusersLayout(p)
        # an official directory holds no main-model file (its vision head and projector are two files)
        return comfy_in_dir(p) or OfficialLayout(p)  # the official layout names the files it lacks
    if p.is_file():
        found = comfy_from_file(p)
        if found is not None:
            return found
        raise CheckpointError(
            f"{p}: not a text-to-image checkpoint: give an official or diffusers checkpoint "
            "directory, or a ComfyUI BitDance main-model .safetensors file"
        )
    raise ConfigError(
        f"text-to-image checkpoint not found: {p} (the BitDance-14B-16x / -64x directory, its "
        "diffusers conversion (model_index.json), or the ComfyUI BitDance files)"
    )


def is_t2i_checkpoint(path) -> bool:
    """Whether --checkpoint names a text-to-image model: a directory, or a ComfyUI main-model file
    (ImageNet weights are single .pt / .safetensors files)."""
    if path is None:
        return False
    p = Path(path)
    return p.is_dir() or (p.is_file() and p.suffix == ".safetensors" and _role_of(p) == "main")


def tokenizer_file(path) -> Path:
    """The tokenizer.json of a checkpoint path, whatever its layout."""
    return detect_layout(path).tokenizer


def warn_unscaled(files: list[WeightFile]) -> None:
    """One line when FP8 weights came without scale tensors (cast as stored, as the node does)."""
    bad = [wf for wf in files if wf.unscaled]
    if bad:
        n = sum(len(wf.unscaled) for wf in bad)
        print(
            f"bitdance-rt: warning: {n} FP8 tensor(s) in {', '.join(sorted({wf.name for wf in bad}))} have no "
            "scale tensors: cast to float without scales (quality may suffer)",
            file=sys.stderr,
        )

"""Load an official text-to-image checkpoint directory into a BitDanceT2I model + prompt encoder.

Files (official README / modeling/t2i_pipeline.py): config.json + tokenizer.json + the Qwen3
weights (model.safetensors, or shards listed in model.safetensors.index.json), ae_config.json +
ae.safetensors, vision_head_config.json + vision_head.safetensors, projector.safetensors.
Everything is checked before any weight is read: a missing file or shard, a key set or shape
that does not fit the configs, each is one error naming the file and key. The LM head
(`lm_head.weight`) is not needed for images and is skipped. Weights are read with safetensors
(no pickle) and converted to `dtype` (float32: the reference precision).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import check_fit, require_file
from ..fileio import cached_sha256
from ..errors import CheckpointError
from ..models.t2i import BitDanceT2I
from ..t2i_config import T2IConfig
from .config import read_checkpoint_config
from .prompt import PromptEncoder

LLM_INDEX = "model.safetensors.index.json"
LLM_SINGLE = "model.safetensors"
SKIPPED_PREFIXES = ("lm_head.",)
# file -> prefix of its keys in BitDanceT2I's state dict
PART_FILES = {"vision_head.safetensors": "head.", "projector.safetensors": "projector.", "ae.safetensors": "vae."}


@dataclass
class LoadedT2I:
    model: BitDanceT2I
    prompts: PromptEncoder
    source: str


def llm_files(directory: Path) -> dict[str, list[str]]:
    """{shard file: [keys]} of the Qwen3 weights; every shard named by the index must exist."""
    index = directory / LLM_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            raise CheckpointError(f"{index}: not a safetensors index (expected a JSON object with 'weight_map')") from None
        shards: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            shards.setdefault(str(shard), []).append(key)
        for shard in shards:
            require_file(directory / shard, f"LLM weight shard (listed in {index.name})")
        return shards
    if (directory / LLM_SINGLE).is_file():
        return {LLM_SINGLE: []}
    raise CheckpointError(f"{directory}: no LLM weights: expected {LLM_INDEX} (sharded) or {LLM_SINGLE}")


def _open(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable .safetensors file ({exc})") from None


def _shapes_of(path: Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Meta tensors with the shapes stored in `path` (no data read)."""
    with _open(path) as f:
        names = list(f.keys())
        if keys:
            absent = sorted(set(keys) - set(names))
            if absent:
                raise CheckpointError(f"{path}: lacks key(s) {', '.join(absent[:3])} that the index maps to it")
        return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in names}


def _weights_plan(directory: Path) -> list[tuple[Path, str, dict]]:
    """[(file, prefix, {key: meta tensor})] for every weight file, LLM shards first."""
    plan = [(directory / shard, "model.", _shapes_of(directory / shard, keys or None))
            for shard, keys in llm_files(directory).items()]
    for name, prefix in PART_FILES.items():
        plan.append((require_file(directory / name, name.split(".")[0].replace("_", " ") + " weights"), prefix,
                     _shapes_of(directory / name)))
    return plan


def checkpoint_dir_source(directory: str | Path) -> str:
    """Identity of the weights for export manifests: sha256 over every file the model reads
    (each file's digest memoised by (path, size, mtime) in the hash cache, fileio.cached_sha256)."""
    d = Path(directory)
    names = sorted(["config.json", "tokenizer.json", "ae_config.json", "vision_head_config.json", *PART_FILES,
                    *llm_files(d), *([LLM_INDEX] if (d / LLM_INDEX).is_file() else [])])
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}:{cached_sha256(require_file(d / name, name))}\n".encode())
    return f"t2i-dir sha256:{digest.hexdigest()}"


def load_t2i(directory: str | Path, height: int, width: int, max_text_tokens: int | None = None,
             dtype: torch.dtype = torch.float32, config: T2IConfig | None = None) -> LoadedT2I:
    d = Path(directory)
    cfg = config or read_checkpoint_config(d, height, width, **({} if max_text_tokens is None else
                                                               {"max_text_tokens": max_text_tokens}))
    prompts = PromptEncoder(d / "tokenizer.json", cfg)
    prompts.image_tokens()  # a tokenizer without the BitDance tokens fails here, before the weights
    plan = _weights_plan(d)
    with torch.device("meta"):
        model = BitDanceT2I(cfg)
    parts = {"model.": (model.model, "Qwen3 LLM"), "head.": (model.head, "vision head"),
             "projector.": (model.projector, "projector"), "vae.": (model.vae, "autoencoder")}
    for prefix, (module, what) in parts.items():
        shapes = {}
        for path, pre, sd in plan:
            if pre != prefix:
                continue
            for k, v in sd.items():
                if prefix == "model.":
                    if k.startswith(SKIPPED_PREFIXES):
                        continue
                    if not k.startswith("model."):
                        raise CheckpointError(f"{path}: unexpected key {k} (Qwen3 weights are model.* and lm_head.*)")
                    k = k[len("model."):]
                shapes[k] = v
        source = ", ".join(sorted({p.name for p, pre, _ in plan if pre == prefix}))
        check_fit(module, shapes, source, f"{cfg.name} {what}", suggest_preset=False)
    state = {}
    for path, prefix, sd in plan:
        with _open(path) as f:
            for k in sd:
                if prefix == "model." and k.startswith(SKIPPED_PREFIXES):
                    continue
                name = k if prefix == "model." else prefix + k
                state[name] = f.get_tensor(k).to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_buffers()
    return LoadedT2I(model.eval(), prompts, f"{cfg.name} ({cfg.height}x{cfg.width}) from {d}")

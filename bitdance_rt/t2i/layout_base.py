"""What every text-to-image checkpoint layout shares: the Layout base class, the parts of
BitDanceT2I's state dict, and the JSON, index and key helpers the layouts read their files with.

A layout maps its files, key names and configs onto BitDanceT2I's state dict, a T2IConfig and the
tokenizer.json; only `identity()` (for export manifests) covers the files of the layout actually read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import CheckpointError, ConfigError
from ..config import VAEConfig
from ..t2i_config import DEFAULT_MAX_TEXT_TOKENS, T2IConfig, vae_from_ddconfig
from .safetensors_header import WeightFile, read_header

OFFICIAL, DIFFUSERS, COMFYUI = "official", "diffusers", "comfyui"
# part of BitDanceT2I's state dict -> what it is (messages)
PARTS = {"model.": "Qwen3 LLM", "head.": "vision head", "projector.": "projector", "vae.": "autoencoder"}

LLM_INDEX = "model.safetensors.index.json"
LLM_SINGLE = "model.safetensors"
SKIPPED_PREFIXES = ("lm_head.",)  # the LM head is not needed for images


def require_file(path: Path, what: str) -> Path:
    """checkpoint.require_file, imported when used (it imports torch; detecting a layout does not)."""
    from ..checkpoint import require_file as require

    return require(path, what)


def read_json(path: Path, what: str) -> dict:
    require_file(path, what)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{what} {path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: expected a JSON object")
    return data


def _autoencoder(path: Path) -> VAEConfig:
    """The autoencoder of an ae_config.json-like file {"ddconfig": {...}, "gan_decoder": false}."""
    ae = read_json(path, "autoencoder config")
    if ae.get("gan_decoder", False):
        raise ConfigError(f"{path}: gan_decoder=true is not supported")
    return vae_from_ddconfig(ae.get("ddconfig"), str(path))


def _without_diffusers_keys(data: dict) -> dict:
    """A diffusers config.json without diffusers' own entries (_class_name, _diffusers_version, ...)."""
    return {k: v for k, v in data.items() if not str(k).startswith("_")}


def indexed_files(directory: Path, single: str, index_name: str, what: str) -> list[tuple[Path, list[str]]]:
    """[(file, keys the index maps to it)] of one safetensors model: the shards its index names (each
    must exist), or the single file (keys: [])."""
    index = directory / index_name
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            raise CheckpointError(
                f"{index}: not a safetensors index (expected a JSON object with 'weight_map')"
            ) from None
        shards: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            shards.setdefault(str(shard), []).append(key)
        for shard in shards:
            require_file(directory / shard, f"{what} shard (listed in {index.name})")
        return [(directory / shard, keys) for shard, keys in shards.items()]
    if (directory / single).is_file():
        return [(directory / single, [])]
    raise CheckpointError(f"{directory}: no {what}s: expected {index_name} (sharded) or {single}")


def _checked_header(path: Path, keys: list[str]) -> dict:
    header = read_header(path)
    absent = sorted(set(keys) - set(header))
    if absent:
        raise CheckpointError(f"{path}: lacks key(s) {', '.join(absent[:3])} that the index maps to it")
    return header


def _llm_key(key: str) -> str | None:
    """Qwen3ForCausalLM key -> Qwen3Model key (the backbone); None for the LM head. Other keys are kept
    as they are, so the fit check names them as unexpected."""
    if key.startswith(SKIPPED_PREFIXES):
        return None
    return key[len("model.") :] if key.startswith("model.") else key


def _same(key: str) -> str:
    return key


class Layout:
    """A text-to-image checkpoint: where its config, tokenizer and weights are."""

    kind = ""
    identity_prefix = ""

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else (self.path.name or "bitdance-t2i")

    @property
    def tokenizer(self) -> Path:
        raise NotImplementedError

    def config(self, height: int, width: int, max_text_tokens: int = DEFAULT_MAX_TEXT_TOKENS) -> T2IConfig:
        raise NotImplementedError

    def weight_files(self) -> list[WeightFile]:
        """Every weights file, LLM first; all checked to exist and be readable before any tensor is read."""
        raise NotImplementedError

    def identity_files(self) -> list[tuple[str, Path]]:
        """(name, path) of every file the model reads: configs, tokenizer, weights and their indexes."""
        raise NotImplementedError

    def identity(self) -> str:
        """Identity of the weights for export manifests: sha256 over every file the model reads (each
        file's digest memoised by (path, size, mtime) in the hash cache, fileio.cached_sha256)."""
        from ..fileio import cached_sha256

        digest = hashlib.sha256()
        for name, path in sorted(self.identity_files()):
            digest.update(f"{name}:{cached_sha256(require_file(path, name))}\n".encode())
        return f"{self.identity_prefix} sha256:{digest.hexdigest()}"

    def _t2i(self, llm, head, vae, height, width, max_text_tokens) -> T2IConfig:
        return T2IConfig(
            name=self.name,
            llm=llm,
            head=head,
            vae=vae,
            height=int(height),
            width=int(width),
            max_text_tokens=int(max_text_tokens),
        ).validate()

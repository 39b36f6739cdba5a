"""manifest.json of an export directory: what was exported, from what, and the file hashes.

The manifest is written last (atomically), so a directory with a valid manifest whose files
hash as recorded is a complete export. Its `key` decides reuse: the same checkpoint, config,
stage list, opset, sampler steps and limits give the same key, and the export is not redone.
Everything that reads an export directory (the backends, engine builds, Triton) opens it with
export/reader.py open_export, which validates it with the functions here.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..fileio import atomic_write, cached_sha256
from ..config import ModelConfig
from ..errors import BitDanceError
from ..manifest_file import read_manifest_file
from ..stages import CONTRACT_VERSION, Limits, StageSpec, stage_specs

MANIFEST = "manifest.json"
FORMAT = f"bitdance-rt-onnx/{CONTRACT_VERSION}"  # an export of an older stage contract is re-exported
# ONNX opsets of an export (its key records the one used); here, not in onnx_export.py, so that torch-free
# readers (the CLI's --help, the plan) name them without importing torch.
MIN_OPSET, MAX_OPSET = 17, 20  # TensorRT 10.3 parses opsets up to 20
DEFAULT_OPSET = 17


def manifest_key(cfg: ModelConfig, source: str, stages, opset: int, steps: int | None, limits: Limits) -> dict:
    return {
        "format": FORMAT,
        "checkpoint": source,
        "config": cfg.to_json_dict(),
        "stages": sorted(stages),
        "opset": opset,
        "sampler_steps": steps,
        "limits": limits.to_json(),
    }


def write_manifest(directory: Path, manifest: dict) -> Path:
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    path = atomic_write(Path(directory) / MANIFEST, lambda tmp: Path(tmp).write_text(text))
    path.chmod(0o644)  # mkstemp made it private; the export is meant to be shared like the .onnx files
    return path


def read_manifest(directory: str | Path) -> dict:
    return read_manifest_file(
        directory, MANIFEST, FORMAT, "export directory", f"re-export it with `bitdance-rt export --out {directory}`"
    )


def manifest_config(manifest: dict, directory: Path) -> ModelConfig:
    from ..t2i_config import T2I_CLASS, T2IConfig

    try:
        data = manifest["key"]["config"]
        kind = T2IConfig if isinstance(data, dict) and data.get("model_class") == T2I_CLASS else ModelConfig
        return kind.from_json_dict(data, source=str(Path(directory) / MANIFEST))
    except KeyError:
        raise BitDanceError(f"{Path(directory) / MANIFEST}: has no config; re-export {directory}") from None


def manifest_specs(manifest: dict, directory: Path) -> dict[str, StageSpec]:
    """The stage contracts, checked against the ones this version derives from the config."""
    key = manifest["key"]
    cfg = manifest_config(manifest, directory)
    try:
        stored = {name: StageSpec.from_json(s) for name, s in manifest["stages"].items()}
        expected = stage_specs(cfg, key["stages"], key["sampler_steps"], Limits.from_json(key["limits"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise BitDanceError(
            f"{Path(directory) / MANIFEST}: malformed stage contract ({exc}); re-export {directory}"
        ) from None
    if stored != expected or sorted(stored) != key["stages"]:
        raise BitDanceError(
            f"{Path(directory) / MANIFEST}: its stage contracts differ from this bitdance-rt's for the same "
            f"config (written by another version?); re-export {directory}"
        )
    return stored


def verify_files(directory: str | Path, manifest: dict, hashes: bool = True) -> None:
    """Every listed file exists with the recorded size (and sha256): else a one-line error.

    The sha256 comes from the hash cache (fileio.cached_sha256): a file unchanged since it was last
    hashed (same path, size, mtime, inode) is not read again."""
    directory = Path(directory)
    for name, info in sorted(manifest.get("files", {}).items()):
        path = directory / name
        if not path.is_file():
            raise BitDanceError(f"{path} is missing from the export; re-export {directory}")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise BitDanceError(
                f"{path} has {size} bytes, the manifest records {info['bytes']} (truncated or replaced); "
                f"re-export {directory}"
            )
        if hashes and cached_sha256(path) != info["sha256"]:
            raise BitDanceError(
                f"{path} does not match the sha256 in {directory / MANIFEST} (corrupt, or from another export); "
                f"re-export {directory}"
            )


def stage_files(manifest: dict, directory: Path, stage: str) -> list[str]:
    """File names of a stage (the .onnx first, then its external data, if any)."""
    try:
        files = [str(f) for f in manifest["stage_files"][stage]]
    except (KeyError, TypeError):
        files = []
    if not files or any(f not in manifest.get("files", {}) for f in files):
        raise BitDanceError(f"{Path(directory) / MANIFEST}: no files recorded for stage {stage}; re-export {directory}")
    return files

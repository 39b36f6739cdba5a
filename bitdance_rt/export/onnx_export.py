"""Whole exports: one ONNX graph per stage of the contract (stage_graph.py), a manifest and a cache.

Files are written to a temporary directory next to the export and moved in with
os.replace; the manifest goes last, so an interrupted export is never mistaken for a complete
one. The temporary directory is locked while in use (fileio.make_work_dir): one left by a killed
export is removed by the next export or reuse in the same parent directory. An export directory
whose manifest key (checkpoint, config, stages, opset, S, limits) matches and whose files hash as
recorded is reused as is. Write failures (a full disk) are one-line BitDanceErrors naming the file.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .._version import __version__
from ..checkpoint import file_sha256, require_file
from ..fileio import WorkDir, cached_sha256, make_work_dir, older_than, os_error_text, sweep_work_dirs
from ..config import ModelConfig, load_config
from ..errors import BitDanceError
from ..models import BitDance
from ..stages import ALL_STAGES, SAMPLER_STAGES, Limits, stage_specs
from .shared_weights import share_weights
from .manifest import (
    DEFAULT_OPSET,
    MANIFEST,
    MAX_OPSET,
    MIN_OPSET,
    manifest_key,
    manifest_specs,
    read_manifest,
    verify_files,
    write_manifest,
)
from .stage_graph import EXTERNAL_DATA_BYTES, export_stage


@dataclass
class ExportResult:
    directory: Path
    manifest: dict
    reused: bool


def checkpoint_source(checkpoint: str | Path, vae: str | Path | None = None) -> str:
    """The weights' identity for the manifest: sha256 of the checkpoint (and of the VAE file).

    Memoised by (path, size, mtime) in the hash cache (fileio.cached_sha256): a second run does not
    re-read a multi-GB checkpoint."""
    source = f"sha256:{cached_sha256(require_file(checkpoint))}"
    return source + (f" vae sha256:{cached_sha256(require_file(vae, 'vae file'))}" if vae else "")


def random_source(seed: int) -> str:
    return f"random-init seed {seed}"


# ---- work directories -------------------------------------------------------------------
# tempfile names: 8 characters of [a-z0-9_]; exports `.<name>.export-XXXXXXXX`, variants `.<name>.<precision>-...`
_UNLOCKED_WORK = re.compile(r"^\..+\.(export|fp16|int8)-[a-z0-9_]{8}$")


def _unlocked_leftover(p: Path) -> bool:
    """A work directory of an older bitdance-rt (no lock file) untouched for a day: litter."""
    return bool(_UNLOCKED_WORK.match(p.name)) and older_than(p)


def export_work_dir(parent: Path, prefix: str) -> WorkDir:
    """A locked work directory for an export or precision variant, after sweeping dead ones."""
    return make_work_dir(parent, prefix, legacy=_unlocked_leftover)


def sweep_exports(parent: str | Path) -> list[Path]:
    """Remove work directories of killed exports in `parent` (live ones stay): see fileio.sweep_work_dirs."""
    return sweep_work_dirs(parent, legacy=_unlocked_leftover)


def write_error(exc: OSError, what: str, where: Path) -> BitDanceError:
    """A full disk (ENOSPC), quota or read-only file system while writing: one line naming the file."""
    return BitDanceError(
        f"cannot write {what} in {where} ({os_error_text(exc)}); free disk space or "
        "choose another directory (--out / --export-dir, or $BITDANCE_RT_CACHE)"
    )


# ---- whole exports ----------------------------------------------------------------------
def _check_args(stages, opset: int, steps) -> tuple[list[str], int | None]:
    stages = list(dict.fromkeys(stages))
    unknown = [s for s in stages if s not in ALL_STAGES]
    if unknown or not stages:
        raise BitDanceError(f"unknown stage(s) {unknown or '(none given)'}: choose from {', '.join(ALL_STAGES)}")
    if not (isinstance(opset, int) and MIN_OPSET <= opset <= MAX_OPSET):
        raise BitDanceError(f"opset {opset!r} not supported: use {MIN_OPSET}..{MAX_OPSET} (TensorRT 10.3 reads <= 20)")
    if not any(s in SAMPLER_STAGES for s in stages):
        steps = None
    return stages, steps


def find_reusable(directory: str | Path, key: dict) -> dict | None:
    """The manifest of `directory` if it is a complete export with exactly this key (and the stage
    contracts this version derives: an export written by an older bitdance-rt is redone, not used)."""
    try:
        manifest = read_manifest(directory)
        if manifest["key"] != json.loads(json.dumps(key)):
            return None
        manifest_specs(manifest, Path(directory))
        verify_files(directory, manifest, hashes=True)
    except (BitDanceError, KeyError, TypeError):
        return None
    sweep_exports(Path(directory).parent)  # a run that only reads the cache cleans up killed exports too
    return manifest


def export_stages(
    model: BitDance,
    out_dir: str | Path,
    source: str,
    stages=ALL_STAGES,
    opset: int = DEFAULT_OPSET,
    sampler_steps: int | None = None,
    limits: Limits = Limits(),
    force: bool = False,
    external_data_bytes: int = EXTERNAL_DATA_BYTES,
    progress: bool = True,
) -> ExportResult:
    """Export `stages` of `model` into out_dir (or reuse a matching export there).

    `source` names the weights (`checkpoint_source(...)` or `random_source(seed)`); it is part of
    the cache key, so exports of different checkpoints never mix. `sampler_steps` (S of the fused
    head samplers) defaults to the config's default steps.
    """
    cfg: ModelConfig = model.cfg
    model = model.eval()
    return write_export(
        cfg,
        out_dir,
        source,
        lambda spec, work: export_stage(model, spec, work, opset, external_data_bytes),
        stages,
        opset,
        sampler_steps,
        limits,
        force,
        progress,
    )


def write_export(
    cfg,
    out_dir: str | Path,
    source: str,
    write_stage,
    stages=ALL_STAGES,
    opset: int = DEFAULT_OPSET,
    sampler_steps: int | None = None,
    limits: Limits = Limits(),
    force: bool = False,
    progress: bool = True,
    key_extra: dict | None = None,
    manifest_extra: dict | None = None,
    what: str = "ONNX export",
) -> ExportResult:
    """The one export loop: reuse a matching export in out_dir, or call `write_stage(spec, work)` (the
    file names it wrote into the work directory) for each stage, share weights between graphs and
    install the files, manifest last. `key_extra` / `manifest_extra`: what a variant adds to the
    cache key (and so to reuse) and to the manifest."""
    out_dir = Path(out_dir)
    steps = cfg.default_steps if sampler_steps is None else sampler_steps
    stages, steps = _check_args(stages, opset, steps)
    specs = stage_specs(cfg, stages, steps, limits)
    key = {**manifest_key(cfg, source, stages, opset, steps, limits), **(key_extra or {})}
    if not force and (manifest := find_reusable(out_dir, key)) is not None:
        return ExportResult(out_dir, manifest, True)
    import onnx

    try:
        workdir = export_work_dir(out_dir.parent, f".{out_dir.name}.export-")
    except OSError as exc:
        raise write_error(exc, "the ONNX export", out_dir.parent) from None
    work = workdir.path
    try:
        stage_files: dict[str, list[str]] = {}
        bar = tqdm(stages, desc=f"{what} of {cfg.name}", unit="stage", leave=False, disable=not progress)
        for name in bar:
            bar.set_postfix_str(name)
            stage_files[name] = write_stage(specs[name], work)
        stage_files = share_weights(work, stage_files)  # the head's net: once, for head_step and the sampler
        manifest = {
            "key": key,
            **(manifest_extra or {}),
            "stages": {name: specs[name].to_json() for name in stages},
            "versions": {"bitdance_rt": __version__, "torch": torch.__version__, "onnx": onnx.__version__},
        }
        return ExportResult(out_dir, install_export(work, out_dir, manifest, stage_files), False)
    except OSError as exc:
        raise write_error(exc, "the ONNX export", out_dir) from None
    finally:
        workdir.remove()


def install_export(work: Path, out_dir: Path, manifest: dict, stage_files: dict[str, list[str]]) -> dict:
    """Move the files of a finished export from `work` into `out_dir`, manifest last.

    The old manifest goes first, so a crash in between leaves a directory no reader trusts;
    files of a previous export that the new one does not list are removed. Returns the manifest
    (completed with the file list, hashes and creation time)."""
    files = {
        f: {"sha256": file_sha256(work / f), "bytes": (work / f).stat().st_size}
        for names in stage_files.values()
        for f in names
    }
    manifest = {**manifest, "stage_files": stage_files, "files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out_dir.mkdir(parents=True, exist_ok=True)
    old = _old_files(out_dir)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # from here on the directory is incomplete
    for f in files:
        os.replace(work / f, out_dir / f)
    for f in old - set(files):
        (out_dir / f).unlink(missing_ok=True)
    write_manifest(out_dir, manifest)
    return manifest


def _old_files(directory: Path) -> set[str]:
    """Files a previous export in `directory` listed (they are replaced or removed)."""
    try:
        return set(read_manifest(directory).get("files", {}))
    except BitDanceError:
        return set()


def export_files(
    model: str | Path | ModelConfig,
    checkpoint: str | Path,
    out_dir: str | Path,
    vae: str | Path | None = None,
    allow_pickle: bool = False,
    **options,
) -> ExportResult:
    """Export from a config + checkpoint; hashes the files first and loads the weights only when
    the export directory does not already hold a matching export."""
    from ..loading import load_model

    cfg = model if isinstance(model, ModelConfig) else load_config(model)
    source = checkpoint_source(checkpoint, vae)
    if not options.get("force", False):
        steps = options.get("sampler_steps")
        steps = cfg.default_steps if steps is None else steps
        stages, steps = _check_args(options.get("stages", ALL_STAGES), options.get("opset", DEFAULT_OPSET), steps)
        key = manifest_key(
            cfg, source, stages, options.get("opset", DEFAULT_OPSET), steps, options.get("limits", Limits())
        )
        if (manifest := find_reusable(out_dir, key)) is not None:
            return ExportResult(Path(out_dir), manifest, True)
    loaded = load_model(cfg, checkpoint, vae, allow_pickle)
    return export_stages(loaded.model, out_dir, source, **options)

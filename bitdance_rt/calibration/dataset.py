"""A calibration set on disk: one .safetensors per stage plus `calibration.json`.

Layout of a set directory:
    calibration.json          what was captured, from which model and weights, on which backend and
                              export (the key's "producer", calibration/producer.py), and file hashes
    <stage>.safetensors       samples numbered 00000, 00001, ...: `{n}.in.{name}` / `{n}.out.{name}`

Inputs are stored under the contract's names (bitdance_rt.stages), but for a backbone sample's
cache, stored compact to keep sets small (`feed` rebuilds the contract's inputs). Outputs (float32)
are those of the backend the capture ran on: the torch reference's, or the FP32 / FP16 graphs' (the
key's producer says which). A set is written whole or not at all (`save_calibration`), and loading
checks it as strongly as an export (`load_calibration`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import stages as st
from ..checkpoint import file_sha256
from ..fileio import cached_sha256, make_work_dir, older_than, os_error_text, sweep_work_dirs
from ..config import TRAINING_ONLY_ARGS, ModelConfig
from ..errors import BitDanceError
from ..manifest_file import read_manifest_file

MANIFEST = "calibration.json"
FORMAT = f"bitdance-rt-calibration/{st.CONTRACT_VERSION}"  # samples follow the stage contract
CAPTURED_STAGES = st.CALIBRATED_STAGES
COMPACT_CACHE = "cache"  # stored name of the backbone's kv[:, :, :, :, :max(start)]
_WIDE = st.Limits(max_batch=1 << 20, opt_batch=1)  # validation: any batch the capture used


@dataclass
class Sample:
    """One recorded stage call: its inputs (contract names, compact cache) and reference outputs."""

    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


def config_of(data: dict):
    """The model config a set records: an ImageNet ModelConfig or a text-to-image T2IConfig."""
    from ..t2i_config import T2I_CLASS, T2IConfig

    kind = T2IConfig if isinstance(data, dict) and data.get("model_class") == T2I_CLASS else ModelConfig
    return kind.from_json_dict(data, source=MANIFEST)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy().copy(order="C")  # (np.ascontiguousarray makes 0-d arrays 1-d)


def sample_phase(stage: str, sample: Sample) -> str | None:
    """The phase of a sample of a stage with phases (the backbone: "prefill" at start 0, else "step").

    The backbone is one graph for two phases (stages.backbone_phases), so its samples come in two
    shapes: prefill calls (start 0, seq = prefix_len) first, then AR steps (seq = P); `start` tells
    them apart (the sizes alone coincide when prefix_len == P)."""
    if stage != st.BACKBONE:
        return None
    return "prefill" if int(sample.inputs["start"].max()) == 0 else "step"


def feed(cfg: ModelConfig, stage: str, sample: Sample) -> dict[str, np.ndarray]:
    """The sample as a graph of `stage` takes it: {contract input name: numpy array}.

    A backbone sample stores `cache` = kv[:, :, :, :, :max(start)] (the only cache positions a graph
    reads unmasked: none at the prefill); this rebuilds the contract's `cache.{i}.key` /
    `cache.{i}.value` [rows, n_head, L, head_dim] from it, zero past `start`."""
    if stage != st.BACKBONE:
        return {name: _np(t) for name, t in sample.inputs.items()}
    valid = sample.inputs[COMPACT_CACHE]
    start = int(sample.inputs["start"].max())  # positions past a row's start are masked in the graph
    full = torch.zeros(st.kv_shape(cfg, valid.shape[2]), dtype=torch.float32)
    full[:, :, :, :, :start] = valid
    out = {name: _np(t) for name, t in sample.inputs.items() if name != COMPACT_CACHE}  # x, start (, pad)
    for i, name in enumerate(st.cache_input_names(cfg)):
        out[name] = _np(full[i // 2, i % 2])
    return out


def contract(cfg: ModelConfig, steps: int) -> dict[str, st.StageSpec]:
    """The stage contracts a set is checked against (any batch size)."""
    return st.stage_specs(cfg, CAPTURED_STAGES, steps, _WIDE)


def _shapes(samples: list[Sample], part: str) -> dict[str, list[list[int]]]:
    found: dict[str, set] = {}
    for s in samples:
        for name, t in getattr(s, part).items():
            found.setdefault(name, set()).add(tuple(t.shape))
    return {name: [list(x) for x in sorted(shapes)] for name, shapes in sorted(found.items())}


@dataclass
class CalibrationSet:
    """Samples per stage plus the key saying what they were captured from."""

    # format, config, weights, labels (or prompts), seeds, steps, cfg_scale, cfg_schedule, batch_size, policy,
    # head_evaluations, producer (what ran the capture: producer.py)
    key: dict
    samples: dict[str, list[Sample]]
    candidates: dict[str, int] = field(default_factory=dict)  # calls seen per stage before subsampling
    directory: Path | None = None  # where it was loaded from, for messages
    phase_candidates: dict[str, dict[str, int]] = field(default_factory=dict)  # {stage: {phase: calls seen}}
    origin: dict = field(default_factory=dict)  # notes on the run outside the key (the export directory, ...)

    @property
    def producer(self) -> dict:
        """What the data was captured from: {backend, precision, export_key} (calibration/producer.py)."""
        from .producer import set_producer

        return set_producer(self.key)

    @property
    def config(self) -> ModelConfig:
        return config_of(self.key["config"])

    @property
    def steps(self) -> int:
        return int(self.key["steps"])

    def stage_specs(self) -> dict[str, st.StageSpec]:
        """The stage contracts of the set's own config and steps (any batch size): see `contract`."""
        return contract(self.config, self.steps)

    def phase_samples(self, stage: str, phase: str | None = None) -> list[Sample]:
        """`stage`'s samples, only those of `phase` when given (see sample_phase)."""
        samples = self.samples.get(stage, [])
        return samples if phase is None else [s for s in samples if sample_phase(stage, s) == phase]

    def phase_counts(self, stage: str) -> dict[str, int]:
        """{phase: samples} of a stage with phases (the backbone); {} for the others."""
        phases = self.stage_specs()[stage].phases
        return {p: len(self.phase_samples(stage, p)) for p in phases}

    def feeds(self, stage: str, phase: str | None = None):
        """Iterator of feed dicts (numpy, contract input names) for `stage` (of one `phase` when given)."""
        if stage not in CAPTURED_STAGES:
            raise BitDanceError(f"no calibration data for stage {stage!r}: sets hold {', '.join(CAPTURED_STAGES)}")
        cfg = self.config
        return (feed(cfg, stage, s) for s in self.phase_samples(stage, phase))

    def reader(self, stage: str, phase: str | None = None):
        """An onnxruntime.quantization CalibrationDataReader over `stage`'s feeds (see reader.py)."""
        from .reader import StageDataReader

        return StageDataReader(self, stage, phase=phase)

    def check_contract(self, where: str = "calibration set") -> None:
        """Every sample's inputs fit the stage contract of the set's own config and steps."""
        specs, cfg = self.stage_specs(), self.config
        for stage, samples in self.samples.items():
            spec = specs[stage]
            for n, s in enumerate(samples):
                try:
                    f = feed(cfg, stage, s)
                    if sorted(f) != sorted(spec.input_names):
                        raise BitDanceError(f"inputs {sorted(f)}, the contract wants {spec.input_names}")
                    known: dict = {}
                    for name in spec.input_names:
                        known = spec.match(name, f[name].shape, str(f[name].dtype), known)
                    phase = sample_phase(stage, s)
                    if phase is not None:  # the sizes of the phase its `start` says (and one phase per sample)
                        if phase == "step" and not f["start"].all():
                            raise BitDanceError("rows of the prefill (start 0) and of AR steps in one sample")
                        want = spec.phases[phase]
                        if any(known.get(sym) != v for sym, v in want.items()):
                            raise BitDanceError(
                                f"a {phase} sample needs {want}, got { {sym: known.get(sym) for sym in want} }"
                            )
                except (BitDanceError, KeyError, RuntimeError, ValueError) as exc:
                    raise BitDanceError(
                        f"{where}: {stage} sample {n} does not fit the stage contract ({exc}); capture it again"
                    ) from None

    def summary(self) -> dict:
        out = {
            stage: {
                "samples": len(s),
                "candidates": self.candidates.get(stage, len(s)),
                "inputs": _shapes(s, "inputs"),
                "outputs": _shapes(s, "outputs"),
            }
            for stage, s in self.samples.items()
        }
        for stage in out:
            counts = self.phase_counts(stage)
            if counts:
                seen = self.phase_candidates.get(stage, {})
                out[stage]["phases"] = {p: {"samples": n, "candidates": seen.get(p, n)} for p, n in counts.items()}
        return out


# ---- save --------------------------------------------------------------------------------
def _versions() -> dict:
    import safetensors

    from .._version import __version__

    return {"bitdance_rt": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__}


_UNLOCKED_WORK = re.compile(r"^\..+\.[a-z0-9_]{8}\.(tmp|old)$")  # tempfile names of older versions


def _unlocked_leftover(p: Path) -> bool:
    """A work directory of an older bitdance-rt (no lock file) untouched for a day: litter."""
    return bool(_UNLOCKED_WORK.match(p.name)) and older_than(p)


def _work_dir(directory: Path, suffix: str):
    return make_work_dir(directory.parent, f".{directory.name}.", suffix, legacy=_unlocked_leftover)


def save_calibration(cset: CalibrationSet, directory: str | Path, overwrite: bool = False) -> Path:
    """Write the set into `directory` (created whole, or not at all).

    The directory is written under a temporary name and renamed into place, so a set that exists is
    complete; the temporary directory is locked while in use (fileio.make_work_dir), so one left by a
    killed capture is removed by the next save or load in the same parent directory."""
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise BitDanceError(f"{directory} exists: choose another directory or pass overwrite=True")
    cset.check_contract()
    try:
        with _work_dir(directory, ".tmp") as work:
            _write_set(cset, directory, work)
    except OSError as exc:  # a full disk: one line naming the file, not a traceback
        raise BitDanceError(
            f"cannot write the calibration set {directory} ({os_error_text(exc)}); "
            "free disk space or choose another --out / $BITDANCE_RT_CACHE"
        ) from None
    return directory


def _write_set(cset: CalibrationSet, directory: Path, work) -> None:
    """Write the set into the locked work directory, then rename it onto `directory`."""
    from safetensors.torch import save_file

    tmp = work.path
    files, summary = {}, cset.summary()
    for stage in CAPTURED_STAGES:
        tensors = {}
        for n, s in enumerate(cset.samples.get(stage, [])):
            for part, named in (("in", s.inputs), ("out", s.outputs)):
                tensors.update(
                    {f"{n:05d}.{part}.{name}": t.detach().cpu().contiguous().clone() for name, t in named.items()}
                )
        path = tmp / f"{stage}.safetensors"
        save_file(tensors, str(path), metadata={"format": FORMAT, "stage": stage})
        path.chmod(0o644)  # shared like an export directory
        files[path.name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        summary.setdefault(stage, {"samples": 0, "candidates": 0, "inputs": {}, "outputs": {}})
        summary[stage]["file"] = path.name
    manifest = {"key": cset.key, "stages": summary, "files": files, "versions": _versions()}
    if cset.origin:
        manifest["capture"] = cset.origin
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    (tmp / MANIFEST).chmod(0o644)
    tmp.chmod(0o755)
    if directory.exists():
        with _work_dir(directory, ".old") as old:
            os.replace(directory, old.path / "set")
            work.unlock_file()  # the set keeps no lock file
            os.replace(tmp, directory)
    else:
        work.unlock_file()
        os.replace(tmp, directory)


# ---- load --------------------------------------------------------------------------------
def _architecture(config: dict) -> dict:
    """What decides the graphs and the trajectories: not the name, sampler defaults or training-only args."""
    args = {k: v for k, v in config.get("constructor_args", {}).items() if k not in TRAINING_ONLY_ARGS}
    return {"model_class": config.get("model_class"), **args, "vae": config.get("vae")}


def _config_diff(ours: dict, theirs: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(ours) | set(theirs)):
        a, b = ours.get(k), theirs.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} {a!r} vs {b!r}")
    return out


def check_identity(
    key: dict, where: Path, config: ModelConfig | None = None, weights: str | None = None, steps: int | None = None
) -> None:
    """Refuse a set captured from another model, other weights, or another sampler step count."""
    fix = f"capture a new set for this model and weights (bitdance-rt calibrate) instead of {where}"
    if config is not None:
        diff = _config_diff(_architecture(key["config"]), _architecture(config.to_json_dict()))
        if diff:
            shown = ", ".join(diff[:4]) + (f", ... (+{len(diff) - 4} more)" if len(diff) > 4 else "")
            raise BitDanceError(
                f"{where / MANIFEST} was captured for model {key['config'].get('name')!r}, "
                f"another model config than {config.name!r} (set vs expected: {shown}); {fix}"
            )
    if weights is not None and weights != key["weights"]:
        raise BitDanceError(f"{where / MANIFEST} was captured with weights {key['weights']}, not {weights}; {fix}")
    if steps is not None and int(steps) != int(key["steps"]):
        raise BitDanceError(
            f"{where / MANIFEST} was captured with {key['steps']} sampler steps, not {steps} "
            f"(the fused head sampler bakes S in); {fix}"
        )


def _read_manifest(directory: Path) -> dict:
    return read_manifest_file(
        directory, MANIFEST, FORMAT, "calibration set", f"capture it with `bitdance-rt calibrate --out {directory}`"
    )


def _verify_file(directory: Path, name: str, info: dict, hashes: bool) -> Path:
    path = directory / name
    if not path.is_file():
        raise BitDanceError(f"{path} is missing from the calibration set; capture it again")
    if path.stat().st_size != info["bytes"]:
        raise BitDanceError(
            f"{path} has {path.stat().st_size} bytes, {MANIFEST} records {info['bytes']} "
            "(truncated or replaced); capture the set again"
        )
    if hashes and cached_sha256(path) != info["sha256"]:  # memoised by (path, size, mtime)
        raise BitDanceError(f"{path} does not match the sha256 in {MANIFEST} (corrupt); capture the set again")
    return path


def _read_samples(path: Path, count: int) -> list[Sample]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BitDanceError(f"{path}: unreadable .safetensors file ({exc}); capture the set again") from None
    samples = [Sample({}, {}) for _ in range(count)]
    for key, t in tensors.items():
        try:
            n, part, name = key.split(".", 2)
            target = samples[int(n)].inputs if part == "in" else samples[int(n)].outputs
        except (ValueError, IndexError):
            raise BitDanceError(
                f"{path}: unexpected tensor {key!r} (expected {count} samples "
                "named 00000.in.NAME ...); capture the set again"
            ) from None
        target[name] = t
    return samples


def load_calibration(
    directory: str | Path,
    config: ModelConfig | None = None,
    weights: str | None = None,
    steps: int | None = None,
    hashes: bool = True,
) -> CalibrationSet:
    """Read and validate a set; `config` / `weights` / `steps` refuse a set of another model.

    Checks the format, the files' sizes and hashes, every sample against the stage contract, and
    (when asked) that the set belongs to the model, weights and sampler steps at hand."""
    directory = Path(directory)
    sweep_work_dirs(directory.parent, legacy=_unlocked_leftover)  # killed captures' leftovers
    manifest = _read_manifest(directory)
    try:
        key, stages, files = manifest["key"], manifest["stages"], manifest["files"]
        check_identity(key, directory, config, weights, steps)
        samples, candidates, phases = {}, {}, {}
        for stage in CAPTURED_STAGES:
            info = stages[stage]
            path = _verify_file(directory, info["file"], files[info["file"]], hashes)
            samples[stage] = _read_samples(path, int(info["samples"]))
            candidates[stage] = int(info["candidates"])
            if "phases" in info:
                phases[stage] = {p: int(v["candidates"]) for p, v in info["phases"].items()}
    except (KeyError, TypeError) as exc:
        raise BitDanceError(f"{directory / MANIFEST}: malformed manifest (no {exc}); capture the set again") from None
    origin = manifest.get("capture")
    cset = CalibrationSet(key, samples, candidates, directory, phases, dict(origin) if isinstance(origin, dict) else {})
    cset.check_contract(str(directory))
    return cset

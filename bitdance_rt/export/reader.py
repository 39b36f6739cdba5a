"""Open an export directory: the one reader every consumer goes through.

`open_export(directory)` reads manifest.json (bitdance_rt.export.manifest), its model config, its
stage contracts (checked against the ones this version derives from that config) and its graph
precision, and refuses, in one BitDanceError line, an export of another model (`expect_config`: the
differing config fields are named) or of other weights (`expect_source`). The files themselves are
checked by `ExportInfo.verify_files` (sizes, and sha256 unless hashes=False), which readers call
when they are about to load them.

Torch-free (the TensorRT engine build runs in a lean process without torch).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from .. import stages as st
from ..config import ModelConfig
from ..errors import BitDanceError
from ..precision.policy import DEFAULT_PRECISION, PRECISIONS
from .manifest import MANIFEST, manifest_config, manifest_specs, read_manifest, stage_files, verify_files

_SHOWN_DIFFERENCES = 4  # config fields named in the "another model" error; the rest are counted


def architecture(cfg: ModelConfig) -> dict:
    """What decides the graphs: the official class, its arguments and the VAE (not name or defaults)."""
    return {k: v for k, v in cfg.to_json_dict().items() if k in ("model_class", "constructor_args", "vae")}


def config_differences(ours: dict, theirs: dict, prefix: str = "") -> list[str]:
    """'field ours vs theirs' for every (nested) field where two config dicts differ, sorted by name."""
    out = []
    for k in sorted(set(ours) | set(theirs), key=str):
        a, b = ours.get(k), theirs.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} {a!r} vs {b!r}")
    return out


def graph_precision(manifest: dict, where: str = MANIFEST) -> str:
    """The precision of an export's graphs: its manifest's "precision" field (absent: fp32)."""
    value = manifest.get("precision", DEFAULT_PRECISION)
    if value not in PRECISIONS:
        raise BitDanceError(
            f"{where}: unknown graph precision {value!r} (expected one of "
            f"{', '.join(PRECISIONS)}); re-export it with this bitdance-rt"
        )
    return value


def require_generation_stages(specs, where) -> None:
    """An export (or engine set) can generate: the embeddings, the backbone, the decoder, and a head sampler
    (the fused graph, or head_step for the step-by-step sampler)."""
    missing = [s for s in st.REQUIRED_STAGES if s not in specs]
    if missing or not (st.HEAD_STEP in specs or st.HEAD_SAMPLER in specs):
        raise BitDanceError(
            f"{where} lacks stage(s) {', '.join(missing) or 'head_sampler (or head_step)'} needed "
            "for generation; re-export with all stages"
        )


@dataclass(frozen=True)
class ExportInfo:
    """An export directory, read and checked (open_export): its manifest, model config, stage contracts
    and graph precision."""

    directory: Path
    manifest: dict
    config: ModelConfig
    specs: dict  # stage name -> stages.StageSpec
    precision: str  # of the graphs: fp32 | fp16 | int8

    @property
    def key(self) -> dict:
        return self.manifest["key"]

    @property
    def sampler_steps(self) -> int | None:
        """S of the fused head sampler (None: no sampler stage was exported)."""
        return self.key["sampler_steps"]

    @property
    def source(self) -> str:
        """The weights' identity the export was made from (checkpoint_source / random_source)."""
        return self.key["checkpoint"]

    @property
    def max_batch(self) -> int:
        """The largest batch (images) the graphs accept."""
        return int(self.key["limits"]["max_batch"])

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    def stage_files(self, stage: str) -> list[str]:
        """File names of a stage (the .onnx first, then its external data, if any)."""
        return stage_files(self.manifest, self.directory, stage)

    def verify_files(self, hashes: bool = True) -> None:
        """Every listed file exists with the recorded size (and sha256): else a one-line error."""
        verify_files(self.directory, self.manifest, hashes=hashes)

    def require_generation_stages(self) -> None:
        require_generation_stages(self.specs, self.directory)

    def check_model(self, expect_config: ModelConfig | None = None, expect_source: str | None = None) -> None:
        """Refuse an export of another model (its config's architecture differs from `expect_config`'s)
        or of other weights (`expect_source`), naming what differs."""
        if expect_config is not None:
            diff = config_differences(architecture(self.config), architecture(expect_config))
            if diff:
                shown = ", ".join(diff[:_SHOWN_DIFFERENCES])
                if len(diff) > _SHOWN_DIFFERENCES:
                    shown += f", ... (+{len(diff) - _SHOWN_DIFFERENCES} more)"
                raise BitDanceError(
                    f"{self.manifest_path} was exported for model {self.config.name!r}, not "
                    f"{expect_config.name!r} (another config; export vs expected: {shown}); "
                    f"re-export {self.directory} for this model"
                )
        if expect_source is not None and expect_source != self.source:
            raise BitDanceError(
                f"{self.manifest_path} was exported from {self.source}, not {expect_source} "
                f"(another checkpoint); re-export {self.directory} from this checkpoint"
            )


def open_export(
    directory, expect_config: ModelConfig | None = None, expect_source: str | None = None, *, generation: bool = False
) -> ExportInfo:
    """Read and check the export in `directory` (manifest, config, stage contracts, graph precision);
    refuse one of another model or weights (ExportInfo.check_model) and, with `generation`, one that lacks
    a stage generation needs. The files are not read: call ExportInfo.verify_files before loading them."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    config = manifest_config(manifest, directory)
    # the identity first: an export of another model is named as such, not as a contract mismatch
    info = ExportInfo(directory, manifest, config, {}, graph_precision(manifest, str(directory / MANIFEST)))
    info.check_model(expect_config, expect_source)
    info = replace(info, specs=manifest_specs(manifest, directory))
    if generation:
        info.require_generation_stages()
    return info

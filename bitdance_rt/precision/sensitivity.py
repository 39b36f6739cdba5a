"""Per-layer INT8 sensitivity: which quantised layers, kept in float, buy back the most agreement.

A "layer" is one quantised op (a weight MatMul / Gemm / Conv, named by its module path, e.g.
/layers.2/feed_forward/w1/MatMul). For each stage and each of its layers, the INT8 export is
derived again with that one layer kept float, and the stage's own teacher-forced number is
measured (report.compare): bit agreement for token_embed, the backbone (both phases pooled: a
layer kept float is float in both) and head_step (via the head sampler), decoder PSNR. The gain
over the all-INT8 export ranks the layers; the ranking is what a user needs to choose
`keep_float` for a deployment.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from .. import stages as st
from .policy import quantised_layers

# the teacher-forced measurement of each INT8 stage (report.Comparison.to_json)
METRIC = {st.TOKEN_EMBED: "token_embed", st.BACKBONE: "backbone", st.HEAD_STEP: "head", st.DECODER: "decoder"}
if set(METRIC) != set(st.INT8_STAGES):  # a quantised stage without a metric would leave the sweep silently
    raise RuntimeError(f"sensitivity METRIC covers {sorted(METRIC)}, the INT8 stages are {list(st.INT8_STAGES)}")


def stage_metric(comparison_json: dict, stage: str) -> float:
    tf = comparison_json["teacher_forced"]
    return tf["decoder"]["psnr_db_min"] if stage == st.DECODER else tf[METRIC[stage]]["bit_agreement"]


@dataclass
class LayerGain:
    stage: str
    layer: str
    metric: float  # with this layer float
    gain: float  # over all-INT8 (bit agreement in [0, 1], or dB for the decoder)


def sweep(
    fp32_dir,
    calibration,
    method: str,
    stages,
    labels,
    seeds,
    steps: int,
    scale: float,
    schedule: str,
    baseline: dict,
    make_backend,
    progress: bool = True,
    max_layers: int | None = None,
) -> list[LayerGain]:
    """LayerGains for every quantised layer of `stages` (at most `max_layers` per stage), best first
    within each stage (gains are bit agreement for the AR stages, dB for the decoder).

    `baseline`: the all-INT8 comparison (Comparison.to_json()); `make_backend(dir)`: a backend over
    an export directory (the reference backend is `make_backend(fp32_dir)`)."""
    from tqdm.auto import tqdm

    from ..export.manifest import read_manifest, stage_files
    from .derive import derive_export
    from .report import compare

    fp32_dir = Path(fp32_dir)
    manifest = read_manifest(fp32_dir)
    ref = make_backend(fp32_dir)
    jobs = []
    for stage in stages:
        layers = quantised_layers(fp32_dir / stage_files(manifest, fp32_dir, stage)[0])
        jobs += [(stage, layer) for layer in layers[:max_layers]]
    out = []
    with tempfile.TemporaryDirectory(prefix="bitdance-rt-sensitivity-") as tmp:
        for n, (stage, layer) in enumerate(tqdm(jobs, desc="INT8 sensitivity", unit="layer", disable=not progress)):
            variant = derive_export(
                fp32_dir, Path(tmp) / f"v{n}", "int8", calibration, method, keep_float={stage: [layer]}, progress=False
            )
            result = compare(
                ref, make_backend(variant.directory), labels, seeds, steps, scale, schedule, free_running=False
            ).to_json()
            value = stage_metric(result, stage)
            out.append(LayerGain(stage, layer, value, value - stage_metric(baseline, stage)))
    order = list(METRIC)
    return sorted(out, key=lambda g: (order.index(g.stage), -g.gain, g.layer))

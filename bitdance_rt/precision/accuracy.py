"""The accuracy report of `bitdance-rt calibrate --report`: every precision vs FP32, plus INT8 sensitivity.
(INT4 is ONNX Runtime's INT4 graphs: the report runs on ONNX Runtime.)"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from .. import stages as st
from .auto import precision_export
from .report import compare

TARGET_BIT_AGREEMENT = 0.99  # teacher-forced INT8, per stage (the precision issue's bar)
# the quantised stages' bit agreements, as report.Comparison.to_json has them (the backbone per phase:
# its prefill is few bits next to its steps, and pooled numbers would hide it)
TARGETS = {
    "token_embed": ("token_embed",),
    "backbone prefill": ("backbone", "phases", "prefill"),
    "backbone step": ("backbone", "phases", "step"),
    "head": ("head",),
}


def _at(tree: dict, path) -> dict:
    for key in path:
        tree = tree[key]
    return tree


def _condition(labels) -> dict:
    """The report's condition as JSON: class labels, or a text-to-image model's prompts."""
    prompts = getattr(labels, "prompts", None)
    return {"prompts": list(prompts)} if prompts is not None else {"labels": [int(x) for x in labels]}


def _producer(calibration) -> dict:
    """Which model produced the calibration data (calibration/producer.py): the set's producer, in words too."""
    from ..calibration.producer import describe_producer, set_producer

    producer = set_producer(calibration.key)
    export_dir = getattr(calibration, "origin", {}).get("export_dir")
    return {
        "calibration_producer": {**producer, **({"export_dir": export_dir} if export_dir else {})},
        "calibration_captured_with": describe_producer(producer, export_dir),
    }


def accuracy_report(
    cfg,
    weights: str,
    fp32_dir,
    calibration,
    method: str,
    labels,
    seeds,
    steps: int,
    scale: float,
    schedule: str,
    make_backend,
    precisions=("fp16", "int8", "int4"),
    sensitivity: bool = False,
    progress: bool = True,
) -> dict:
    """Derive (or reuse) each precision's graphs from `fp32_dir`, compare them with the FP32 graphs
    on `labels` x `seeds`, and return the report dict (see report_files.markdown)."""
    fp32_dir = Path(fp32_dir)
    ref = make_backend(fp32_dir)
    out = {
        "setup": {
            "model": cfg.name,
            "weights": weights,
            "steps": steps,
            "cfg": scale,
            "cfg_schedule": schedule,
            "images": len(labels),
            **_condition(labels),
            "seeds": list(seeds),
            "method": method,
            "calibration": str(getattr(calibration, "directory", None) or "(in memory)"),
            "calibration_samples": {k: len(v) for k, v in calibration.samples.items()},
            "calibration_phases": {
                k: calibration.phase_counts(k) for k in calibration.samples if calibration.phase_counts(k)
            },
            **_producer(calibration),
            "backend": ref.name,
            "fp32_export": str(fp32_dir),
        },
        "precisions": {},
        "exports": {},
    }
    ref_runs: dict = {}  # (FP32's free-running images, generated once for every precision)
    for precision in precisions:
        calibrated = calibration if precision == "int8" else None  # (INT4 is weight-only)
        variant = precision_export(fp32_dir, precision, calibrated, method, progress=progress)
        out["exports"][precision] = str(variant.directory)
        out["precisions"][precision] = compare(
            ref, make_backend(variant.directory), labels, seeds, steps, scale, schedule, ref_runs=ref_runs
        ).to_json()
    if "int8" in out["precisions"]:
        tf = out["precisions"]["int8"]["teacher_forced"]
        out["targets"] = {
            f"INT8 {name} bit agreement >= {TARGET_BIT_AGREEMENT:.0%}": _at(tf, path)["bit_agreement"]
            >= TARGET_BIT_AGREEMENT
            for name, path in TARGETS.items()
        }
        if sensitivity:
            from .sensitivity import sweep

            gains = sweep(
                fp32_dir,
                calibration,
                method,
                list(st.INT8_STAGES),
                labels,
                seeds,
                steps,
                scale,
                schedule,
                out["precisions"]["int8"],
                make_backend,
                progress=progress,
            )
            out["sensitivity"] = [asdict(g) for g in gains]
    return out

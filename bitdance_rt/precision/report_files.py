"""The accuracy report on disk: report.json (everything) and report.md (the tables people read)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..checkpoint import atomic_write


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def _db(x) -> str:
    return "-" if x is None else ("inf" if math.isinf(x) else f"{x:.1f} dB")


def _num(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def markdown(report: dict) -> str:
    head = report["setup"]
    phases = head.get("calibration_phases", {}).get("backbone")
    lines = [
        f"# Precision report: {head['model']}",
        "",
        f"Weights {head['weights']}; S={head['steps']}, CFG {head['cfg']} ({head['cfg_schedule']}); "
        f"{head['images']} images x seeds {head['seeds']} (noise seeds not used for calibration); INT8 calibration "
        f"set {head['calibration']} ({head['method']}"
        + (", backbone: " + ", ".join(f"{n} {p} samples" for p, n in phases.items()) if phases else "")
        + (f"; captured with {head['calibration_captured_with']}" if head.get("calibration_captured_with") else "")
        + f"). Reference: FP32 graphs on {head['backend']}. "
        "Teacher forced: every stage gets the reference history and noise, and the reference's other stages, "
        "so each column isolates one stage (the backbone is one graph: its prefill and AR steps apart).",
        "",
        "| precision | prefix_embed bits | token_embed bits | backbone prefill bits | backbone step bits | head bits | "
        "end-to-end bits (teacher forced) | decoder PSNR min | free-running bits | backbone cond max err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p, r in report["precisions"].items():
        tf, free = r["teacher_forced"], r["free_running"]
        backbone = tf["backbone"]["phases"]
        lines.append(
            f"| {p} | {_pct(tf['prefix_embed']['bit_agreement'])} | {_pct(tf['token_embed']['bit_agreement'])} | "
            f"{_pct(backbone['prefill']['bit_agreement'])} | {_pct(backbone['step']['bit_agreement'])} | "
            f"{_pct(tf['head']['bit_agreement'])} | {_pct(tf['end_to_end']['bit_agreement'])} | "
            f"{_db(tf['decoder']['psnr_db_min'])} | {_pct(free['bit_agreement'])} | "
            f"{_num(tf['backbone']['cond_max_abs_err'])} |"
        )
    if report.get("targets"):
        lines += [
            "",
            "Targets: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in report["targets"].items()),
        ]
    if report.get("sensitivity"):
        lines += [
            "",
            "## INT8 sensitivity: layers kept in float, best gain first per stage",
            "",
            "| stage | layer | metric with it float | gain over all-INT8 |",
            "|---|---|---|---|",
        ]
        for g in report["sensitivity"]:
            value = _db(g["metric"]) if g["stage"] == "decoder" else _pct(g["metric"])
            gain = f"{g['gain']:+.2f} dB" if g["stage"] == "decoder" else f"{100 * g['gain']:+.2f} pts"
            lines.append(f"| {g['stage']} | `{g['layer']}` | {value} | {gain} |")
    return "\n".join(lines) + "\n"


def _finite(obj):
    """JSON has no NaN / Infinity: non-finite numbers become null (markdown shows them)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_report(report: dict, directory) -> tuple[Path, Path]:
    directory = Path(directory)
    text = json.dumps(_finite(report), indent=1, sort_keys=True) + "\n"
    js = atomic_write(directory / "report.json", lambda tmp: Path(tmp).write_text(text))
    md = atomic_write(directory / "report.md", lambda tmp: Path(tmp).write_text(markdown(report)))
    for p in (js, md):
        p.chmod(0o644)
    return js, md

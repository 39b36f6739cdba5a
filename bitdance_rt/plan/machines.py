"""Where each step of the road (road.py) can run: a machine's host and GPU memory (a Jetson's one memory for
both), whether each step fits, and the option (or the place) that makes a step that does not fit fit."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .. import stages as st
from ..errors import BitDanceError
from ..precision.policy import PRECISIONS
from .memory import TARGETS, plan, shared_memory
from .road import Road, Step, _gb, build_step, calibrate_step, capture_choice, default_capture, road, run_step


@dataclass
class Machine:
    name: str
    host_bytes: int | None  # None: unknown
    gpu_bytes: int | None  # usable GPU memory (None: no GPU)
    shared: bool = False  # a Jetson: host and GPU are one memory, `host_bytes` usable for both

    @classmethod
    def target(cls, target: str, host_bytes: int | None) -> "Machine":
        what, size, reserved = TARGETS[target]
        if shared_memory(target):
            return cls(what, size - reserved, size - reserved, shared=True)
        return cls(f"{what} on a host of {_gb(host_bytes)}" if host_bytes else what, host_bytes, size - reserved)


@dataclass
class Fit:
    step: str
    fits: bool
    need: str  # what was compared, in words
    fix: str = ""


# ---- sizes ------------------------------------------------------------------------------------------------------
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tb": 1 << 40,
    "tib": 1 << 40,
}


def parse_size(text: str) -> int:
    """'64GB', '64GiB', '64G', '512MB', '1.5TB' or bytes -> bytes. GB is read as GiB, as memory is sold
    (a '64 GB' machine has 64 GiB; the targets' '24 GB GPU' too)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise BitDanceError(f"memory size {text!r}: give a number with a unit, e.g. 64GB, 24GiB or 512MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 0


# ---- fits and fixes ------------------------------------------------------------------------------------------
def fits(step: Step, m: Machine) -> tuple[bool, str]:
    """(fits, what was compared) of one step on a machine."""
    if m.shared:
        need = step.together
        return need <= m.host_bytes, f"{_gb(need)} of {_gb(m.host_bytes)} shared"
    parts, ok = [], True
    if step.gpu_bytes and m.gpu_bytes is None and step.cpu_bytes is not None:  # on the CPU
        return (
            m.host_bytes is None or step.cpu_bytes <= m.host_bytes,
            f"on the CPU: host {_gb(step.cpu_bytes)} of {_gb(m.host_bytes)}",
        )
    if step.gpu_bytes:
        if m.gpu_bytes is None:
            return False, f"GPU {_gb(step.gpu_bytes)}, no GPU"
        ok &= step.gpu_bytes <= m.gpu_bytes
        parts.append(f"GPU {_gb(step.gpu_bytes)} of {_gb(m.gpu_bytes)}")
    if m.host_bytes is not None:
        ok &= step.host_bytes <= m.host_bytes
        parts.insert(0, f"host {_gb(step.host_bytes)} of {_gb(m.host_bytes)}")
    return ok, ", ".join(parts)


def check(r: Road, cfg, m: Machine) -> list[Fit]:
    """Each step's fit on `m`, with the option that makes a step that does not fit fit (also kept in
    r.machines)."""
    out = []
    for s in r.steps:
        ok, need = fits(s, m)
        out.append(Fit(s.step, ok, need, "" if ok else fix(r, s, cfg, m)))
    r.machines[m.name] = out
    return out


def _elsewhere(step: Step, what: str) -> str:
    return f"{what} on a machine with >= {_gb(step.together if step.gpu_bytes else step.host_bytes)} of memory"


def fix(r: Road, s: Step, cfg, m: Machine) -> str:
    """The option that makes step `s` fit `m`, or where to do it instead."""
    max_batch, guided, workspace_mb, steps = r.max_batch, r.guided, r.workspace_mb, r.sampler_steps
    ok = lambda step: fits(step, m)[0]  # noqa: E731
    if s.step in ("load", "export"):
        if r.backend == "torch":
            return (
                "the torch backend holds the float32 model: --backend onnxruntime or tensorrt, with an "
                "export made elsewhere (--export-dir DIR)"
            )
        export = next((x for x in r.steps if x.step == "export"), s)
        return (
            _elsewhere(export, "export") + " and copy the export here (bitdance-rt export --out DIR "
            "there; --export-dir DIR here, or bitdance-rt build --export-dir DIR)"
        )
    if s.step == "derive fp16":
        return _elsewhere(s, "derive it") + " (bitdance-rt export --precision fp16 --out DIR) and copy it here"
    if s.step == "calibrate":
        capture = capture_choice(cfg)
        if capture != ("onnxruntime", "fp16"):
            alt = calibrate_step(cfg, steps, "onnxruntime", "fp16")
            if ok(alt):
                return (
                    f"capture on ONNX Runtime's FP16 graphs: calibrate --capture-backend onnxruntime "
                    f"--capture-precision fp16 ({_gb(alt.host_bytes)})"
                )
        from ..calibration import CapturePolicy

        images, batch, policy = default_capture(cfg, steps)
        for n in (64, 16, 4):
            fewer = CapturePolicy(policy.backbone_every, policy.head_fraction, min(n, policy.max_samples))
            alt = calibrate_step(cfg, steps, *capture, images=images, batch=1, policy=fewer)
            if ok(alt):
                return (
                    f"fewer samples: calibrate --batch-size 1 --max-samples {fewer.max_samples} "
                    f"({_gb(alt.host_bytes)}), then --calibration DIR"
                )
        return _elsewhere(s, "capture") + " (bitdance-rt calibrate --out DIR) and pass the set with --calibration DIR"
    if s.step in ("ranges", "int8"):
        return (
            _elsewhere(s, "write the INT8 graphs") + " (bitdance-rt export --precision int8 --calibration DIR --out "
            "DIR there) and copy them here (--export-dir DIR, or bitdance-rt build --export-dir DIR)"
        )
    if s.step == "derive int8":
        return (
            _elsewhere(s, "derive the INT8 graphs") + " (bitdance-rt export --precision int8 --out DIR there) and "
            "copy them here (--export-dir DIR, or bitdance-rt build --export-dir DIR)"
        )
    # build and run: a smaller workspace, batch or precision
    if s.gpu_bytes and m.gpu_bytes is None and not m.shared:
        return "needs a GPU: plan one with --gpu SIZE" + (
            "; --backend onnxruntime runs on the CPU"
            if r.backend == "tensorrt" and s.step == "run" and r.precision != "bf16"  # (no BF16 on its CPU provider)
            else ""
        )
    options = []
    if r.backend == "tensorrt":
        options.append(("--workspace-mb 256", dict(workspace_mb=256)))
    if max_batch > 1:
        options.append(("--max-batch 1", dict(max_batch=1)))
    for p in PRECISIONS[PRECISIONS.index(r.precision) + 1 :]:  # each lower precision than the road's
        options.append((f"--precision {p}", dict(precision=p)))
    for flag, change in options:
        args = {"precision": r.precision, "max_batch": max_batch, "workspace_mb": workspace_mb, **change}
        if s.step == "build":
            alt = build_step(cfg, args["precision"], steps, args["workspace_mb"])
        else:
            alt = run_step(
                plan(cfg, args["precision"], r.backend, args["max_batch"], guided, args["workspace_mb"], steps)
            )
        if ok(alt):
            return f"{flag} ({fits(alt, m)[1]})"
    if r.backend == "tensorrt" and s.step == "run" and not m.shared:  # (on a Jetson streaming saves nothing)
        streamed = _streaming_fix(cfg, r.precision, max_batch, guided, workspace_mb, steps, ok)
        if streamed:
            budget, alt = streamed
            return (
                f"--weight-streaming-budget {budget / (1 << 30):.1f}GB ({fits(alt, m)[1]}; the rest of the "
                "backbone is read from host memory on each of its calls)"
            )
    big = st.is_t2i(cfg) and cfg.height * cfg.width > 512 * 512
    smaller = "; or a smaller image (plan --height 512 --width 512)" if big else ""
    if s.step == "build":
        return "none in today's code: TensorRT builds the engines on the GPU that runs them (an estimate)" + smaller
    return "none of --workspace-mb / --max-batch / --precision: a larger GPU" + smaller


def _streaming_fix(cfg, precision, max_batch, guided, workspace_mb, steps, ok):
    """(budget, run step) of the most of the backbone TensorRT can keep on the GPU with the run fitting (in
    tenths of a GiB), or None."""
    base = plan(cfg, precision, "tensorrt", max_batch, guided, workspace_mb, steps)
    held = next(x.bytes for x in base.stages if x.stage == st.BACKBONE)
    for tenths in range(int(held * 10 / (1 << 30)), -1, -1):
        budget = tenths * (1 << 30) // 10
        alt = run_step(plan(cfg, precision, "tensorrt", max_batch, guided, workspace_mb, steps, budget))
        if ok(alt):
            return budget, alt
    return None


def format_road(r: Road) -> str:
    lines = [
        f"road to running it ({r.precision} on {r.backend}; today's code, factors measured: bitdance_rt/plan/road.py):",
        f"  {'step':<12} {'host memory':>12} {'GPU memory':>12} {'disk':>12}  what",
    ]
    for s in r.steps:
        lines.append(f"  {s.step:<12} {_gb(s.host_bytes):>12} {_gb(s.gpu_bytes):>12} {_gb(s.disk_bytes):>12}  {s.what}")
    for name, found in r.machines.items():
        lines.append(f"  on {name}:")
        for f in found:
            lines.append(
                f"    {f.step:<12} {'fits' if f.fits else 'does not fit':<13} {f.need}"
                + (f": {f.fix}" if f.fix else "")
            )
    return "\n".join(lines)


def road_on(
    cfg,
    precision: str = "fp32",
    backend: str = "tensorrt",
    max_batch: int = 1,
    guided: bool = True,
    workspace_mb: int | None = None,
    host_memory=None,
    gpu=None,
    targets=None,
    weight_streaming_budget: int | None = None,
) -> Road:
    """`bitdance-rt plan`'s road, checked on: the machine of `host_memory` / `gpu` (sizes such as "64GB"),
    each of `targets` (a GPU target on that host memory; a Jetson's memory is its own), or else this
    machine's host memory."""
    host = parse_size(host_memory) if host_memory is not None else None
    card = parse_size(gpu) if gpu is not None else None
    r = road(cfg, precision, backend, max_batch, guided, workspace_mb, weight_streaming_budget=weight_streaming_budget)
    machines = []
    if host is not None or card is not None:
        h = host if host is not None else physical_memory()
        usable = None if card is None else card - TARGETS["gpu-24gb"][2]  # the CUDA context and allocator slack
        machines.append(
            Machine(
                f"a host of {_gb(h)}"
                + (f" with a {_gb(card)} GPU ({_gb(usable)} usable)" if card is not None else ", no GPU"),
                h,
                usable,
            )
        )
    for t in targets or ():
        machines.append(Machine.target(t, host if host is not None else physical_memory()))
    if not machines:
        machines.append(
            Machine(f"this machine ({_gb(physical_memory())}, no GPU given: --gpu SIZE)", physical_memory(), None)
        )
    for m in machines:
        check(r, cfg, m)
    return r

"""Refuse, in one line and before any work, a command that needs more host memory than this machine has.

`export`, `calibrate` and `generate` (when it would load the torch model or export) work out which steps
of the road (road.py) they will really run: a step whose output is already there (an export with the
same key, a derived variant, a calibration set) is skipped, as the command itself would skip it. If one
of them needs more than the memory available now (/proc/meminfo MemAvailable, else the physical memory),
the command stops with a BitDanceError naming the step, its need, what is available and the option that
makes it fit; `--ignore-memory-check` lets a user who knows better (swap, a machine about to be freed) go
on. A cheap upper bound (10x the model's float32 bytes, plus the capture's samples) comes first, so small
models (the embedded one, the tiny test checkpoints) are never traced for this and never refused on a
normal machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .. import stages as st
from ..errors import BitDanceError
from ..export.manifest import DEFAULT_OPSET
from ..precision.policy import DEFAULT_PRECISION
from . import road as rd
from .machines import Machine, fix


def available_memory() -> tuple[int, str]:
    """(bytes, where the figure comes from): MemAvailable of /proc/meminfo (what can be had now without
    swapping), else the physical memory (os.sysconf SC_PHYS_PAGES * SC_PAGE_SIZE)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "physical memory"
    except (OSError, ValueError, AttributeError):
        return 0, "unknown"


# ---- which steps a command runs ------------------------------------------------------------------------------
def export_current(
    directory, source, steps: int, stages=None, opset: int = DEFAULT_OPSET, max_batch: int = st.DEFAULT_MAX_BATCH
) -> bool:
    """Whether `directory` holds an export with the key this one would have (manifest only: the
    command itself verifies the files)."""
    from ..export.manifest import manifest_key, read_manifest

    stages = list(stages or st.GENERATION_STAGES)
    limits = st.Limits(max_batch=max_batch, opt_batch=min(st.DEFAULT_OPT_BATCH, max_batch))
    try:
        key = manifest_key(
            source.config,
            source.weights_source(),
            stages,
            opset,
            steps if any(s in st.SAMPLER_STAGES for s in stages) else None,
            limits,
        )
        if source.t2i:  # written from the weight files (backends.streamed_export)
            key["weights"] = "streamed"
        return read_manifest(directory)["key"] == json.loads(json.dumps(key))
    except (BitDanceError, KeyError, TypeError, OSError):
        return False


def _export_names(source) -> list[str]:
    """The steps of an export: a text-to-image one streams the weights, no model is loaded."""
    return ["export"] if source.t2i else ["load", "export"]


def _has_manifest(directory) -> bool:
    return directory is not None and (Path(directory) / "manifest.json").is_file()


def auto_export_steps(
    source, steps: int, precision: str, max_batch: int, calibration=None, out=None, capture=None
) -> list[str]:
    """The steps backends.auto_export will run for `precision` (into `out` when given)."""
    from .. import paths
    from ..precision.auto import default_calibration_dir

    fp32 = paths.export_dir(source.config, source.weights_source(), steps, max_batch)
    final = Path(out) if out is not None else None
    if source.t2i and precision in ("fp16", "bf16"):  # FP16 / BF16 graphs straight from the weight files
        return [] if _has_manifest(final or paths.variant_dir(fp32, precision)) else ["export"]
    if source.t2i and precision == "int4":  # FP16 graphs from the files, then TensorRT's INT4 from them
        todo = [] if _has_manifest(paths.variant_dir(fp32, "fp16")) else ["export"]
        return todo + ([] if final is not None and _has_manifest(final) and not todo else ["int4"])
    if source.t2i and precision == "int8":  # FP16 graphs, a capture on them, their ranges, INT8 from the files
        todo = [] if _has_manifest(paths.variant_dir(fp32, "fp16")) else ["export"]
        backend, cprec = capture or rd.capture_choice(source.config)
        found = default_calibration_dir(source.config, source.weights_source(), steps, backend, cprec)
        if calibration is None and not (found / "calibration.json").is_file():
            todo.append("calibrate")
        have_int8 = (
            _has_manifest(final)
            if final is not None
            else any(_has_manifest(d) for d in paths.variant_dir(fp32, "int8", None).parent.glob(f"{fp32.name}-int8-*"))
        )
        return todo + ([] if have_int8 and not todo else ["ranges", "int8"])
    todo = [] if export_current(fp32, source, steps, max_batch=max_batch) else _export_names(source)
    if precision == "fp32":
        return todo
    if precision in ("fp16", "bf16"):
        final = final or paths.variant_dir(fp32, precision)
        return todo + ([] if _has_manifest(final) and not todo else [f"derive {precision}"])
    if precision == "int4":  # weight-only: no calibration
        have = _has_manifest(final) if final is not None else False
        return todo + ([] if have and not todo else ["derive int4"])
    if calibration is None:
        backend, cprec = capture or rd.capture_choice(source.config)
        fp16 = paths.variant_dir(fp32, "fp16")
        if backend == "onnxruntime" and cprec == "fp16" and (todo or not _has_manifest(fp16)):
            todo.append("derive fp16")
        if not (
            default_calibration_dir(source.config, source.weights_source(), steps, backend, cprec) / "calibration.json"
        ).is_file():
            todo.append("calibrate")
    variants = paths.variant_dir(fp32, "int8", None).parent
    have_int8 = (
        _has_manifest(final)
        if final is not None
        else any(_has_manifest(d) for d in variants.glob(f"{fp32.name}-int8-*"))
    )
    if todo or not have_int8:
        todo.append("derive int8")
    return todo


# ---- the check ------------------------------------------------------------------------------------------------
def bound(cfg, samples: int = 0, rows: int = 8) -> int:
    """An upper bound of every step's host memory (the largest factors times the whole model, the cache of
    the most rows a step runs, the capture's samples): below what is available, nothing needs tracing."""
    from .memory import activation_bytes, activation_phases, kv_cache_bytes

    w = rd.model_bytes(cfg)
    rows = max(2 * rd.EXAMPLE_BATCH, rows)
    factor = max(rd.LOAD_IMAGENET + rd.EXPORT_SMALL + rd.EXPORT_RETAINED_SMALL, rd.DERIVE_INT8_SMALL)
    trace = rd.EXPORT_DECODER_MAPS * rd.EXAMPLE_BATCH * activation_phases(cfg, 2, "fp32")["decoder"] // 3
    return int(
        rd.EXPORT_PROCESS_BYTES
        + factor * w
        + kv_cache_bytes(cfg, rows)
        + activation_bytes(cfg, rows, "fp32")
        + trace
        + rd.CAPTURE_SAMPLES * samples
    )


def check_memory(
    command: str,
    cfg,
    names: list[str],
    *,
    precision: str = DEFAULT_PRECISION,
    backend: str = "onnxruntime",
    steps: int | None = None,
    max_batch: int = st.DEFAULT_MAX_BATCH,
    export_stages=None,
    capture=None,
    capture_args: dict | None = None,
    ignore: bool = False,
) -> None:
    """Raise one BitDanceError line if a step of `names` needs more host memory than is available."""
    if ignore or not names:
        return
    available, where = available_memory()
    if available <= 0:
        return
    steps = cfg.default_steps if steps is None else int(steps)
    capture = capture or rd.capture_choice(cfg)
    capture_args = capture_args or {}
    images, batch, policy = rd.default_capture(cfg, steps)
    batch = capture_args.get("batch", batch)
    samples = sum(
        rd.capture_bytes(
            cfg,
            capture_args.get("images", images),
            capture_args.get("seeds", 1),
            steps,
            batch,
            capture_args.get("policy", policy),
        ).values()
    )
    rows = 2 * min(batch, capture_args.get("images", images))
    if bound(cfg, samples, rows) <= available:
        return
    made = {
        "load": lambda: rd.load_step(cfg),
        # (a text-to-image road streams its export: BF16 as BF16, FP16 / INT8 / INT4 as FP16; every other
        # export is the FP32 one)
        "export": lambda: rd.export_step(
            cfg,
            steps,
            export_stages,
            precision
            if precision in ("fp16", "bf16")
            else "fp16"
            if precision in ("int8", "int4") and st.is_t2i(cfg)
            else "fp32",
        ),
        "derive fp16": lambda: rd.derive_fp16_step(cfg, steps),
        "derive bf16": lambda: rd.derive_fp16_step(cfg, steps, "bf16"),
        "derive int4": lambda: rd.derive_fp16_step(cfg, steps, "int4"),  # (a stage's FP32 graph whole, as FP16's)
        "int4": lambda: rd.int4_step(cfg, steps),
        "calibrate": lambda: rd.calibrate_step(cfg, steps, *capture, **capture_args),
        "derive int8": lambda: rd.derive_int8_step(cfg, steps, samples, rows),
        "ranges": lambda: rd.ranges_step(cfg, steps),
        "int8": lambda: rd.streamed_int8_step(cfg, steps),
    }
    found = [made[n]() for n in names if n in made]
    road = rd.Road(cfg.name, precision, backend, found, max_batch, True, None, steps)
    here = Machine("this machine", available, None)
    for step in found:
        if step.host_bytes > available:
            option = fix(road, step, cfg, here)
            raise BitDanceError(
                f"{command}: the {step.step} step of {cfg.name} needs ~{rd._gb(step.host_bytes)} of host memory, "
                f"this machine has {rd._gb(available)} ({where}): {option}; or pass "
                "--ignore-memory-check to try anyway".replace("\n", " ")
            )


# ---- the commands -----------------------------------------------------------------------------------------------
def for_export(args, source, steps: int) -> None:
    """`bitdance-rt export`: the FP32 export (unless --out holds it already), or auto_export's road to a
    --precision variant."""
    if args.precision in (None, "fp32"):
        current = not args.force and export_current(args.out, source, steps, args.stages, args.opset, args.max_batch)
        names = [] if current else _export_names(source)
    else:
        names = auto_export_steps(source, steps, args.precision, args.max_batch, args.calibration, out=args.out)
    check_memory(
        "export",
        source.config,
        names,
        precision=args.precision or "fp32",
        steps=steps,
        max_batch=args.max_batch,
        export_stages=args.stages,
        ignore=args.ignore_memory_check,
    )


def for_calibrate(args, source, steps: int, images: int) -> None:
    """`bitdance-rt calibrate`: the capture (on torch, or on ONNX Runtime after the export and FP16 graphs
    it needs) of `images` images per seed, and with --report the derivations it makes."""
    from ..calibration import CapturePolicy

    cfg = source.config
    names = []
    if args.capture_export is not None:
        from ..export.manifest import read_manifest
        from ..precision.derive import graph_precision

        capture = ("onnxruntime", graph_precision(read_manifest(args.capture_export)))
    else:
        capture = rd.capture_choice(cfg, args.capture_backend, args.capture_precision)
        if capture[0] == "onnxruntime":
            names += auto_export_steps(source, steps, capture[1], max(st.DEFAULT_MAX_BATCH, args.batch_size))
    names.append("calibrate")
    if args.report:
        names += [n for n in auto_export_steps(source, steps, "fp32", st.DEFAULT_MAX_BATCH) if n not in names]
        names += [n for n in ("derive fp16", "derive int8") if n not in names]
    policy = CapturePolicy(args.backbone_every, args.head_fraction, args.max_samples, args.sample_seed)
    check_memory(
        "calibrate",
        cfg,
        names,
        precision="int8",
        steps=steps,
        capture=capture,
        capture_args={"images": images, "seeds": len(args.seeds), "batch": args.batch_size, "policy": policy},
        ignore=args.ignore_memory_check,
    )


def for_generate(args, source, steps: int) -> None:
    """`bitdance-rt generate`: the torch model it loads, or the export (and variant) it would make first."""
    from ..backends import default_backend

    backend = args.backend or default_backend()
    if backend == "torch":
        names = ["load"]
    elif args.export_dir:
        names = []
    else:  # the graphs of the precision asked, on either backend (backends.auto_export)
        names = auto_export_steps(source, steps, args.precision or "fp32", args.batch_size, args.calibration)
    check_memory(
        "generate",
        source.config,
        names,
        precision=args.precision or "fp32",
        backend=backend,
        steps=steps,
        max_batch=args.batch_size,
        ignore=args.ignore_memory_check,
    )

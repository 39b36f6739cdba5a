"""`bitdance-rt calibrate`: record what every stage sees while generating (the INT8/FP8
calibration set), captured with torch or ONNX Runtime, and optionally the FP16/INT8 accuracy report."""

from __future__ import annotations

from pathlib import Path

from ..errors import BitDanceError
from .common import _model


def cmd_calibrate(args) -> int:
    from ..calibration import CapturePolicy, capture, describe_producer, save_calibration
    from ..runtime.loop import check_request
    from ..sampling import schedule_for

    source = _model(args)
    cfg = source.config
    steps = cfg.default_steps if args.steps is None else args.steps
    scale = cfg.default_cfg if args.cfg is None else args.cfg
    schedule = schedule_for(args.cfg_schedule, cfg)
    prompts = None
    if source.t2i:
        from ..precision.auto import fitting_prompts, default_prompts
        from ..t2i.prompt import PromptEncoder

        if args.labels is not None:
            raise BitDanceError("--labels are for class-conditional models; a text-to-image model takes --prompt")
        encoder = PromptEncoder(Path(source.checkpoint) / "tokenizer.json", cfg)
        labels = list(args.prompt) if args.prompt else fitting_prompts(default_prompts(), encoder)
    else:
        if args.prompt is not None:
            raise BitDanceError(f"--prompt is for text-to-image models; {cfg.name} takes --labels")
        labels = args.labels if args.labels is not None else list(range(cfg.num_classes))
    if args.samples is not None:  # images per seed, cycling over the labels (or prompts)
        if args.samples < 1:
            raise BitDanceError(f"--samples must be >= 1, got {args.samples}")
        labels = [labels[i % len(labels)] for i in range(args.samples)] if labels else labels
    if source.t2i:
        prompts = encoder.encode(labels)
    else:
        check_request(cfg.num_classes, labels, steps)
    if args.sensitivity and not args.report:
        raise BitDanceError("--sensitivity is part of the report: add --report")
    if args.report_images < 1:
        raise BitDanceError(f"--report-images must be >= 1, got {args.report_images}")
    if args.batch_size < 1:
        raise BitDanceError(f"--batch-size must be >= 1, got {args.batch_size}")
    if Path(args.out).exists() and not args.force:
        raise BitDanceError(f"--out {args.out} exists: pass --force to replace it")
    policy = CapturePolicy(args.backbone_every, args.head_fraction, args.max_samples, args.sample_seed)
    from ..plan.preflight import for_calibrate

    for_calibrate(args, source, steps, len(labels))  # one line if a step needs more memory than there is
    weights = source.weights_source()
    backend, origin = _capture_backend(args, source, steps)  # (checks the choice before exporting)
    try:
        result = capture(
            None if backend else source.load(args.unsafe_allow_pickle),
            weights,
            None if prompts is not None else labels,
            args.seeds,
            steps,
            scale,
            schedule,
            policy,
            args.batch_size,
            args.device,
            progress=True,
            prompts=prompts,
            backend=backend,
            origin=origin,
        )
    finally:
        if backend is not None:
            backend.close()
    out = save_calibration(result.dataset, args.out, overwrite=args.force)
    counts = ", ".join(f"{stage} {len(s)}" for stage, s in result.dataset.samples.items())
    producer = describe_producer(result.dataset.producer, origin.get("export_dir"))
    print(f"model: {source.describe()}; captured with {producer}")
    print(
        f"wrote calibration set {out}: {len(labels)} {'prompt' if prompts is not None else 'label'}(s) x "
        f"{len(args.seeds)} seed(s), S={steps}, "
        f"cfg {scale} ({schedule}); samples: {counts}"
    )
    if args.report:
        _calibration_report(args, source, out, steps, scale, schedule)
    return 0


def _capture_backend(args, source, steps: int):
    """`calibrate`'s ONNX Runtime capture backend and the notes for the set's manifest, or (None, {})
    for the torch reference (--capture-backend / --capture-precision / --capture-export)."""
    from ..backends import BackendOptions, auto_export, ort_providers
    from ..calibration import CAPTURE_PRECISIONS, capture_choice, ort_capture_backend
    from ..export.manifest import read_manifest
    from ..precision.derive import graph_precision

    if args.capture_export is not None:
        if args.capture_backend == "torch":
            raise BitDanceError("--capture-export is an onnxruntime capture: drop --capture-backend torch")
        export = Path(args.capture_export)
        held = graph_precision(read_manifest(export))
        if held not in CAPTURE_PRECISIONS:  # (BF16 has no CPU kernels; INT8/INT4 would calibrate on themselves)
            raise BitDanceError(
                f"--capture-export {export} holds {held} graphs: a capture runs on {' or '.join(CAPTURE_PRECISIONS)}"
                " graphs of the model (give its FP32 or FP16 export, or leave --capture-export out)"
            )
        if args.capture_precision not in (None, held):
            raise BitDanceError(
                f"--capture-export {export} holds {held} graphs, not --capture-precision {args.capture_precision}"
            )
    else:
        name, precision = capture_choice(source.t2i, args.capture_backend, args.capture_precision)
        if name == "torch":
            return None, {}
        opts = BackendOptions(allow_pickle=args.unsafe_allow_pickle, max_batch=max(16, args.batch_size))
        export = auto_export(source, steps, opts, precision)
    providers = ort_providers(BackendOptions(device=args.device))
    backend = ort_capture_backend(
        export,
        threads=args.threads,
        providers=providers,
        expect_config=source.config,
        expect_source=source.weights_source(),
    )
    return backend, {"export_dir": str(export)}


def _calibration_report(args, source, set_dir: Path, steps: int, scale: float, schedule: str) -> None:
    from ..backends import BackendOptions, auto_export
    from ..calibration import load_calibration
    from ..precision.accuracy import accuracy_report
    from ..precision.auto import default_labels as report_labels
    from ..precision.report_files import markdown, write_report
    from ..runtime.ort_backend import OrtBackend

    cfg, weights = source.config, source.weights_source()
    fp32 = auto_export(source, steps, BackendOptions(allow_pickle=args.unsafe_allow_pickle), "fp32")
    cset = load_calibration(set_dir, config=cfg, weights=weights)
    if source.t2i:  # held-out prompts (none is a calibration prompt), shortened to fit the graphs
        from ..precision.auto import fitting_prompts, report_prompts
        from ..t2i.prompt import PromptEncoder

        encoder = PromptEncoder(Path(source.checkpoint) / "tokenizer.json", cfg)
        condition = encoder.encode(fitting_prompts(report_prompts(args.report_images), encoder))
    else:
        condition = report_labels(cfg, args.report_images)
    report = accuracy_report(
        cfg,
        weights,
        fp32,
        cset,
        args.method,
        condition,
        [args.report_seed],
        steps,
        scale,
        schedule,
        lambda d: OrtBackend(d, threads=args.threads, verify_hashes=False),
        sensitivity=args.sensitivity,
    )
    js, md = write_report(report, set_dir)
    print(markdown(report))
    print(f"report: {js} and {md}")

"""Commands that make artefacts from weights: `export` (ONNX graphs), `build` (TensorRT engines of
an export, in a process without torch) and `convert` (a checkpoint to .safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import BitDanceError
from ..export.manifest import DEFAULT_OPSET
from .common import _model, _options


def cmd_export(args) -> int:
    from ..backends import auto_export, export_for
    from ..stages import Limits

    source = _model(args)
    cfg = source.config
    if source.t2i:
        from ..t2i.prompt import PromptEncoder

        PromptEncoder(Path(args.checkpoint) / "tokenizer.json", cfg).image_tokens()  # a bad tokenizer fails now
    steps = cfg.default_steps if args.steps is None else args.steps
    if args.max_batch < 1:
        raise BitDanceError(f"--max-batch must be >= 1, got {args.max_batch}")
    opts = _options(args, max_batch=args.max_batch, progress=True)
    from ..plan.preflight import for_export

    for_export(args, source, steps)  # one line, before any work, if a step needs more memory than there is
    if args.precision not in (None, "fp32"):
        if args.stages or args.opset != DEFAULT_OPSET or args.force:
            raise BitDanceError(
                f"--precision {args.precision} derives from the cached FP32 export of the same "
                "--max-batch: --stages/--opset/--force apply to FP32 exports only"
            )
        out = auto_export(source, steps, opts, args.precision, out=args.out)
        print(f"{out}: {args.precision} export ready")
        return 0
    result = export_for(
        source,
        args.out,
        steps,
        opts,
        stages=args.stages,
        opset=args.opset,
        force=args.force,
        limits=Limits(max_batch=args.max_batch, opt_batch=min(4, args.max_batch)),
    )
    state = "up to date, reused" if result.reused else "exported"
    print(f"{result.directory}: {state} ({', '.join(result.manifest['stage_files'])})")
    return 0


def cmd_build(args) -> int:
    # No torch on this path: on Jetson the build runs in a lean process (docs/tensorrt.md).
    from ..engines.build import TensorRT, build_engines

    toolkit = TensorRT(device=args.device)
    built = build_engines(
        args.export,
        precision=args.precision,
        workspace_mb=args.workspace_mb,
        level=args.opt_level,
        stages=args.stages,
        root=args.engine_dir,
        toolkit=toolkit,
        lint=not args.no_lint,
        lock_timeout=args.lock_timeout,
        weight_streaming=args.weight_streaming,
    )
    counts = {s: sum(b.status == s for b in built.values()) for s in ("built", "rebuilt", "cached")}
    print(
        f"engines of {args.export}: {counts['built']} built, {counts['rebuilt']} rebuilt, {counts['cached']} cached "
        f"(TensorRT {toolkit.version}, {toolkit.gpu.name})"
    )
    return 0


def cmd_convert(args) -> int:
    from ..checkpoint import check_fit, file_sha256, fitting_presets, load_state_dict_file, save_safetensors
    from ..config import load_config
    from ..models import BitDance

    if args.checkpoint is None:
        raise BitDanceError("convert needs --checkpoint (the .pt file to convert)")
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise BitDanceError(f"--out {out}: the output must end in .safetensors")
    sd = load_state_dict_file(args.checkpoint, args.unsafe_allow_pickle)
    meta = {"source": Path(args.checkpoint).name, "source_sha256": file_sha256(args.checkpoint)}
    if args.model is not None:
        cfg = load_config(args.model)
        import torch

        with torch.device("meta"):
            check_fit(BitDance(cfg), sd, args.checkpoint, cfg.name)
        meta["config"] = json.dumps(cfg.to_json_dict())
    elif not any(k.startswith(("encoder.", "decoder.")) for k in sd):
        fits = fitting_presets({k: tuple(v.shape) for k, v in sd.items()})
        if fits:
            meta["preset"] = fits[0]
    save_safetensors(sd, out, meta)
    print(f"wrote {out} ({len(sd)} tensors" + (f", preset {meta['preset']}" if "preset" in meta else "") + ")")
    return 0

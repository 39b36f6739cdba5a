"""`bitdance-rt generate --prompt ...` and `bitdance-rt export` for a text-to-image checkpoint directory.

Cheap checks come first (resolution, prompts, tokenizer, config files), so a bad request fails in a
second rather than after reading 28 GB of weights. The ONNX Runtime path exports the generation
stages once per (checkpoint, resolution, max_text_tokens, S) into the export cache, like the
ImageNet path; graphs are static per resolution (see t2i/config.py).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import BitDanceError
from ..sampling import schedule_for
from .config import DEFAULT_MAX_TEXT_TOKENS, check_resolution, read_checkpoint_config
from .prompt import PromptEncoder


def _config(args):
    if not args.checkpoint:
        raise BitDanceError("text-to-image needs --checkpoint DIR: the BitDance-14B-16x / -64x directory "
                            "(config.json, model*.safetensors, tokenizer.json, ae*, vision_head*, projector.safetensors)")
    check_resolution(args.height, args.width)
    if not Path(args.checkpoint).is_dir():
        raise BitDanceError(f"--checkpoint {args.checkpoint}: a text-to-image checkpoint is a directory")
    max_text = args.max_text_tokens or DEFAULT_MAX_TEXT_TOKENS
    cfg = read_checkpoint_config(args.checkpoint, args.height, args.width, max_text)
    if hasattr(args, "cfg_schedule"):
        args.cfg_schedule = schedule_for(args.cfg_schedule, cfg)
    return cfg


def _export(cfg, args, out, steps: int, stages=None, **options):
    from ..export import export_stages
    from ..export.cache import GENERATION_STAGES
    from ..export.manifest import manifest_key
    from ..export.onnx_export import ExportResult, find_reusable
    from ..stages import SAMPLER_STAGES, Limits
    from .loading import checkpoint_dir_source, load_t2i

    source = checkpoint_dir_source(args.checkpoint)
    stages = list(stages or GENERATION_STAGES)
    limits = options.pop("limits", Limits())
    opset = options.get("opset", 17)
    key = manifest_key(cfg, source, stages, opset, steps if any(s in SAMPLER_STAGES for s in stages) else None, limits)
    if not options.get("force") and (manifest := find_reusable(out, key)) is not None:
        return ExportResult(Path(out), manifest, True)  # weights not read at all
    loaded = load_t2i(args.checkpoint, cfg.height, cfg.width, config=cfg)
    return export_stages(loaded.model, out, source, stages=stages, sampler_steps=steps, limits=limits, **options)


def cmd_generate_t2i(args) -> int:
    from ..images import save_png, to_uint8
    from ..runtime import generate_batched
    from ..sampling import ReplayNoise, SeededNoise
    from .config import DEFAULT_CFG, DEFAULT_STEPS

    cfg = _config(args)
    condition = PromptEncoder(Path(args.checkpoint) / "tokenizer.json", cfg).encode(args.prompt)
    steps = DEFAULT_STEPS if args.steps is None else args.steps
    scale = DEFAULT_CFG if args.cfg is None else args.cfg
    if steps < 1:
        raise BitDanceError(f"--steps must be >= 1, got {steps}")
    noise = ReplayNoise(args.noise_from) if args.noise_from else SeededNoise(args.seed)
    name = args.backend or _default_backend()
    if name == "onnxruntime":
        from ..export.cache import export_dir_for
        from ..runtime.ort_backend import OrtBackend
        from .loading import checkpoint_dir_source

        out = Path(args.export_dir) if args.export_dir else None
        if out is None:
            out = export_dir_for(cfg, checkpoint_dir_source(args.checkpoint), steps)
            result = _export(cfg, args, out, steps, progress=not args.quiet)
            print(f"ONNX export: {out} ({'reused' if result.reused else 'exported'})")
        providers = ["cuda"] if args.device.startswith("cuda") else ["cpu"]
        backend = OrtBackend(out, threads=args.threads, providers=providers, expect_config=cfg)
    else:
        from ..runtime.torch_backend import TorchBackend
        from .loading import load_t2i

        backend = TorchBackend(load_t2i(args.checkpoint, cfg.height, cfg.width, config=cfg).model, args.device)
    result = generate_batched(backend, condition, steps, scale, args.cfg_schedule, noise, progress=not args.quiet,
                              batch_size=args.batch_size)
    pixels = to_uint8(result.image)
    paths = [save_png(px, Path(args.out) / f"{i:03d}.png") for i, px in enumerate(pixels)]
    if args.save_tokens:
        import json

        from ..checkpoint import save_safetensors

        save_safetensors({"tokens": result.tokens.float(), "latent": result.latent.float(), "image": result.image},
                         args.save_tokens, metadata={"prompts": json.dumps(list(args.prompt)), "steps": str(steps),
                                                     "cfg": str(scale), "cfg_schedule": args.cfg_schedule})
    print(f"generated {len(paths)} image(s) of {cfg.height}x{cfg.width} with {name}: {cfg.ar_steps} AR steps x "
          f"{steps} sampler steps, cfg {scale} ({args.cfg_schedule}), {result.seconds:.2f} s")
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def cmd_export_t2i(args) -> int:
    from ..stages import Limits

    cfg = _config(args)
    PromptEncoder(Path(args.checkpoint) / "tokenizer.json", cfg).image_tokens()
    steps = cfg.default_steps if args.steps is None else args.steps
    if steps < 1:
        raise BitDanceError(f"--steps must be >= 1, got {steps}")
    result = _export(cfg, args, args.out, steps, stages=args.stages, opset=args.opset, force=args.force,
                     limits=Limits(max_batch=args.max_batch, opt_batch=min(4, args.max_batch)))
    state = "up to date, reused" if result.reused else "exported"
    print(f"{result.directory}: {state} ({', '.join(result.manifest['stage_files'])})")
    return 0


def _default_backend() -> str:
    from ..cli import default_backend

    return default_backend()

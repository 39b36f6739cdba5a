"""`bitdance-rt generate` (images from labels or prompts) and `eval` (score a digits model's images)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import BitDanceError
from .common import _check_output, _is_t2i, _model, _pipeline, _t2i_checkpoint, default_labels


def cmd_generate(args) -> int:
    from ..images import save_images, save_png, to_uint8
    from ..runtime.params import GenerationParams, ModelLimits
    from ..runtime.timing import process_seconds
    from ..sampling import ReplayNoise

    t2i = _is_t2i(args)
    if t2i and (args.labels is not None or args.model is not None):
        raise BitDanceError(
            "--prompt (text-to-image) takes neither --labels nor --model: the model is --checkpoint DIR"
        )
    if t2i and not _t2i_checkpoint(args.checkpoint):
        raise BitDanceError(
            "text-to-image needs --checkpoint DIR: the BitDance-14B-16x / -64x directory "
            "(config.json, model*.safetensors, tokenizer.json, ae*, vision_head*, "
            "projector.safetensors), its diffusers conversion, or the ComfyUI BitDance files "
            "(or their main-model file)"
        )
    if t2i and args.prompt is None:
        raise BitDanceError(f"--checkpoint {args.checkpoint} is a text-to-image directory: give --prompt")
    _check_output(args.out, "--out", directory=True)
    if args.save_tokens:
        _check_output(args.save_tokens, "--save-tokens", directory=False)
    source = _model(args)
    cfg = source.config
    steps = cfg.default_steps if args.steps is None else args.steps
    scale = cfg.default_cfg if args.cfg is None else args.cfg
    labels = None if t2i else (args.labels if args.labels is not None else default_labels(cfg))
    # the request, checked once, before loading possibly large weights (a prompt's length in tokens
    # is checked where the Pipeline encodes it: the tokenizer comes with the model)
    params = GenerationParams.create(
        ModelLimits.of(cfg, source.t2i),
        labels=labels,
        prompt=args.prompt,
        steps=steps,
        cfg=scale,
        cfg_schedule=args.cfg_schedule,
        seed=args.seed,
        noise=ReplayNoise(args.noise_from) if args.noise_from else None,
    )
    from ..plan.preflight import for_generate

    for_generate(args, source, steps)  # one line if loading or exporting needs more memory than there is
    with _pipeline(args, source, steps) as pipe:
        submitted = process_seconds()
        out = pipe.generate(params=params, progress=not args.quiet)
    first_step = None if submitted is None or out.first_step_seconds is None else submitted + out.first_step_seconds
    schedule = pipe.scheduler_schedule(args.cfg_schedule)
    if t2i:
        paths = [save_png(px, Path(args.out) / f"{i:03d}.png") for i, px in enumerate(to_uint8(out.image))]
        what, size = {"prompts": json.dumps(list(args.prompt))}, f"{cfg.height}x{cfg.width}"
    else:
        paths = save_images(out.image, labels, args.out)
        what, size = {"labels": json.dumps(labels)}, f"{cfg.image_size}x{cfg.image_size}"
    if args.save_tokens:
        from ..checkpoint import save_safetensors

        save_safetensors(
            {"tokens": out.tokens.float(), "latent": out.latent.float(), "image": out.image},
            args.save_tokens,
            metadata={**what, "steps": str(steps), "cfg": str(scale), "cfg_schedule": schedule},
        )
    n = out.image.shape[0]
    print(
        f"generated {n} image(s) of {size} with {pipe.backend.name}: {cfg.ar_steps} AR steps x {steps} sampler "
        f"steps, cfg {scale} ({schedule}), {out.seconds:.2f} s, {n / max(out.seconds, 1e-9):.2f} images/s"
    )
    if first_step is not None:
        print(f"start-up: the first AR step ended {first_step:.1f} s after the process started")
    tokens = f"; tokens -> {args.save_tokens}" if args.save_tokens else ""
    if t2i:
        print(f"wrote {', '.join(str(p) for p in paths)}" + tokens)
    else:
        print(f"wrote {len(paths) - 1} PNG(s) and {paths[-1]}" + tokens)
    return 0


def cmd_eval(args) -> int:
    from ..quality import score_images

    source = _model(args)
    cfg = source.config
    if source.t2i or cfg.num_classes != 10:
        raise BitDanceError(f"eval scores digits models (10 classes); {cfg.name} is not one")
    if args.per_class < 2:
        raise BitDanceError(f"--per-class must be >= 2, got {args.per_class}")
    steps = cfg.default_steps if args.steps is None else args.steps
    scale = cfg.default_cfg if args.cfg is None else args.cfg
    with _pipeline(args, source, steps) as pipe:
        out = pipe.generate(
            labels=list(range(10)),
            num_images=args.per_class,
            steps=steps,
            cfg=scale,
            cfg_schedule=args.cfg_schedule,
            seed=args.seed,
        )
    report = score_images(out.image.clamp(-1, 1), out.labels)
    print(
        f"{pipe.backend.name} {args.precision or 'fp32'}, {steps} sampler steps, cfg {scale} "
        f"({pipe.scheduler_schedule(args.cfg_schedule)}), seed {args.seed}"
    )
    print(report)
    return 0

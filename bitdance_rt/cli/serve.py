"""The serving commands: `serve` (the HTTP server over one warm Pipeline) and `triton-repo` (a
Triton Inference Server model repository). Both are thin: bitdance_rt.serve and bitdance_rt.triton
do the work, imported only when the command runs."""

from __future__ import annotations

from ..errors import BitDanceError
from .common import _model, _pipeline


def _api_key(args) -> str | None:
    """--api-key, else $BITDANCE_RT_API_KEY; None (no auth) only when neither is given: an empty key is
    a mistake (an unset variable in a script), refused rather than served without auth."""
    import os

    given, where = (
        (args.api_key, "--api-key")
        if args.api_key is not None
        else (os.environ.get("BITDANCE_RT_API_KEY"), "$BITDANCE_RT_API_KEY")
    )
    if given is not None and not given.strip():
        raise BitDanceError(
            f"{where} is empty: give a key, or leave both --api-key and $BITDANCE_RT_API_KEY "
            "unset to serve without auth"
        )
    return None if given is None else given.strip()


def cmd_serve(args) -> int:
    from ..serve import ServerSettings, serve

    api_key = _api_key(args)
    for name in ("shutdown_timeout", "body_timeout", "max_body_bytes"):
        if not getattr(args, name) > 0:
            raise BitDanceError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    source = _model(args)
    steps = source.config.default_steps if args.steps is None else args.steps
    for name in ("max_queue", "max_images"):
        if getattr(args, name) < (0 if name == "max_queue" else 1):
            raise BitDanceError(
                f"--{name.replace('_', '-')} must be >= {0 if name == 'max_queue' else 1}, got {getattr(args, name)}"
            )
    if args.request_timeout <= 0:
        raise BitDanceError(f"--request-timeout must be > 0 seconds, got {args.request_timeout}")
    settings = ServerSettings(
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        max_images=args.max_images,
        api_key=api_key,
        shutdown_timeout=args.shutdown_timeout,
        body_timeout=args.body_timeout,
        max_body_bytes=args.max_body_bytes,
    )
    print(
        f"bitdance-rt serve: {source.config.name} on http://{args.host}:{args.port} (GET /health says when it is "
        "loaded)",
        flush=True,
    )
    return serve(lambda: _pipeline(args, source, steps), settings, args.host, args.port, args.log_level)


def cmd_triton_repo(args) -> int:
    from ..triton import write_repository

    names = (
        "name",
        "backend",
        "precision",
        "steps",
        "max_batch",
        "max_images",
        "device",
        "gpus",
        "count",
        "threads",
        "ort_provider",
        "engine_dir",
        "cache_dir",
        "export_path",
        "model",
        "checkpoint",
        "vae",
        "force",
    )
    out = write_repository(args.export_dir, args.out, **{k: getattr(args, k) for k in names})
    print(
        f"wrote Triton model repository {out} (model {args.name}); run it with "
        f"tritonserver --model-repository {out} (docs/triton.md)"
    )
    return 0

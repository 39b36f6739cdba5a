"""`bitdance-rt` command line: generate images, convert checkpoints."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .config import DEFAULT_PRESET, PRESETS
from .errors import BitDanceError

BACKENDS = ("torch",)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help=f"preset ({', '.join(PRESETS)}) or a config .json in the official constructor-argument "
                        f"form; default: {DEFAULT_PRESET} (embedded)")
    p.add_argument("--checkpoint", default=None, help="model weights: official .pt ({'ema'|'model': ...}) or .safetensors")
    p.add_argument("--vae", default=None, help="autoencoder weights (ae_d16c32.pt); overrides vae.* keys of the checkpoint")
    p.add_argument("--unsafe-allow-pickle", action="store_true",
                   help="load .pt files with full unpickling (can execute code: only for files you trust)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitdance-rt", description="BitDance deployment runtime")
    parser.add_argument("--version", action="version", version=f"bitdance-rt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate class-conditional images")
    _add_model_args(g)
    g.add_argument("--labels", type=int, nargs="+", default=None, help="class labels, one image each (default: 0..7)")
    g.add_argument("--steps", type=int, default=None, help="sampler steps S per AR step (default: the model's)")
    g.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale G (default: the model's)")
    g.add_argument("--cfg-schedule", choices=("linear", "constant"), default="linear")
    g.add_argument("--seed", type=int, default=0, help="seed of the one noise generator")
    g.add_argument("--out", default="out", help="output directory for PNGs (default: ./out)")
    g.add_argument("--noise-from", default=None, help="replay recorded noise (noise_000, noise_001, ... in a .safetensors)")
    g.add_argument("--save-tokens", default=None, help="write tokens, latent and image to this .safetensors")
    g.add_argument("--backend", choices=BACKENDS, default="torch")
    g.add_argument("--device", default="cpu", help="torch device for the torch backend (default: cpu)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")

    c = sub.add_parser("convert", help="convert a checkpoint to .safetensors (safe to load, fast to map)")
    _add_model_args(c)
    c.add_argument("--out", required=True, help="output .safetensors path")
    return parser


def cmd_generate(args) -> int:
    import torch

    from .images import save_images
    from .loading import load_model
    from .runtime import generate
    from .runtime.torch_backend import TorchBackend
    from .sampling import ReplayNoise, SeededNoise

    from .config import load_config
    from .runtime.loop import check_request

    cfg = load_config(args.model or DEFAULT_PRESET)
    labels = args.labels if args.labels is not None else list(range(min(8, cfg.num_classes)))
    steps = cfg.default_steps if args.steps is None else args.steps
    scale = cfg.default_cfg if args.cfg is None else args.cfg
    check_request(cfg.num_classes, labels, steps)  # before loading possibly large weights
    loaded = load_model(cfg, args.checkpoint, args.vae, args.unsafe_allow_pickle)
    print(f"model: {loaded.source}")
    if loaded.random_weights:
        print("note: no --checkpoint given, so this is the embedded default with RANDOM weights: "
              "the images are noise patterns, not pictures (pass --model/--checkpoint for real weights)")
    noise = ReplayNoise(args.noise_from) if args.noise_from else SeededNoise(args.seed)
    if args.device != "cpu" and not torch.cuda.is_available() and args.device.startswith("cuda"):
        raise BitDanceError(f"--device {args.device}: CUDA is not available on this machine")
    backend = TorchBackend(loaded.model, args.device)
    result = generate(backend, labels, steps, scale, args.cfg_schedule, noise, progress=not args.quiet)
    paths = save_images(result.image, labels, args.out)
    if args.save_tokens:
        from .checkpoint import save_safetensors

        save_safetensors({"tokens": result.tokens.float(), "latent": result.latent.float(), "image": result.image},
                         args.save_tokens, metadata={"labels": json.dumps(labels), "steps": str(steps),
                                                     "cfg": str(scale), "cfg_schedule": args.cfg_schedule})
    n = len(labels)
    print(f"generated {n} image(s) of {cfg.image_size}x{cfg.image_size} with {args.backend}: "
          f"{cfg.ar_steps} AR steps x {steps} sampler steps, cfg {scale} ({args.cfg_schedule}), "
          f"{result.seconds:.2f} s, {result.images_per_second:.2f} images/s")
    print(f"wrote {len(paths) - 1} PNG(s) and {paths[-1]}" + (f"; tokens -> {args.save_tokens}" if args.save_tokens else ""))
    return 0


def cmd_convert(args) -> int:
    from .checkpoint import check_fit, file_sha256, fitting_presets, load_state_dict_file, save_safetensors
    from .config import load_config
    from .models import BitDance

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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"generate": cmd_generate, "convert": cmd_convert}[args.command](args)
    except BitDanceError as exc:
        print(f"bitdance-rt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bitdance-rt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

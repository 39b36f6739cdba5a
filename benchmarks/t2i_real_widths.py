"""Text-to-image graphs at BitDance-14B's real widths, through every precision, checked.

    python benchmarks/t2i_real_widths.py                       # 1 Qwen3 layer, 1 head block, 512 px
    python benchmarks/t2i_real_widths.py --layers 2 --precisions fp16 int8

The 14B model does not fit this machine, but its graphs' shapes do not depend on the layer count:
this builds a checkpoint directory in the official layout with Qwen3-14B's widths (hidden 5120, 40
query and 8 key/value heads of 128, FFN 17408; a byte-level vocabulary, or with --real-vocab 151936 tokens)
and `--layers` layers, the vision head at its real width (ch_latent 5120) with `--head-depth`
blocks, random weights, and a tiny autoencoder (the decoder is the ImageNet models'). Each
precision is exported as `generate` would (INT8: calibrated on the model's own text-to-image
trajectories), every stage file goes through onnx.checker (full check) and the TensorRT 10.3 / 11
lint, and one image is generated on ONNX Runtime. Prints per precision the files, their sizes,
the findings and seconds; ends with one JSON line. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

QWEN3_14B_WIDTHS = {
    "hidden_size": 5120,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 17408,
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1, help="Qwen3 layers (the 14B has 40)")
    ap.add_argument("--head-depth", type=int, default=1, help="vision head blocks (the 14B has 6)")
    ap.add_argument("--parallel", type=int, default=16, choices=(16, 64), help="tokens per AR step")
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--max-text-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2, help="sampler steps S")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "fp16", "int8"], choices=("fp32", "fp16", "int8"))
    ap.add_argument("--no-generate", action="store_true", help="export and check only")
    ap.add_argument(
        "--real-vocab",
        action="store_true",
        help="Qwen3's 151,936-token vocabulary (a 3.1 GB FP32 text embedding: graphs over 2 GB)",
    )
    ap.add_argument("--workdir", default=None, help="where the checkpoint and exports go (default: a temp dir)")
    args = ap.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="t2i-real-widths-"))
    os.environ["BITDANCE_RT_CACHE"] = str(work / "cache")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import onnx
    import torch

    from t2i_tiny import write_checkpoint

    from bitdance_rt import Pipeline
    from bitdance_rt.backends import BackendOptions, auto_export, resolve_model
    from bitdance_rt.engines.lint import TARGETS, lint_export
    from bitdance_rt.export import read_manifest

    t0 = time.perf_counter()
    ckpt = work / "ckpt"
    if not (ckpt / "config.json").is_file():
        vocab = {"vocab_size": 151936} if args.real_vocab else {}
        write_checkpoint(
            ckpt,
            parallel_num=args.parallel,
            llm=dict(QWEN3_14B_WIDTHS, num_hidden_layers=args.layers, **vocab),
            head={"ch_latent": 5120, "depth": args.head_depth},
        )
    print(
        f"checkpoint at Qwen3-14B widths, {args.layers} layer(s), head depth {args.head_depth}: {ckpt} "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    source = resolve_model(None, str(ckpt), None, args.height, args.width, args.max_text_tokens)
    results = {}
    for precision in args.precisions:
        t = time.perf_counter()
        directory = auto_export(source, args.steps, BackendOptions(progress=True), precision)
        exported = time.perf_counter() - t
        manifest = read_manifest(directory)
        checker = []
        for stage, files in manifest["stage_files"].items():
            try:
                onnx.checker.check_model(str(directory / files[0]), full_check=True)
            except Exception as exc:  # the checker raises several types; record each
                checker.append(f"{stage}: {str(exc).splitlines()[0]}")
        lint = {target: [str(f) for f in lint_export(directory, target)] for target in TARGETS}
        sizes = {f: info["bytes"] for f, info in manifest["files"].items()}
        row = {"export_s": round(exported, 1), "checker": checker, "lint": lint, "files": sizes}
        if not args.no_generate:
            t = time.perf_counter()
            with (
                torch.no_grad(),
                Pipeline.from_pretrained(
                    checkpoint=str(ckpt),
                    backend="onnxruntime",
                    precision=precision,
                    height=args.height,
                    width=args.width,
                    max_text_tokens=args.max_text_tokens,
                    steps=args.steps,
                    progress=False,
                ) as pipe,
            ):
                out = pipe.generate(prompt="a red cat", seed=0)
            row["generate_s"] = round(time.perf_counter() - t, 1)
            row["tokens_pm1"] = bool(out.tokens.abs().eq(1).all())
            row["image_finite"] = bool(out.image.isfinite().all())
        results[precision] = row
        print(
            f"\n{precision}: exported in {exported:.0f} s; checker findings {len(checker)}; lint findings "
            + ", ".join(f"{t}: {len(v)}" for t, v in lint.items())
        )
        for f, b in sorted(sizes.items()):
            print(f"  {f:28s} {b / 1e6:10.1f} MB")
        for finding in checker + [x for v in lint.values() for x in v]:
            print("  ", finding)
        if "generate_s" in row:
            print(
                f"  one 512 px image on ONNX Runtime: {row['generate_s']} s, tokens +/-1: {row['tokens_pm1']}, "
                f"image finite: {row['image_finite']}"
            )
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(
        json.dumps(
            {
                "bench": "t2i_real_widths",
                "layers": args.layers,
                "head_depth": args.head_depth,
                "real_vocab": args.real_vocab,
                "parallel": args.parallel,
                "height": args.height,
                "width": args.width,
                "cpu": cpu,
                "machine": platform.machine(),
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()

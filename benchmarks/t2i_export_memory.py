"""Peak host memory of the streamed text-to-image export at BitDance-14B's real widths, per layer.

    python benchmarks/t2i_export_memory.py                          # FP16, 1/2/3 layers, 1024 px, 64x
    python benchmarks/t2i_export_memory.py --layers 1 2 4 --precision fp32 --head-depths 1 2
    python benchmarks/t2i_export_memory.py --precision int8          # + a capture on the FP16 graphs
    python benchmarks/t2i_export_memory.py --precision int8 --workdir W --reuse   # the INT8 export only
    python benchmarks/t2i_export_memory.py --precision int4 --generate   # TensorRT's INT4, + a run on ONNX Runtime

The 14B does not fit this machine, so this measures the slope: checkpoint directories in the
official layout with Qwen3-14B's widths (hidden 5120, 40 query / 8 key-value heads of 128, FFN
17408) and its real vocabulary (151,936 x 5,120: a 3.1 GB float32 text embedding, so graphs over
2 GB are exercised), BF16 weights as the official files hold them, `--layers` Qwen3 layers, the
vision head at its real width (ch_latent 5120) with `--head-depths` blocks, and a tiny autoencoder.
Each is exported by the CLI (`bitdance-rt export --precision P --max-batch 1`), in a fresh process
whose peak resident memory (VmHWM) is read at its exit. A least-squares line through the points
gives the cost per Qwen3 layer and per head block, extrapolated to the 14B (40 layers, head depth
6); the target is the largest stage's weights at the precision plus 4 GB. INT4 is TensorRT's
(`--backend tensorrt`), written from the FP16 export made first (its peak reported beside); every
reduced-precision export is linted for TensorRT 10.3 and 11 (engines/lint.py); `--generate` runs one
image on ONNX Runtime from each export (not BF16: ONNX Runtime's CPU provider has no BF16 MatMul).
Asserts nothing; ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 2**30
QWEN3_14B = {
    "hidden_size": 5120,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 17408,
    "vocab_size": 151936,
}
CHILD = """
import sys
from bitdance_rt.cli import main
code = main(sys.argv[1:])
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print("VMHWM", int(line.split()[1]) * 1024, flush=True)
sys.exit(code)
"""
PROMPT = "a red fox in the snow"  # INT8: the calibration capture's prompt


def write_checkpoint(directory: Path, layers: int, head_depth: int, parallel: int) -> None:
    """The official layout at real widths, one shard per layer (BF16), written tensor by tensor so that
    making it never holds more than a layer."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import t2i_tiny

    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    small = dict(t2i_tiny.LLM_CONFIG, num_hidden_layers=0, vocab_size=len(t2i_tiny.byte_vocab()) + 80, hidden_size=64)
    t2i_tiny.write_checkpoint(
        tmp,
        parallel_num=parallel,
        llm={k: small[k] for k in ("num_hidden_layers",)},
        head={"ch_latent": 5120, "depth": head_depth},
        shards=1,
    )
    # the head at the real conditioning width: rewrite its files against hidden 5120
    from bitdance_rt.models.heads import DiffusionHead, TransformerHead
    from bitdance_rt.models.t2i import Projector

    hidden, gen = QWEN3_14B["hidden_size"], torch.Generator().manual_seed(0)

    def rand(shape, dtype=torch.float32):
        return (torch.randn(shape, generator=gen) / (shape[-1] ** 0.5 if len(shape) > 1 else 10)).to(dtype)

    with torch.device("meta"):
        net = DiffusionHead(TransformerHead(32, 5120, hidden, head_depth, 1, variant="t2i", swiglu=True))
    save_file({k: rand(tuple(v.shape)) for k, v in net.state_dict().items()}, str(tmp / "vision_head.safetensors"))
    save_file(
        {k: rand(tuple(v.shape)) for k, v in Projector(32, hidden).state_dict().items()},
        str(tmp / "projector.safetensors"),
    )
    head_cfg = json.loads((tmp / "vision_head_config.json").read_text())
    (tmp / "vision_head_config.json").write_text(json.dumps({**head_cfg, "ch_cond": hidden}))
    cfg = json.loads((tmp / "config.json").read_text())
    cfg.update(QWEN3_14B, num_hidden_layers=layers)
    (tmp / "config.json").write_text(json.dumps(cfg))
    for f in tmp.glob("model*.safetensors*"):
        f.unlink()
    d, kv, ffn = hidden, QWEN3_14B["num_key_value_heads"] * QWEN3_14B["head_dim"], QWEN3_14B["intermediate_size"]
    q = QWEN3_14B["num_attention_heads"] * QWEN3_14B["head_dim"]
    weight_map = {}
    shard = "model-embed.safetensors"
    save_file(
        {
            "model.embed_tokens.weight": rand((QWEN3_14B["vocab_size"], d), torch.bfloat16),
            "model.norm.weight": torch.ones(d, dtype=torch.bfloat16),
        },
        str(tmp / shard),
    )
    weight_map.update({"model.embed_tokens.weight": shard, "model.norm.weight": shard})
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes = {
            "self_attn.q_proj.weight": (q, d),
            "self_attn.k_proj.weight": (kv, d),
            "self_attn.v_proj.weight": (kv, d),
            "self_attn.o_proj.weight": (d, q),
            "self_attn.q_norm.weight": (128,),
            "self_attn.k_norm.weight": (128,),
            "input_layernorm.weight": (d,),
            "post_attention_layernorm.weight": (d,),
            "mlp.gate_proj.weight": (ffn, d),
            "mlp.up_proj.weight": (ffn, d),
            "mlp.down_proj.weight": (d, ffn),
        }
        tensors = {
            p + k: (rand(s, torch.bfloat16) if len(s) == 2 else torch.ones(s, dtype=torch.bfloat16))
            for k, s in shapes.items()
        }
        shard = f"model-layer{i:02d}.safetensors"
        save_file(tensors, str(tmp / shard))
        weight_map.update({k: shard for k in tensors})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tmp.rename(directory)


def run_cli(argv: list[str], cache: Path) -> tuple[int, float, str]:
    """(peak resident bytes, seconds, stdout) of one `bitdance-rt` command in a fresh process."""
    env = {**os.environ, "BITDANCE_RT_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", CHILD, *argv], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({res.returncode}): {res.stderr[-3000:]}")
    peak = next(int(line.split()[1]) for line in res.stdout.splitlines() if line.startswith("VMHWM"))
    return peak, round(seconds, 1), res.stdout


def measure(
    ckpt: Path,
    out: Path,
    precision: str,
    height: int,
    steps: int,
    cache: Path,
    reuse: bool = False,
    generate: bool = False,
) -> dict:
    """The export at `precision` into `out`. INT8 as a user makes it on a small machine: the FP16 export
    (into the cache, where the INT8 export finds it), a calibration set captured on it (PROMPT, a few
    samples per stage), then `export --precision int8 --calibration SET`, whose peak is the one reported
    (the ranges measured on the FP16 graphs, always anew, the INT8 graphs streamed); the other two peaks
    beside it. `reuse`: the FP16 export and the set an earlier run left in the cache (their peaks: None)."""
    model = ["--checkpoint", str(ckpt), "--height", str(height), "--width", str(height), "--steps", str(steps)]
    export = ["export", *model, "--max-batch", "1"]
    extra = {}
    if precision in ("int8", "int4"):
        from bitdance_rt import paths
        from bitdance_rt.backends import resolve_model

        source = resolve_model(None, str(ckpt), None, height, height, None)
        with paths.using_cache_root(cache):  # where export --precision int8 looks for its FP16 graphs
            fp16 = str(paths.variant_dir(paths.export_dir(source.config, source.weights_source(), steps, 1), "fp16"))
        calibration = out.with_name(out.name + "-calibration")
        peak = seconds = c_peak = c_seconds = None
        have = (Path(fp16) / "manifest.json").is_file() and (
            precision == "int4" or (calibration / "calibration.json").is_file()
        )
        if not (reuse and have):
            peak, seconds, _ = run_cli([*export, "--precision", "fp16", "--out", fp16], cache)
        if precision == "int8" and not (reuse and have):
            c_peak, c_seconds, _ = run_cli(
                ["calibrate", *model, "--prompt", PROMPT, "--batch-size", "1", "--max-samples", "4"]
                + ["--capture-export", fp16, "--out", str(calibration), "--force"],
                cache,
            )
        extra = {"fp16_export": {"peak_bytes": peak, "seconds": seconds}}
    if precision == "int8":
        import shutil

        shutil.rmtree(cache / "ranges", ignore_errors=True)  # (a set captured again may have the same key)
        extra["calibrate"] = {"peak_bytes": c_peak, "seconds": c_seconds}
        export += ["--calibration", str(calibration)]
    if precision == "int4":
        export += ["--backend", "tensorrt"]
    peak, seconds, _ = run_cli([*export, "--precision", precision, "--out", str(out)], cache)
    manifest = json.loads((out / "manifest.json").read_text())
    files = {f: info["bytes"] for f, info in manifest["files"].items()}
    if precision != "fp32":
        from bitdance_rt.engines.lint import TARGETS, lint_export

        extra["lint_findings"] = {t: [str(f) for f in lint_export(out, t)] for t in TARGETS}
    if generate and precision != "bf16":
        images = str(out) + "-images"
        g_peak, g_seconds, _ = run_cli(
            [
                "generate",
                *model,
                "--export-dir",
                str(out),
                "--max-batch",
                "1",
                "--prompt",
                PROMPT,
                "--out",
                images,
                "--quiet",
            ],
            cache,
        )
        extra["generate"] = {"peak_bytes": g_peak, "seconds": g_seconds}
    return {"peak_bytes": peak, "seconds": seconds, "files": files, **extra}


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through (x, y)."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return my - slope * mx, slope


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3], help="Qwen3 layer counts (the 14B: 40)")
    ap.add_argument("--head-depths", type=int, nargs="+", default=[1], help="vision head blocks (the 14B: 6)")
    ap.add_argument("--precision", default="fp16", choices=("fp32", "fp16", "bf16", "int8", "int4"))
    ap.add_argument("--generate", action="store_true", help="also one image from each export on ONNX Runtime")
    ap.add_argument("--parallel", type=int, default=64, choices=(16, 64))
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=2, help="sampler steps S of the fused head sampler")
    ap.add_argument("--workdir", default=None, help="checkpoints and exports (default: a temporary directory)")
    ap.add_argument(
        "--reuse", action="store_true", help="int8 / int4: the FP16 exports (and sets) an earlier run left in --workdir"
    )
    args = ap.parse_args(argv)

    import torch

    from bitdance_rt.plan.memory import stage_weights
    from bitdance_rt.t2i_config import t2i_preset

    work = Path(args.workdir or tempfile.mkdtemp(prefix="t2i-export-memory-"))
    runs = []
    grid = [(n, args.head_depths[0]) for n in args.layers] + [(args.layers[0], h) for h in args.head_depths[1:]]
    for layers, depth in grid:
        ckpt = work / f"ckpt-l{layers}-h{depth}-p{args.parallel}"
        if not ckpt.is_dir():
            t = time.perf_counter()
            write_checkpoint(ckpt, layers, depth, args.parallel)
            print(f"wrote {ckpt.name} ({time.perf_counter() - t:.0f} s)", flush=True)
        out = work / f"export-{ckpt.name}-{args.precision}"
        result = measure(ckpt, out, args.precision, args.height, args.steps, work / "cache", args.reuse, args.generate)
        disk = sum(result["files"].values())
        print(
            f"{layers} layer(s), head depth {depth}: peak {result['peak_bytes'] / GIB:.2f} GiB, "
            f"{disk / GIB:.2f} GiB written, {result['seconds']:.0f} s",
            flush=True,
        )
        runs.append({"layers": layers, "head_depth": depth, **result, "written_bytes": disk})
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    base, per_layer = fit([(r["layers"], r["peak_bytes"]) for r in runs if r["head_depth"] == args.head_depths[0]])
    per_block = 0.0
    if len(args.head_depths) > 1:
        _, per_block = fit([(r["head_depth"], r["peak_bytes"]) for r in runs if r["layers"] == args.layers[0]])
    full = base + per_layer * 40 + per_block * (6 - args.head_depths[0])
    cfg = t2i_preset("BitDance-14B-64x" if args.parallel == 64 else "BitDance-14B-16x", args.height, args.height)
    form = "qdq" if args.precision == "int4" else "matmulnbits"  # (the INT4 measured is TensorRT's)
    weights = stage_weights(cfg, args.precision, args.steps, int4_format=form)
    largest = max(sum(b for _, b in w.values()) for w in weights.values())
    target = largest + 4 * 10**9
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    summary = {
        "benchmark": "t2i_export_memory",
        "precision": args.precision,
        "parallel": args.parallel,
        "height": args.height,
        "steps": args.steps,
        "runs": runs,
        "per_layer_bytes": round(per_layer),
        "per_head_block_bytes": round(per_block),
        "intercept_bytes": round(base),
        "extrapolated_14b_peak_bytes": round(full),
        "largest_stage_bytes": largest,
        "target_bytes": target,
        "fits_target": full <= target,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "avx512f": "avx512f" in flags,
            "avx512_vnni": "avx512_vnni" in flags,
            "torch": torch.__version__,
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    print(
        f"per Qwen3 layer {per_layer / GIB:+.3f} GiB, per head block {per_block / GIB:+.3f} GiB; "
        f"BitDance-14B ({40} layers, head depth 6) extrapolated: {full / GIB:.2f} GiB peak against a target of "
        f"{target / GIB:.2f} GiB (largest stage {largest / GIB:.2f} GiB at {args.precision} + 4 GB)"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

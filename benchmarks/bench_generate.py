"""Generation throughput: torch eager reference vs ONNX Runtime (fused and per-stage sampler).

    python benchmarks/bench_generate.py                      # BitDance-B-4x, random weights
    python benchmarks/bench_generate.py --model tiny-4x --batches 1 8 --steps 25

Settings follow the issue: 256px (the preset's size), S=25 sampler steps, CFG 3.9 (linear), batch
1 and 8. Weights are seeded random (timing does not depend on them). Every configuration runs in
this one process, so the ratios compare like with like on a noisy machine. Prints a per-stage
breakdown (seconds per image: prefill, backbone steps, head sampling, decode), images/s and the
speed-up over the torch eager reference, then one JSON line with all results. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from bitdance_rt.config import load_config
from bitdance_rt.export import export_stages, random_source
from bitdance_rt.stages import GENERATION_STAGES
from bitdance_rt.models import BitDance
from bitdance_rt.models.init import random_init
from bitdance_rt.runtime import generate
from bitdance_rt.runtime.timing import STAGE_CALLS, TimedBackend
from bitdance_rt.runtime.torch_backend import TorchBackend
from bitdance_rt.sampling import SeededNoise


def run_once(backend, labels, steps, cfg_scale, seed) -> dict:
    timed = TimedBackend(backend)
    result = generate(timed, labels, steps, cfg_scale, "linear", SeededNoise(seed))
    n = len(labels)
    return {
        "seconds": result.seconds,
        "images_per_s": n / result.seconds,
        "stage_s_per_image": {k: timed.seconds.get(k, 0.0) / n for k in STAGE_CALLS},
        "tokens": result.tokens,
    }


def warm_up(backend, cfg, steps: int) -> None:
    """One call of each stage (allocators, thread pools, lazy init) outside the timed runs."""
    cond = backend.prefill(torch.tensor([0, cfg.num_classes]))
    noise = torch.zeros(steps + 1, 1, cfg.parallel_num, cfg.token_dim)
    tokens = backend.sample_tokens(cond, noise, 2.0, True)
    backend.step(tokens, 1)
    backend.decode(torch.ones(1, cfg.latent_dim, *cfg.grid))


def benchmark_args(description: str) -> argparse.ArgumentParser:
    """The settings every benchmark here shares (the issue's: B-4x, batch 1 and 8, S=25, CFG 3.9)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default="BitDance-B-4x")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=3.9)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    return ap


def main() -> None:
    ap = benchmark_args(__doc__.splitlines()[0])
    ap.add_argument("--export-dir", default=None, help="keep/reuse the ONNX export here (default: a temp dir)")
    ap.add_argument(
        "--backends", nargs="+", default=["torch", "ort-fused", "ort-step"], choices=["torch", "ort-fused", "ort-step"]
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_config(args.model)
    t0 = time.perf_counter()
    model = random_init(BitDance(cfg).eval(), 0)
    print(
        f"{cfg.name}: {cfg.image_size}px, {cfg.ar_steps} AR steps x {args.steps} sampler steps, cfg {args.cfg}, "
        f"{args.threads} threads ({platform.processor() or platform.machine()}); model built in "
        f"{time.perf_counter() - t0:.1f}s"
    )
    backends = {}
    if "torch" in args.backends:
        backends["torch"] = TorchBackend(model)
    if any(b.startswith("ort") for b in args.backends):
        from bitdance_rt.runtime.ort_backend import OrtBackend

        out = Path(args.export_dir or tempfile.mkdtemp(prefix="bitdance-bench-"))
        t0 = time.perf_counter()
        res = export_stages(model, out, random_source(0), stages=list(GENERATION_STAGES), sampler_steps=args.steps)
        print(f"ONNX export {'reused' if res.reused else f'took {time.perf_counter() - t0:.0f}s'}: {out}")
        for name, mode in (("ort-fused", "fused"), ("ort-step", "step")):
            if name in args.backends:
                backends[name] = OrtBackend(out, threads=args.threads, sampler=mode, verify_hashes=False)

    results: dict = {}
    for batch in args.batches:
        labels = [(7 * i + 1) % cfg.num_classes for i in range(batch)]
        for name, backend in backends.items():
            if batch == args.batches[0]:
                warm_up(backend, cfg, args.steps)
            r = run_once(backend, labels, args.steps, args.cfg, 123)
            results.setdefault(batch, {})[name] = r
        ref = results[batch].get("torch")
        print(f"\nbatch {batch}:")
        print(
            f"  {'backend':<10} {'img/s':>8} {'vs torch':>9}   s/image: " + "  ".join(f"{k:>13}" for k in STAGE_CALLS)
        )
        for name, r in results[batch].items():
            ratio = r["images_per_s"] / ref["images_per_s"] if ref else float("nan")
            same = (
                ""
                if ref is None
                else ("  tokens == torch" if torch.equal(r["tokens"], ref["tokens"]) else "  TOKENS DIFFER")
            )
            stages = "  ".join(f"{r['stage_s_per_image'][k]:>13.3f}" for k in STAGE_CALLS)
            print(f"  {name:<10} {r['images_per_s']:>8.4f} {ratio:>8.2f}x   {' ' * 8} {stages}{same}")
    summary = {
        "model": cfg.name,
        "steps": args.steps,
        "cfg": args.cfg,
        "threads": args.threads,
        "results": {
            str(b): {
                n: {k: v for k, v in r.items() if k != "tokens"}
                | ({"speedup_vs_torch": r["images_per_s"] / res_b["torch"]["images_per_s"]} if "torch" in res_b else {})
                for n, r in res_b.items()
            }
            for b, res_b in results.items()
        },
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""Resident memory of a loaded Pipeline against `bitdance-rt plan` (ONNX Runtime, CPU).

    python benchmarks/bench_memory.py                                  # the embedded model
    python benchmarks/bench_memory.py --model BitDance-B-4x --steps 25 # random weights
    python benchmarks/bench_memory.py --checkpoint T2I_DIR --height 512 --width 512 --steps 2
    python benchmarks/bench_memory.py --model BitDance-B-4x --steps 25 --export-dir DIR  # an existing export

Measures the process's resident set (VmRSS) before loading, after loading, and after one
generation of --images images (the KV cache is then allocated for their rows), and prints them
next to the plan's weights held and KV cache, with the ratio measured / planned; ends with one JSON
line. One generation at the export's S runs the fused sampler, so head_step (loaded on demand)
stays out, as in the plan's held weights. The measured growth includes ONNX Runtime's own buffers
(prepacked weights, arenas), which the plan does not count: the ratio says how much they add.
Asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--max-text-tokens", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "int8"))
    ap.add_argument("--images", type=int, default=1, help="images of the one generation (default 1)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--export-dir", default=None, help="run this export (default: the cache's, exported if missing)")
    args = ap.parse_args(argv)

    import torch

    from bitdance_rt import Pipeline
    from bitdance_rt.plan import plan

    import onnxruntime  # noqa: F401  (the baseline holds the runtime's libraries: the model's memory is the rest)

    if args.checkpoint is not None:
        import tokenizers  # noqa: F401
    gc.collect()
    before = rss_bytes()
    pipe = Pipeline.from_pretrained(
        args.model,
        args.checkpoint,
        backend="onnxruntime",
        precision=args.precision,
        steps=args.steps,
        max_batch=args.images,
        height=args.height,
        width=args.width,
        max_text_tokens=args.max_text_tokens,
        threads=args.threads,
        export_dir=args.export_dir,
        progress=False,
    )
    gc.collect()
    loaded = rss_bytes()
    condition = {"prompt": "a red cat"} if pipe.model.t2i else {"labels": 0}
    with torch.no_grad():
        pipe.generate(**condition, num_images=args.images, seed=0)
    gc.collect()
    generated = rss_bytes()
    p = plan(pipe.config, args.precision, "onnxruntime", args.images, steps=pipe.steps)
    kv = getattr(pipe.backend, "_kv", None)  # the cache the core allocated for the rows it served
    cache, rows = (kv.numel() * kv.element_size(), int(kv.shape[2])) if kv is not None else (0, 0)
    sessions = sorted(getattr(pipe.backend, "sessions", {}))  # the graphs loaded (head_step only on demand)
    pipe.close()
    mb = 1e6
    print(
        f"{pipe.config.name}, {args.precision}, ONNX Runtime on {platform.machine()}: resident memory "
        f"{before / mb:.0f} MB before loading"
    )
    print(f"  graphs loaded: {', '.join(sessions)}")
    print(
        f"  after loading    +{(loaded - before) / mb:8.1f} MB   plan: weights held {p.weight_bytes / mb:8.1f} MB "
        f"(ratio {(loaded - before) / p.weight_bytes:.2f})"
    )
    print(
        f"  after generating +{(generated - before) / mb:8.1f} MB   plan: + KV cache of the rows allocated "
        f"{cache / mb:.1f} MB = {(p.weight_bytes + cache) / mb:.1f} MB "
        f"(ratio {(generated - before) / (p.weight_bytes + cache):.2f})"
    )
    print(
        json.dumps(
            {
                "bench": "memory",
                "model": pipe.config.name,
                "precision": args.precision,
                "rss_before": before,
                "rss_loaded": loaded,
                "rss_generated": generated,
                "plan_weight_bytes": p.weight_bytes,
                "plan_distinct_bytes": p.distinct_bytes,
                "cache_bytes": cache,
                "rows": rows,
                "graphs_loaded": sessions,
                "loaded_ratio": (loaded - before) / p.weight_bytes,
                "generated_ratio": (generated - before) / (p.weight_bytes + cache),
            }
        )
    )


if __name__ == "__main__":
    main()

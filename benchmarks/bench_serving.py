"""Serving under load: continuous batching vs serial and static batching, one run, one machine.

    python benchmarks/bench_serving.py                                  # the embedded model
    python benchmarks/bench_serving.py --model BitDance-B-4x --requests 12 --steps 25 --cfg 3.9
    python benchmarks/bench_serving.py --precision int8

One Pipeline (onnxruntime unless --backend says otherwise) serves N one-image requests arriving
as a Poisson process. Measured in this one process, so the ratios compare like with like:
- reference points: batch-1 latency (a request alone) and the offline batch-8 throughput (one
  8-image generation: bench_generate's batch-8 figure);
- saturation: all N requests at once through the continuous-batching scheduler;
- at half of the saturation rate (Poisson arrivals, the same arrival times for every policy):
  continuous batching, serial one-at-a-time, and static batching (wait for a batch of
  --static-batch, then run it);
- time to first AR step of a request (from its arrival) and of the process (cold start).
Prints images/s and latency p50/p95/p99 per policy and the targets' ratios, then one JSON line.
Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time


def _pct(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))] if s else float("nan")


def _stats(latencies, wall, n):
    return {
        "images_per_s": n / wall,
        "wall_s": wall,
        "p50_s": _pct(latencies, 50),
        "p95_s": _pct(latencies, 95),
        "p99_s": _pct(latencies, 99),
        "mean_s": statistics.fmean(latencies),
    }


def arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Poisson process: exponential gaps of mean 1/rate, from t = 0."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def run_continuous(pipe, labels, times):
    """Submit each request at its arrival time; latency = result - arrival."""
    start = time.perf_counter()
    futures = []
    for label, at in zip(labels, times):
        delay = start + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        futures.append((at, pipe.submit(labels=label, seed=label)))
    done = []
    for at, f in futures:
        out = f.result()
        done.append(out)
    wall = time.perf_counter() - start
    # Output.seconds runs from submission (== arrival here, up to the sleep's precision)
    latencies = [o.seconds for o in done]
    first = [o.first_step_seconds for o in done]
    return _stats(latencies, wall, len(labels)) | {"first_step_p50_s": _pct(first, 50)}


def run_serial(pipe, labels, times):
    """One request at a time, in arrival order (a server without batching)."""
    start = time.perf_counter()
    latencies = []
    for label, at in zip(labels, times):
        now = time.perf_counter() - start
        if now < at:
            time.sleep(at - now)
        pipe.generate(labels=label, seed=label)
        latencies.append(time.perf_counter() - start - at)
    return _stats(latencies, time.perf_counter() - start, len(labels))


def run_static(pipe, labels, times, batch: int):
    """Wait until `batch` requests have arrived (or the last one), run them as one batch."""
    start = time.perf_counter()
    latencies = []
    for i in range(0, len(labels), batch):
        group, due = labels[i : i + batch], times[i : i + batch]
        now = time.perf_counter() - start
        if now < due[-1]:
            time.sleep(due[-1] - now)
        pipe.generate(labels=group, seed=i)
        end = time.perf_counter() - start
        latencies += [end - at for at in due]
    return _stats(latencies, time.perf_counter() - start, len(labels))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the embedded tiny-digits model")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--precision", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--cfg", type=float, default=None)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--static-batch", type=int, default=8)
    ap.add_argument("--load", type=float, default=0.5, help="the Poisson run's rate as a share of saturation")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--batch1-runs", type=int, default=3, help="requests alone for the batch-1 latency (median)")
    ap.add_argument(
        "--decode-inline",
        action="store_true",
        help="decode finished requests on the scheduler thread (default: a decode thread beside it)",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    from bitdance_rt import Pipeline

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pipe = Pipeline.from_pretrained(
        args.model,
        backend=args.backend,
        precision=args.precision,
        steps=args.steps,
        max_batch=args.max_batch,
        threads=args.threads,
        progress=False,
        decode_thread=not args.decode_inline,
    )
    load_s = time.perf_counter() - t0
    cfg = pipe.config
    scale = cfg.default_cfg if args.cfg is None else args.cfg
    first = pipe.generate(labels=0, seed=0, cfg=scale)  # also the warm-up
    cold_first_step = load_s + first.first_step_seconds
    cpu = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    flags = sorted({f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f" {f}" in cpu})
    print(
        f"{pipe!r}: {cfg.ar_steps} AR steps x {pipe.steps} sampler steps, cfg {scale}; {args.threads} threads, "
        f"CPU flags {' '.join(flags)}; loaded in {load_s:.1f} s, first AR step {cold_first_step:.1f} s after load start"
    )

    class Scaled:  # every request with the benchmark's guidance
        def __init__(self, p):
            self.p = p

        def submit(self, **kw):
            return self.p.submit(cfg=scale, **kw)

        def generate(self, **kw):
            return self.p.generate(cfg=scale, **kw)

    sp = Scaled(pipe)
    n = cfg.num_classes
    labels = [(7 * i + 1) % n for i in range(args.requests)]
    batch1 = [sp.generate(labels=l, seed=l).seconds for l in labels[: args.batch1_runs]]
    l1 = statistics.median(batch1)
    t = time.perf_counter()
    sp.generate(labels=labels[:8], seed=1)
    offline8 = 8 / (time.perf_counter() - t)
    print(f"batch-1 latency {l1:.3f} s; offline batch-8 {offline8:.3f} images/s")

    sat = run_continuous(sp, labels, [0.0] * len(labels))
    rate = args.load * sat["images_per_s"]
    times = arrivals(len(labels), rate, args.seed)
    results = {"saturation": sat}
    results["continuous"] = run_continuous(sp, labels, times)
    results["serial"] = run_serial(sp, labels, times)
    results["static"] = run_static(sp, labels, times, args.static_batch)
    rows = pipe.scheduler.rows_per_iteration
    print(
        f"\n{'policy':<12} {'img/s':>8} {'p50 s':>8} {'p95 s':>8} {'p99 s':>8}   (Poisson at {rate:.3f} req/s "
        f"= {args.load:.0%} of saturation, {len(labels)} requests)"
    )
    for name, r in results.items():
        print(f"{name:<12} {r['images_per_s']:>8.3f} {r['p50_s']:>8.3f} {r['p95_s']:>8.3f} {r['p99_s']:>8.3f}")
    targets = {
        "saturation_vs_offline_batch8": sat["images_per_s"] / offline8,
        "half_load_p50_vs_batch1": results["continuous"]["p50_s"] / l1,
    }
    print(
        f"\nsaturation / offline batch-8 = {targets['saturation_vs_offline_batch8']:.2f} (target >= 0.9); "
        f"p50 at {args.load:.0%} load / batch-1 = {targets['half_load_p50_vs_batch1']:.2f} (target <= 1.5); "
        f"mean rows per scheduler step {statistics.fmean(rows):.1f}"
    )
    pipe.close()
    print(
        json.dumps(
            {
                "bench": "serving",
                "model": cfg.name,
                "backend": pipe.backend.name,
                "precision": args.precision or "fp32",
                "steps": pipe.steps,
                "cfg": scale,
                "threads": args.threads,
                "cpu_flags": flags,
                "decode_thread": pipe.scheduler._decoder is not None,
                "requests": len(labels),
                "rate_req_s": rate,
                "batch1_latency_s": l1,
                "offline_batch8_images_s": offline8,
                "load_s": load_s,
                "first_ar_step_after_load_start_s": cold_first_step,
                "results": results,
                "targets": targets,
            }
        )
    )


if __name__ == "__main__":
    main()

"""Does the static full-length KV cache (position input, read-only kv -> kv_new) work well in ORT?

Measures, for one model (random weights; the numbers do not depend on them):
- the ORT time per AR step (token_embed, then the backbone's step phase with IO binding of the
  one cache buffer, the backend's write of kv_new included), early vs late step;
- where the backbone graph's time goes in its step phase (ORT profiler, per op type): cache
  handling (Concat, Gather, Slice, ...) against compute (MatMul, ...);
- one plain copy of the cache (numpy) for scale;
- the torch eager step, in place, over the full cache (kv_len=None) and over the written part only
  (kv_len=end, what the torch backend does).

    python benchmarks/ort_kv_cache.py --model BitDance-B-4x --rows 2 8 --threads 1

Prints a table; asserts nothing (timings depend on the machine).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from bitdance_rt import stages as st
from bitdance_rt.config import load_config
from bitdance_rt.export import export_stages, random_source
from bitdance_rt.models import BitDance
from bitdance_rt.models.init import random_init

CACHE_OPS = {"ScatterND", "Concat", "Gather", "Slice", "Split", "Identity", "Unsqueeze", "Squeeze", "Expand"}


def median_ms(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def session(path: Path, threads: int, profile: bool = False):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.enable_profiling = profile
    if profile:  # keep profiler output out of the working directory
        opts.profile_file_prefix = str(Path(tempfile.gettempdir()) / "bitdance_ort_kv_profile")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_step(export_dir: Path, cfg, rows: int, threads: int, iters: int, step: int):
    from bitdance_rt.runtime.ort_backend import OrtBackend

    backend = OrtBackend(export_dir, threads=threads)
    backend.prefill(torch.zeros(rows, dtype=torch.int64))
    tokens = torch.sign(torch.randn(rows, cfg.parallel_num, cfg.token_dim))
    ms = median_ms(lambda: backend.step(tokens, step), iters)

    # Per-op kernel times of the backbone graph alone (step phase), on the same inputs.
    prof = session(export_dir / f"{st.BACKBONE}.onnx", threads, profile=True)
    x = backend._run(st.TOKEN_EMBED, {"tokens": tokens})["x"]
    feed = {
        "x": x.numpy(),
        "start": np.full(rows, st.step_start(cfg, step), dtype=np.int64),
        **{name: backend.kv_cache[i // 2, i % 2].numpy() for i, name in enumerate(st.cache_input_names(cfg))},
    }
    warmup = 2
    for _ in range(warmup + iters):
        prof.run(None, feed)
    profile_file = Path(prof.end_profiling())
    events = json.loads(profile_file.read_text())
    profile_file.unlink()
    first = [e["ts"] for e in events if e.get("name") == "model_run"][warmup]  # skip warm-up runs
    by_op: dict[str, float] = defaultdict(float)
    for ev in events:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time") and ev["ts"] >= first:
            by_op[ev["args"]["op_name"]] += ev["dur"] / 1e3 / iters
    return ms, dict(by_op)


def torch_step(model: BitDance, rows: int, iters: int, step: int, full: bool) -> float:
    cfg = model.cfg
    kv = model.new_cache(rows)
    with torch.inference_mode():
        _, new = model.prefill(torch.zeros(rows, dtype=torch.int64))
        model.write_cache(kv, new, 0)
        tokens = torch.sign(torch.randn(rows, cfg.parallel_num, cfg.token_dim))
        start = st.step_start(cfg, step)
        return median_ms(lambda: model.step(tokens, step, kv, kv_len=None if full else start), iters)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="BitDance-B-4x")
    ap.add_argument("--rows", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--export-dir", default=None, help="reuse/keep the export here (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.model)
    model = random_init(BitDance(cfg).eval(), 0)
    out = Path(args.export_dir or tempfile.mkdtemp(prefix="bitdance-kv-"))
    try:
        t = time.perf_counter()
        res = export_stages(
            model,
            out,
            random_source(0),
            stages=[st.PREFIX_EMBED, st.TOKEN_EMBED, st.BACKBONE, st.HEAD_STEP, st.DECODER],
        )
        print(
            f"{cfg.name}: L={cfg.max_seq_len} n_layer={cfg.n_layer} heads={cfg.n_head} hd={cfg.head_dim}; "
            f"export {'reused' if res.reused else f'took {time.perf_counter() - t:.1f}s'} -> {out}"
        )
        report(out, cfg, model, args)
    finally:
        if args.export_dir is None:
            shutil.rmtree(out, ignore_errors=True)


def report(out: Path, cfg, model: BitDance, args) -> None:
    early, late = 1, cfg.ar_steps - 1
    for rows in args.rows:
        cache_mb = np.prod(st.kv_shape(cfg, rows)) * 4 / 2**20
        src = np.ones(st.kv_shape(cfg, rows), dtype=np.float32)
        dst = np.empty_like(src)
        copy_ms = median_ms(lambda: np.copyto(dst, src), args.iters)
        ms_early, ops = ort_step(out, cfg, rows, args.threads, args.iters, early)
        ms_late, _ = ort_step(out, cfg, rows, args.threads, args.iters, late)
        cache_ms = sum(v for k, v in ops.items() if k in CACHE_OPS)
        total = sum(ops.values())
        t_full = torch_step(model, rows, args.iters, late, full=True)
        t_trunc = torch_step(model, rows, args.iters, late, full=False)
        top = ", ".join(f"{k} {v:.1f}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:6])
        print(f"rows={rows}: cache {cache_mb:.0f} MiB, one numpy copy {copy_ms:.1f} ms")
        print(
            f"  ORT step (token_embed + backbone, static cache, IO binding, kv_new written): step {early} "
            f"{ms_early:.1f} ms, step {late} {ms_late:.1f} ms"
        )
        share = 100 * cache_ms / max(total, 1e-9)
        print(f"  ORT backbone kernels {total:.1f} ms, of which cache ops {cache_ms:.1f} ms ({share:.0f}%): {top}")
        print(f"  torch eager step {late}: full cache {t_full:.1f} ms, written part only {t_trunc:.1f} ms")


if __name__ == "__main__":
    main()

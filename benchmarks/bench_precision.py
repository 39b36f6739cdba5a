"""INT8, weight-only INT4 (and FP16) vs FP32 on ONNX Runtime, plus the fidelity of each, in one run.

    python benchmarks/bench_precision.py                          # BitDance-B-4x, random weights
    python benchmarks/bench_precision.py --model tiny-4x --batches 1 8

Settings follow the main benchmark (bench_generate.py): 256px, S=25, CFG 3.9 (linear), batch 1 and
8, seeded random weights. The INT8 graphs are calibrated on trajectories captured from the torch
reference (--calib-images images); INT4 needs no calibration. FP32 and INT4 run with the fused
sampler and with head_step (INT8 samples with head_step, see precision/derive.py), so the ratio to
FP32 head_step isolates the precision; the JSON line has INT4's head + backbone time over INT8's.
On a CPU whose U8S8 kernels are exact (VNNI), INT8 is also timed on the U8U8 kernels that CPUs
without VNNI run (int8-u8u8: what exactness costs there). Prints images/s, the per-stage
breakdown and the ratios, then the teacher-forced fidelity report (--report-images images), then
one JSON line. Asserts nothing.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from pathlib import Path

import torch
from bench_generate import benchmark_args, run_once, warm_up

from bitdance_rt.calibration import CapturePolicy, capture, load_calibration, save_calibration
from bitdance_rt.config import load_config
from bitdance_rt.export import export_stages, random_source
from bitdance_rt.stages import GENERATION_STAGES
from bitdance_rt.models import BitDance
from bitdance_rt.models.init import random_init
from bitdance_rt.precision.derive import derive_export
from bitdance_rt.precision.report import compare
from bitdance_rt.runtime import int8_kernels
from bitdance_rt.runtime.ort_backend import OrtBackend
from bitdance_rt.runtime.timing import STAGE_CALLS
from bitdance_rt.runtime.torch_backend import TorchBackend


def ratios(r: dict, res: dict) -> dict:
    """images/s of one backend over each reference's measured in the same run."""
    return {
        f"vs_{n.replace('-', '_')}": r["images_per_s"] / res[n]["images_per_s"]
        for n in ("fp32-step", "fp32-fused", "torch")
        if n in res
    }


def main() -> None:
    ap = benchmark_args(__doc__.splitlines()[0])
    ap.add_argument("--method", default="max", choices=["max", "entropy", "percentile"])
    ap.add_argument("--calib-images", type=int, default=2)
    ap.add_argument("--report-images", type=int, default=2)
    ap.add_argument("--fp16", action="store_true", help="also time FP16 graphs (slow on x86 CPUs: no FP16 math)")
    ap.add_argument("--work-dir", default=None, help="keep/reuse exports and the calibration set here")
    ap.add_argument("--torch", action="store_true", help="also time the torch eager reference (ratios vs it too)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per backend and batch; the fastest counts")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_config(args.model)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bitdance-bench-precision-"))
    model = random_init(BitDance(cfg).eval(), 0)
    source = random_source(0)
    t0 = time.perf_counter()
    fp32 = export_stages(model, work / "fp32", source, stages=list(GENERATION_STAGES), sampler_steps=args.steps)
    print(f"{cfg.name}: FP32 export {'reused' if fp32.reused else f'{time.perf_counter() - t0:.0f}s'} ({work})")

    t0 = time.perf_counter()
    labels = [(7 * i + 3) % cfg.num_classes for i in range(args.calib_images)]
    cal_dir = work / f"calibration-{args.calib_images}"
    if (cal_dir / "calibration.json").is_file():  # (a set of another model or steps is refused here)
        cset = load_calibration(cal_dir, config=cfg, weights=source, steps=args.steps)
        print(f"calibration set reused ({cal_dir})")
    else:
        policy = CapturePolicy(head_fraction=0.05, max_samples=128)
        cset = capture(model, source, labels, [0], args.steps, args.cfg, "linear", policy, batch_size=1).dataset
        save_calibration(cset, cal_dir)
        print(
            f"calibration capture ({len(labels)} images, torch): {time.perf_counter() - t0:.0f}s; samples "
            + ", ".join(f"{k} {len(v)}" for k, v in cset.samples.items())
            + " (backbone "
            + ", ".join(f"{p} {n}" for p, n in cset.phase_counts("backbone").items())
            + ")"
        )
    exports = {"fp32": fp32.directory}
    for precision in ["int8", "int4"] + (["fp16"] if args.fp16 else []):
        t0 = time.perf_counter()
        calibration = cset if precision == "int8" else None  # (INT4 is weight-only)
        exports[precision] = derive_export(
            fp32.directory, work / precision, precision, calibration, args.method
        ).directory
        print(f"{precision} graphs: {time.perf_counter() - t0:.0f}s")

    del cset  # (memory: the timed runs need every GiB on a 24 GiB machine)

    # One backend alive at a time, run over every batch size: each ONNX Runtime backend holds its own copy of
    # the weights and a memory arena sized by its largest batch, and four of them exceed 24 GiB at batch 8.
    makers = {"torch": lambda: TorchBackend(model)} if args.torch else {}
    makers |= {
        "fp32-fused": lambda: OrtBackend(exports["fp32"], threads=args.threads, sampler="fused", verify_hashes=False),
        "fp32-step": lambda: OrtBackend(exports["fp32"], threads=args.threads, sampler="step", verify_hashes=False),
        "int8-step": lambda: OrtBackend(exports["int8"], threads=args.threads, verify_hashes=False),
        "int4-fused": lambda: OrtBackend(exports["int4"], threads=args.threads, sampler="fused", verify_hashes=False),
        "int4-step": lambda: OrtBackend(exports["int4"], threads=args.threads, sampler="step", verify_hashes=False),
    }
    exact = int8_kernels.resolve()
    if not exact:  # this CPU's U8S8 kernels are exact: time the U8U8 branch of other CPUs too
        makers["int8-u8u8"] = lambda: OrtBackend(
            exports["int8"], threads=args.threads, verify_hashes=False, int8_kernels="exact"
        )
    print(f"CPU: {int8_kernels.cpu_summary()}; int8-step: {int8_kernels.kernels_note(exact)}")
    if args.fp16:
        makers["fp16-fused"] = lambda: OrtBackend(
            exports["fp16"], threads=args.threads, sampler="fused", verify_hashes=False
        )
    # Batch-major, so the runs a ratio compares are minutes apart, not the whole benchmark apart.
    results: dict = {batch: {} for batch in args.batches}
    for batch in args.batches:
        run_labels = [(7 * i + 1) % cfg.num_classes for i in range(batch)]
        for name, make in makers.items():
            backend = make()
            warm_up(backend, cfg, args.steps)
            runs = [run_once(backend, run_labels, args.steps, args.cfg, 123) for _ in range(args.repeats)]
            results[batch][name] = min(runs, key=lambda r: r["seconds"])
            del backend, runs
            gc.collect()
    for batch in args.batches:
        res = results[batch]
        refs = [n for n in ("fp32-step", "fp32-fused", "torch") if n in res]
        print(f"\nbatch {batch}:")
        print(
            f"  {'backend':<11} {'img/s':>8} "
            + " ".join(f"{'vs ' + n:>13}" for n in refs)
            + "   s/image: "
            + "  ".join(f"{k:>13}" for k in STAGE_CALLS)
        )
        for name, r in res.items():
            vs = " ".join(f"{x:>12.2f}x" for x in ratios(r, res).values())
            stages = "  ".join(f"{r['stage_s_per_image'][k]:>13.3f}" for k in STAGE_CALLS)
            print(f"  {name:<11} {r['images_per_s']:>8.4f} {vs}   {' ' * 8} {stages}")

    t0 = time.perf_counter()
    report_labels = [(11 * i + 5) % cfg.num_classes for i in range(args.report_images)]
    reference = makers["fp32-step"]()
    fidelity = {
        p: compare(
            reference,
            OrtBackend(exports[p], threads=args.threads, verify_hashes=False),
            report_labels,
            [7],
            args.steps,
            args.cfg,
            batch_size=args.report_images,
            free_running=False,
        ).to_json()
        for p in exports
        if p != "fp32"
    }
    print(f"\nteacher-forced fidelity vs FP32 ({args.report_images} images, {time.perf_counter() - t0:.0f}s):")
    for p, j in fidelity.items():
        tf = j["teacher_forced"]
        phases = tf["backbone"]["phases"]
        print(
            f"  {p}: bit agreement token_embed {tf['token_embed']['bit_agreement']:.4f}, backbone prefill "
            f"{phases['prefill']['bit_agreement']:.4f} / step {phases['step']['bit_agreement']:.4f}, head "
            f"{tf['head']['bit_agreement']:.4f}, end to end {tf['end_to_end']['bit_agreement']:.4f}; decoder PSNR "
            f"{tf['decoder']['psnr_db_min']:.1f} dB"
        )
    summary = {
        "model": cfg.name,
        "cpu": int8_kernels.cpu_summary(),
        "int8_exact_kernels": exact,
        "steps": args.steps,
        "cfg": args.cfg,
        "threads": args.threads,
        "method": args.method,
        "results": {
            str(b): {n: {k: v for k, v in r.items() if k != "tokens"} | ratios(r, res_b) for n, r in res_b.items()}
            for b, res_b in results.items()
        },
        "fidelity": fidelity,
        # the issue's INT4 goal: the head and the backbone (prefill + AR steps + sampling) at most 0.5x INT8's
        "int4_vs_int8_head_backbone": {
            str(b): {
                name: round(_head_backbone(res_b[name]) / _head_backbone(res_b["int8-step"]), 3)
                for name in ("int4-fused", "int4-step")
            }
            for b, res_b in results.items()
        },
    }
    print(json.dumps(summary))


def _head_backbone(run: dict) -> float:
    """Seconds per image in the stages INT4 quantises: prefill, AR steps and token sampling."""
    return sum(run["stage_s_per_image"][k] for k in ("prefill", "step", "sample_tokens"))


if __name__ == "__main__":
    main()

"""How fast can ONNX Runtime's INT4 kernels be on this CPU? The head's weight MatMuls alone, per form.

    python benchmarks/int4_kernels.py                    # BitDance-B-4x's head shapes, 8 and 128 rows
    python benchmarks/int4_kernels.py --rows 8 --threads 2 --reps 30

Why: issue 23's goal is head + backbone at INT4 <= 0.5x INT8's time, and bench_precision.py measured
whole stages at 1.27x. This isolates the kernels: one graph holding every weight MatMul of the head of
--model (random weights, each reading a [rows, K] input), written as FP32 MatMuls, as the INT8 Q/DQ
graph quantize_int8 writes (run on the kernels this CPU's INT8 sessions use), and as MatMulNBits at
each block size with activations in float32 (accuracy_level 0, what bitdance-rt ships) and in int8
(accuracy_level 4, ONNX Runtime's int8-activation kernels). Everything else a stage does is left out,
so these times bound what any INT4 graph of these weights can reach here. Prints a table and the
ratios to INT8, then one JSON line. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np


def head_shapes(model: str) -> Counter:
    """{(K, N): count} of the head's Linear layers (a meta-device model: no weights are made)."""
    import torch

    from bitdance_rt.config import load_config
    from bitdance_rt.models import BitDance

    with torch.device("meta"):
        m = BitDance(load_config(model))
    return Counter(
        (mod.in_features, mod.out_features)
        for name, mod in m.named_modules()
        if name.startswith("head") and isinstance(mod, torch.nn.Linear)
    )


def fp32_graph(shapes: Counter, path: Path) -> list[str]:
    """One graph: input x<K> [rows, K] per input width, a MatMul per weight, every product an output."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    ks = sorted({k for k, _ in shapes})
    nodes, inits, outs = [], [], []
    for i, ((k, n), count) in enumerate(sorted(shapes.items())):
        for j in range(count):
            w = f"w{i}_{j}"
            inits.append(numpy_helper.from_array((rng.standard_normal((k, n)) * k**-0.5).astype(np.float32), w))
            nodes.append(helper.make_node("MatMul", [f"x{k}", w], [f"y{i}_{j}"], name=f"/mm{i}_{j}/MatMul"))
            outs.append(helper.make_tensor_value_info(f"y{i}_{j}", TensorProto.FLOAT, ["rows", n]))
    ins = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, ["rows", k]) for k in ks]
    graph = helper.make_graph(nodes, "head_matmuls", ins, outs, inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return [n.name for n in nodes]


class _Reader:
    """One calibration feed (quantize_int8's reader protocol)."""

    def __init__(self, feed):
        self.feed, self.done = feed, False

    def __len__(self):
        return 1

    def get_next(self):
        if self.done:
            return None
        self.done = True
        return self.feed

    def rewind(self):
        self.done = False


def with_accuracy_level(src: Path, dst: Path, level: int) -> None:
    import onnx
    from onnx import helper

    model = onnx.load(str(src))
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            node.attribute.append(helper.make_attribute("accuracy_level", level))
    onnx.save(model, str(dst))


def time_ms(path: Path, feed: dict, threads: int, reps: int, int8: bool = False) -> float:
    import onnxruntime as ort

    from bitdance_rt.runtime import int8_kernels

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    if int8:
        int8_kernels.configure(opts, int8_kernels.resolve())
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for _ in range(3):
        session.run(None, feed)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    from bitdance_rt.precision.int4 import INT4_BLOCK_SIZES, quantize_int4
    from bitdance_rt.precision.int8 import quantize_int8
    from bitdance_rt.runtime import int8_kernels

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="BitDance-B-4x")
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 128], help="8: batch 1 x 4 tokens x CFG 2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()

    shapes = head_shapes(args.model)
    params = sum(k * n * c for (k, n), c in shapes.items())
    work = Path(tempfile.mkdtemp(prefix="int4-kernels-"))
    names = fp32_graph(shapes, work / "fp32.onnx")
    ks = sorted({k for k, _ in shapes})
    feeds = {
        r: {f"x{k}": np.random.default_rng(r).standard_normal((r, k), dtype=np.float32) for k in ks} for r in args.rows
    }
    quantize_int8(work / "fp32.onnx", work / "int8.onnx", _Reader(feeds[max(args.rows)]))
    forms = {"fp32": work / "fp32.onnx", "int8": work / "int8.onnx"}
    for block in INT4_BLOCK_SIZES:
        quantize_int4(work / "fp32.onnx", work / f"int4-b{block}.onnx", names, block)
        for level in (0, 4):
            with_accuracy_level(work / f"int4-b{block}.onnx", work / f"int4-b{block}-acc{level}.onnx", level)
            forms[f"int4-b{block}-acc{level}"] = work / f"int4-b{block}-acc{level}.onnx"
    kernels = int8_kernels.kernels_note(int8_kernels.resolve())
    print(
        f"{args.model} head: {sum(shapes.values())} weight MatMuls, {params / 1e6:.1f} M weights; "
        f"{args.threads} threads; INT8 {kernels}; CPU {int8_kernels.cpu_summary()}"
    )
    ms = {
        r: {name: time_ms(p, feeds[r], args.threads, args.reps, name == "int8") for name, p in forms.items()}
        for r in args.rows
    }
    print(f"{'form':<18}" + "".join(f"{f'{r} rows ms':>14}{'/ int8':>8}" for r in args.rows))
    for name in forms:
        print(f"{name:<18}" + "".join(f"{ms[r][name]:>14.2f}{ms[r][name] / ms[r]['int8']:>8.2f}" for r in args.rows))
    best = {r: min((v, k) for k, v in ms[r].items() if k.startswith("int4")) for r in args.rows}
    for r in args.rows:
        print(f"{r} rows: fastest INT4 form {best[r][1]}, {best[r][0] / ms[r]['int8']:.2f}x INT8 (goal 0.5x)")
    line = {
        "benchmark": "int4_kernels",
        "model": args.model,
        "threads": args.threads,
        "cpu": int8_kernels.cpu_summary(),
        "ms": {str(r): {k: round(v, 3) for k, v in ms[r].items()} for r in args.rows},
        "best_int4_over_int8": {str(r): round(best[r][0] / ms[r]["int8"], 3) for r in args.rows},
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()

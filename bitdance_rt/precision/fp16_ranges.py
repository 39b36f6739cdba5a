"""Activation ranges for a streamed INT8 export, measured on its FP16 graphs.

The 14B model has no FP32 graph to calibrate on (60 GB), and ONNX Runtime's calibrators load a graph
with its weights and write an augmented copy of it (2-3x the graph in RAM and on disk). Here a stage's
FP16 graph (the streamed FP16 export the calibration capture ran) is read without its weights, the
tensors the INT8 policy quantises (the activation input of each weight MatMul / Gemm / Conv, a Conv's
output) become graph outputs, and one ONNX Runtime session, which reads the weights from the export's
own files, runs the calibration feeds. The ranges are reduced as int8.activation_ranges' calibrators
reduce them (max: ONNX Runtime's symmetric MinMax rule; entropy / percentile: its HistogramCollector
with the same bins, fed one feed at a time where the calibrator feeds a group at once) and saved as
the calibration cache quantize_streamed reads, under the FP32 graph's tensor names. FP16 activations
carry FP16 rounding (2^-11 relative), and so do these ranges. The histograms are of the activations
widened to float32, as the FP32 graph's would be: bins edged in float16 collapse (numpy 2 refuses
2048 of them over [0, 2]; numpy 1 made them silently uneven).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np

from ..errors import BitDanceError
from .int8 import _METHODS, method_name
from .policy import INT8_OUTPUT_OP_TYPES, check_method, quantised_layers

# int8.activation_ranges' histogram settings (its docstring says why these bins)
_HISTOGRAMS = {"entropy": dict(num_bins=512, num_quantized_bins=128), "percentile": dict(num_bins=2048)}
_PERCENTILE = 99.999


def _calibrated(graph, nodes: list[str]) -> dict[str, str]:
    """{FP16 graph tensor: FP32 graph tensor} for the tensors the quantiser needs ranges of. The FP16
    converter keeps the float32 graph inputs and outputs through Casts of its own: a node reads input
    x as <x>_cast_to_<node>, and a node that made output y makes <node>_cast_to_<y> instead; the FP32
    graph's node reads x and makes y. Every other tensor keeps its name."""
    inputs, outputs = {i.name for i in graph.input}, {o.name for o in graph.output}
    cast_in = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Cast" and n.input[0] in inputs}
    cast_out = {n.input[0]: n.output[0] for n in graph.node if n.op_type == "Cast" and n.output[0] in outputs}
    wanted = set(nodes)
    names = {}
    for node in graph.node:
        if node.name not in wanted:
            continue
        x = node.input[0]
        names[x] = cast_in[x] if x in cast_in and x == f"{cast_in[x]}_cast_to_{node.name}" else x
        if node.op_type in INT8_OUTPUT_OP_TYPES:
            y = node.output[0]
            names[y] = cast_out[y] if y in cast_out and y == f"{node.name}_cast_to_{cast_out[y]}" else y
    return names


_MIN, _MAX = "__bitdance_rt_min", "__bitdance_rt_max"  # suffixes of the reduced outputs


def _session(model, fp16_path: Path, outputs: list[str], threads: int | None, providers, reduce: bool):
    """A session of the FP16 graph with `outputs` added (`reduce`: their min and max, <name>_MIN / _MAX, as
    ONNX Runtime's MinMax calibrator adds them: a decoder's feature maps at 1024 px are GBs), made from the
    weightless graph in memory; ONNX Runtime reads the weights from the export's own files (its
    external-initializer folder option). `model`: the weightless graph read from fp16_path, extended in place."""
    import onnx
    import onnxruntime as ort

    from ..export.shared_weights import infer_shapes
    from ..runtime.ort_backend import normalize_providers

    types = {v.name: v.type.tensor_type.elem_type for v in infer_shapes(model).graph.value_info}
    types.update({v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)})
    have = {o.name for o in model.graph.output}
    for name in outputs:
        if name not in types:
            raise BitDanceError(f"{fp16_path}: tensor {name!r} has no inferred type (cannot read its range)")
        if reduce:
            for op, suffix in (("ReduceMin", _MIN), ("ReduceMax", _MAX)):
                model.graph.node.append(onnx.helper.make_node(op, [name], [name + suffix], keepdims=0))
                model.graph.output.append(onnx.helper.make_tensor_value_info(name + suffix, types[name], []))
        elif name not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
    options = ort.SessionOptions()
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(fp16_path.parent))
    # Lean, not fast: on a CPU without FP16 GEMMs ONNX Runtime casts the weights to FP32, and its optimiser
    # folds those casts (and prepacks) into FP32 copies of every weight, which its arena keeps: 2.9 GiB for
    # a 1.27 GB FP16 backbone (two Qwen3-14B layers), 2.3 GiB without them (the casts then run per call,
    # one weight at a time, 1.3x slower; measured on the 2-core EPYC, 2026-12-05).
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=normalize_providers(providers))


def fp16_ranges(fp16_path, reader, method: str, out_file, threads: int | None = None, providers=None) -> Path:
    """Measure the activation ranges of FP16 stage graph `fp16_path` over the calibration `reader`
    (get_next / rewind, and `groups()` for the backbone's phases) and save them to `out_file` (a
    calibration cache, FP32 tensor names, float32 values), written whole or not at all."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import HistogramCollector, TensorData, TensorsData, save_tensors_data

    check_method(method)
    fp16_path, out_file = Path(fp16_path), Path(out_file)
    if len(reader) == 0:
        raise BitDanceError(f"no calibration samples for {fp16_path.stem}: the calibration set has none of this stage")
    import onnx

    model = onnx.load(str(fp16_path), load_external_data=False)  # (read once: the weightless graph)
    names = _calibrated(model.graph, quantised_layers(model))
    collector = None
    if method != "max":
        collector = HistogramCollector(
            method, True, percentile=_PERCENTILE, scenario="same", **{"num_quantized_bins": 128, **_HISTOGRAMS[method]}
        )
    low, high = {}, {}
    outputs = sorted(names)
    session = _session(model, fp16_path, outputs, threads, providers, reduce=collector is None)
    fetch = outputs if collector is not None else [n + suffix for n in outputs for suffix in (_MIN, _MAX)]
    for group in reader.groups() if hasattr(reader, "groups") else [reader]:
        if hasattr(group, "rewind"):
            group.rewind()
        while (feed := group.get_next()) is not None:
            values = dict(zip(fetch, session.run(fetch, feed)))
            if collector is not None:
                values = {k: np.asarray(v, np.float32) for k, v in values.items()}  # (see the docstring)
                with contextlib.redirect_stdout(io.StringIO()):  # (it prints its progress)
                    collector.collect(values)  # one feed at a time: a group's activations of a 14B are GBs
                continue
            for name in outputs:
                lo, hi = np.float32(values[name + _MIN]), np.float32(values[name + _MAX])
                low[name] = min(low.get(name, lo), lo)
                high[name] = max(high.get(name, hi), hi)
    del session
    if collector is None:  # ONNX Runtime's MinMax, symmetric: +/- the largest magnitude
        found = {}
        for name in outputs:
            m = np.float32(max(abs(low[name]), abs(high[name])))
            found[name] = TensorData(lowest=np.array(-m, np.float32), highest=np.array(m, np.float32))
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            computed = collector.compute_collection_result()
        found = {}
        for name, value in computed.items():
            lo, hi = value.range_value if isinstance(value, TensorData) else value[:2]
            found[name] = TensorData(lowest=np.asarray(lo, np.float32), highest=np.asarray(hi, np.float32))
    data = TensorsData(getattr(CalibrationMethod, _METHODS[method]), {names[k]: v for k, v in found.items()})
    assert method_name(data.calibration_method) == method
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_tensors_data(data, out_file)  # (temp file + rename)
    return out_file


def ranges_for(fp16_dir, calibration, method: str, threads: int | None = None, providers=None) -> dict[str, Path]:
    """{INT8 stage: its activation-range file}, measured on the FP16 export `fp16_dir` over the
    calibration set, or reused from the cache (paths.ranges_dir: keyed by the export's and the set's keys
    and the method). A stage's file appears whole once measured (a stopped run measures the rest again)."""
    from .. import paths
    from .. import stages as st
    from ..export.manifest import read_manifest, stage_files

    fp16_dir = Path(fp16_dir)
    manifest = read_manifest(fp16_dir)
    if manifest.get("precision") != "fp16":
        raise BitDanceError(
            f"{fp16_dir}: activation ranges are measured on FP16 graphs, this export holds "
            f"{manifest.get('precision', 'fp32')} ones"
        )
    where = paths.ranges_dir(fp16_dir, method, [manifest["key"], calibration.key])
    files = {}
    for stage in st.INT8_STAGES:
        out = where / f"{stage}.json"
        if not out.is_file():
            graph = fp16_dir / stage_files(manifest, fp16_dir, stage)[0]
            fp16_ranges(graph, calibration.reader(stage), method, out, threads, providers)
        files[stage] = out
    return files

"""Activation ranges for a streamed INT8 export, measured on its FP16 graphs.

The 14B model has no FP32 graph to calibrate on (60 GB), and ONNX Runtime's calibrators load a graph
with its weights and write an augmented copy of it (2-3x the graph in RAM and on disk). Here a stage's
FP16 graph (the streamed FP16 export the calibration capture ran) is read without its weights, the
tensors the INT8 policy quantises (the activation input of each weight MatMul / Gemm / Conv, a Conv's
output) become graph outputs, and ONNX Runtime sessions, which read the weights from the export's own
files, run the calibration feeds: one session per piece of about 256 MiB of weights (graph_pieces.py),
so what is held does not grow with the layer count. The ranges are reduced as int8.activation_ranges' calibrators
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
# Weights per ONNX Runtime session (graph_pieces.py): the 14B's FP16 backbone runs in ~100 pieces, so the
# session is not what grows with the layer count. Ranges of a real-width 2-layer Qwen3 backbone (1.24 GB
# of FP16 weights, 4 calibration samples), 2-core EPYC, 2026-12-06: peak 2.92 GiB with 1 GiB pieces
# (one piece: the whole graph), 1.94 GiB with 256 MiB, in the same time (82 / 86 s).
PIECE_BYTES = 256 << 20


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


def _types(model) -> dict[str, int]:
    """{tensor: ONNX element type} of every tensor of the weightless graph `model` (shape inference)."""
    from ..export.skeleton import infer_shapes

    types = {v.name: v.type.tensor_type.elem_type for v in infer_shapes(model).graph.value_info}
    types.update({v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)})
    return types


def _session(piece, fp16_path: Path, types: dict, threads: int | None, providers, reduce: bool):
    """A session of graph piece `piece` (graph_pieces.Piece) with its wanted tensors added as outputs
    (`reduce`: their min and max, <name>_MIN / _MAX, as ONNX Runtime's MinMax calibrator adds them: a
    decoder's feature maps at 1024 px are GBs), made from the weightless graph in memory; ONNX Runtime
    reads the weights from the export's own files (its external-initializer folder option)."""
    import onnx
    import onnxruntime as ort

    from ..runtime.ort_backend import lean_options, normalize_providers

    model = piece.model
    have = {o.name for o in model.graph.output}
    for name in piece.wanted:
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
    lean_options(ort, options)  # (casting the weights to FP32 one MatMul at a time on a CPU without FP16 GEMMs)
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=normalize_providers(providers))


class _Carry:
    """The tensors pieces hand on, per feed, in .npy files under `folder` (a 14B's step feeds carry
    a [rows, 64, 5120] residual each: GBs over a calibration set), read back memory-mapped and deleted
    after the last piece that reads them."""

    def __init__(self, folder: Path, pieces):
        self.folder = folder
        self.last = {t: n for n, piece in enumerate(pieces) for t in piece.carry_in}
        self.number = {t: k for k, t in enumerate(sorted(self.last))}

    def _file(self, feed: int, name: str) -> Path:
        return self.folder / f"{feed}-{self.number[name]}.npy"

    def put(self, feed: int, values: dict) -> None:
        for name, value in values.items():
            np.save(self._file(feed, name), value)

    def take(self, feed: int, names: list[str], piece: int) -> dict:
        out = {}
        for name in names:
            path = self._file(feed, name)
            out[name] = np.load(path, mmap_mode="r")
            if self.last[name] == piece:
                path.unlink()  # (the map keeps the data until the run is done)
        return out


def fp16_ranges(
    fp16_path, reader, method: str, out_file, threads: int | None = None, providers=None, piece_bytes: int = PIECE_BYTES
) -> Path:
    """Measure the activation ranges of FP16 stage graph `fp16_path` over the calibration `reader`
    (get_next / rewind, and `groups()` for the backbone's phases) and save them to `out_file` (a
    calibration cache, FP32 tensor names, float32 values), written whole or not at all. The graph runs
    in pieces of about `piece_bytes` of weights (graph_pieces.py), each over every feed."""
    import tempfile

    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import HistogramCollector, TensorData, TensorsData, save_tensors_data

    from .graph_pieces import cut

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
    types = _types(model)
    pieces = cut(model, sorted(names), types, piece_bytes)
    del model
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_file.parent, prefix=f".{out_file.stem}-carry-") as folder:
        carry = _Carry(Path(folder), pieces)
        for n, piece in enumerate(pieces):
            session = _session(piece, fp16_path, types, threads, providers, reduce=collector is None)
            wanted = piece.wanted if collector is not None else [w + x for w in piece.wanted for x in (_MIN, _MAX)]
            fetch = wanted + [t for t in piece.carry_out if t not in wanted]
            feed_no = 0
            for group in reader.groups() if hasattr(reader, "groups") else [reader]:
                if hasattr(group, "rewind"):
                    group.rewind()
                while (feed := group.get_next()) is not None:
                    inputs = {name: feed[name] for name in piece.inputs}
                    inputs.update(carry.take(feed_no, piece.carry_in, n))
                    values = dict(zip(fetch, session.run(fetch, inputs)))
                    carry.put(feed_no, {t: values[t] for t in piece.carry_out})
                    feed_no += 1
                    if collector is not None:
                        values = {k: np.asarray(values[k], np.float32) for k in wanted}  # (see the module doc)
                        with contextlib.redirect_stdout(io.StringIO()):  # (it prints its progress)
                            collector.collect(values)  # one feed at a time: a group's activations of a 14B are GBs
                        continue
                    for name in piece.wanted:
                        lo, hi = np.float32(values[name + _MIN]), np.float32(values[name + _MAX])
                        low[name] = min(low.get(name, lo), lo)
                        high[name] = max(high.get(name, hi), hi)
            del session
    if collector is None:  # ONNX Runtime's MinMax, symmetric: +/- the largest magnitude
        found = {}
        for name in sorted(names):
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

"""FP32 stage graph + calibration feeds -> INT8 Q/DQ stage graph, with ONNX Runtime's quantize_static.

Why ONNX Runtime's quantizer (onnxruntime.quantization.quantize_static, QDQ format) and not
NVIDIA ModelOpt's ONNX PTQ: it is already a dependency of the CPU path, it is pure Python on
top of onnxruntime (ModelOpt's ONNX extra pulls CUDA torch, onnxruntime-gpu and CuPy), and the
Q/DQ graphs it writes are the standard ONNX QuantizeLinear/DequantizeLinear pairs that both
ONNX Runtime and TensorRT's explicit quantization read. The settings below produce the
placement of policy.py: symmetric int8 activations (zero point 0, as TensorRT requires),
per-output-channel symmetric int8 weights, only weight MatMul / Gemm / Conv inputs (and Conv
outputs) quantised, float biases; then qdq_fixups.py lets ONNX Runtime run it on integer kernels.
Calibration method: max (MinMax), entropy (KL) or percentile (99.999%).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path

from ..errors import BitDanceError
from ..export.shared_weights import EXTERNAL_DATA_BYTES
from .policy import INT8_OP_TYPES, INT8_OUTPUT_OP_TYPES, check_method, quantised_layers
from .qdq_fixups import fix_for_integer_kernels

_METHODS = {"max": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def method_name(calibration_method) -> str | None:
    """Our name (max, entropy, percentile) of an onnxruntime CalibrationMethod; None for any other."""
    return next(
        (ours for ours, theirs in _METHODS.items() if getattr(calibration_method, "name", None) == theirs), None
    )


def quantize_options(method: str) -> dict:
    """The quantize_static keyword arguments of our policy (without model paths and data)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    check_method(method)
    return dict(
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(INT8_OP_TYPES),
        per_channel=True,
        reduce_range=False,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, _METHODS[method]),
        extra_options={
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "MatMulConstBOnly": True,  # attention's activation x activation products stay float
            # ... and so that GEMM outputs stay float (ONNX Runtime's QDQ mode would round them, and with them
            # the residual adds' inputs, to int8). Conv outputs are quantised: see policy.py
            "OpTypesToExcludeOutputQuantization": [t for t in INT8_OP_TYPES if t not in INT8_OUTPUT_OP_TYPES],
            # a tensor read by a quantised op and by others: the others keep reading the float tensor
            "DedicatedQDQPair": True,
            "QuantizeBias": False,  # float bias: TensorRT fuses it; an int32 bias would add a DQ
            "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},  # weight [in, out]: one scale per output
        },
    )


def quantised_nodes(fp32, nodes_to_exclude=()) -> list[str]:
    """The nodes quantize_static is told to quantise (its nodes_to_quantize) in an FP32 graph (a file or
    an onnx.ModelProto): the policy's quantisable layers but `nodes_to_exclude`. Named, because in QDQ
    mode MatMulConstBOnly alone still lets activation x activation MatMuls through."""
    excluded = set(nodes_to_exclude)
    return [n for n in quantised_layers(fp32) if n not in excluded]


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


QUANTISER_LOGGER = "onnxruntime.quantization"  # its modules' named loggers (shape inference, ...)


@contextlib.contextmanager
def quiet_quantiser():
    """Within the block, ONNX Runtime's quantiser says nothing below ERROR, and every other logger
    is left alone (no process-wide logging.disable). The quantiser logs its advice through the
    module functions (logging.warning / logging.info: records of the ROOT logger itself), so a
    filter on the root logger drops exactly those (a logger's filters see only its own records,
    not those its children propagate: an application's named loggers still emit); its named
    loggers under `onnxruntime.quantization` get level ERROR. Those module functions also call
    logging.basicConfig() when the root has no handler, which would leave a stderr handler on the
    root of this process for good: a handler that appears there during the block is removed."""
    root, named = logging.getLogger(), logging.getLogger(QUANTISER_LOGGER)
    quiet, level, had_handler = _ErrorsOnly(), named.level, bool(root.handlers)
    root.addFilter(quiet)
    named.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.removeFilter(quiet)
        named.setLevel(level)
        if not had_handler:  # (basicConfig does nothing when the root has a handler)
            for handler in list(root.handlers):
                root.removeHandler(handler)


def activation_ranges(fp32_path, reader, method: str, cache_file, external_data: bool = False) -> None:
    """Run the calibration and save the activation ranges where quantize_static reads them.

    We run ONNX Runtime's calibrator ourselves (create_calibrator + save_tensors_data) rather than
    inside quantize_static because quantize_static cannot pass the histogram size: its entropy
    calibrator then gets 128 histogram bins for 128 quantized bins, which leaves a single candidate
    threshold -- the max -- so "entropy" would silently be "max". Here entropy gets 512 bins (192
    candidate thresholds; its KL search is pure Python, ~4x slower per bin doubling) and percentile
    2048 bins (percentile 99.999). And quantize_static reads its reader in one `collect_data` call,
    which the histogram calibrators cannot do over feeds of two shapes (the backbone's phases):
    here each group of `reader.groups()` (calibration/reader.py) is one call, merged by the
    calibrator (MinMax: min/max of the groups' ranges; histograms: summed)."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    try:
        from onnxruntime.quantization.calibrate import save_tensors_data
    except ImportError:
        raise BitDanceError(
            "INT8 calibration needs an onnxruntime with calibration caches (save_tensors_data): "
            "pip install -U onnxruntime"
        ) from None
    extra = {"symmetric": True}
    if method == "entropy":
        extra.update(num_bins=512, num_quantized_bins=128)
    elif method == "percentile":
        extra.update(num_bins=2048, percentile=99.999)
    with tempfile.TemporaryDirectory(prefix="bitdance-rt-calib-") as tmp:
        calibrator = create_calibrator(
            Path(fp32_path),
            list(INT8_OP_TYPES),
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=getattr(CalibrationMethod, _METHODS[method]),
            use_external_data_format=external_data,
            extra_options=extra,
        )
        for group in reader.groups() if hasattr(reader, "groups") else [reader]:
            if hasattr(group, "rewind"):  # (a reader read before starts over)
                group.rewind()
            calibrator.collect_data(group)
        save_tensors_data(calibrator.compute_data(), cache_file)


def needs_external_data(fp32_path) -> bool:
    """Whether ONNX Runtime must write the calibration and Q/DQ graphs of `fp32_path` with external
    data: when the FP32 graph has some (exports put a graph's weights there above 1.5 GB) or its file
    is that large. Without it, a graph over 2 GB fails at the calibrator's augmented copy (measured,
    onnxruntime 1.32 / onnx 1.23: onnx.save writes a file that does not parse, "INVALID_PROTOBUF :
    Load model from .../augmented.onnx failed")."""
    import onnx

    from ..export.shared_weights import is_external, tensors

    model = onnx.load(str(fp32_path), load_external_data=False)
    return any(is_external(t) for t, _ in tensors(model.graph)) or Path(fp32_path).stat().st_size > EXTERNAL_DATA_BYTES


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    reader,
    method: str = "max",
    nodes_to_exclude=(),
    external_data: bool = False,
    calibration_cache: str | Path | None = None,
) -> None:
    """Write the INT8 Q/DQ graph of `fp32_path` to `out_path`; `reader` yields calibration feeds.

    `calibration_cache`: a file that keeps the activation ranges; a later call with the same
    graph, data and method (e.g. the sensitivity sweep, which only changes `nodes_to_exclude`)
    reads them instead of running the calibration again. `external_data`: write the Q/DQ graph's
    weights to out_path + ".data"; chosen anyway for a graph that has external data
    (`needs_external_data`).

    Graphs over 2 GB: ONNX Runtime's quantize_static handles them with external data (it infers
    shapes by path; its calibrator and quantiser save with external data). It does load the whole
    graph into memory, more than once: measured on a MatMul with a 2.18 GB weight
    (tests/test_large_graphs.py), 7.0 GB peak and about a minute on two busy cores, ~15 s of it its
    per-channel weight quantisation (a numpy `take` per output channel), most of the rest loading
    the graph twice and writing the calibrator's copy. So quantising a backbone takes about 3x its
    FP32 size in RAM. Derivation quantises after the stages it converts to FP16 (derive.py), so a
    failure there no longer comes after the quantised stages' hours.
    """
    from onnxruntime.quantization import quantize_static

    if len(reader) == 0:
        raise BitDanceError(
            f"no calibration samples for {Path(fp32_path).stem}: the calibration set has none "
            "of this stage (capture one with more samples)"
        )
    options = quantize_options(method)
    nodes = quantised_nodes(fp32_path, nodes_to_exclude)
    external_data = external_data or needs_external_data(fp32_path)
    try:
        with tempfile.TemporaryDirectory(prefix="bitdance-rt-int8-") as tmp:
            cache = Path(calibration_cache) if calibration_cache is not None else Path(tmp) / "ranges.json"
            # the calibrators print their progress, and the quantiser logs advice to the root logger
            with contextlib.redirect_stdout(io.StringIO()), quiet_quantiser():
                if not cache.is_file():
                    activation_ranges(fp32_path, reader, method, cache, external_data)
                quantize_static(
                    str(fp32_path),
                    str(out_path),
                    None,
                    nodes_to_quantize=nodes,
                    nodes_to_exclude=list(nodes_to_exclude),
                    use_external_data_format=external_data,
                    calibration_cache_path=str(cache),
                    **options,
                )
    except Exception as exc:  # onnxruntime raises many types; name the graph
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BitDanceError(f"{fp32_path}: INT8 quantisation failed ({first})") from exc
    fix_for_integer_kernels(out_path)

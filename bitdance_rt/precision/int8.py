"""FP32 stage graph + calibration feeds -> INT8 Q/DQ stage graph, with ONNX Runtime's quantize_static.

Why ONNX Runtime's quantizer (onnxruntime.quantization.quantize_static, QDQ format) and not
NVIDIA ModelOpt's ONNX PTQ: it is already a dependency of the CPU path, it is pure Python on
top of onnxruntime (ModelOpt's ONNX extra pulls CUDA torch, onnxruntime-gpu and CuPy), and the
Q/DQ graphs it writes are the standard ONNX QuantizeLinear/DequantizeLinear pairs that both
ONNX Runtime and TensorRT's explicit quantization read. The settings below produce the
placement of policy.py: symmetric int8 activations (zero point 0, as TensorRT requires),
per-output-channel symmetric int8 weights, only weight MatMul / Gemm / Conv inputs quantised,
float biases. Calibration method: max (MinMax), entropy (KL) or percentile (99.999%).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from ..errors import BitDanceError
from .policy import INT8_OP_TYPES, check_method

_METHODS = {"max": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


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
            "QuantizeBias": False,  # float bias: TensorRT fuses it; an int32 bias would add a DQ
            "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},  # weight [in, out]: one scale per output
        },
    )


def quantize_int8(fp32_path: str | Path, out_path: str | Path, reader, method: str = "max",
                  nodes_to_exclude=(), external_data: bool = False, calibration_cache: str | Path | None = None) -> None:
    """Write the INT8 Q/DQ graph of `fp32_path` to `out_path`; `reader` yields calibration feeds.

    `calibration_cache`: a file that keeps the activation ranges; a later call with the same
    graph, data and method (e.g. the sensitivity sweep, which only changes `nodes_to_exclude`)
    reads them instead of running the calibration again.
    """
    from onnxruntime.quantization import quantize_static

    if len(reader) == 0:
        raise BitDanceError(f"no calibration samples for {Path(fp32_path).stem}: the calibration set has none "
                            "of this stage (capture one with more samples)")
    options = quantize_options(method)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the calibrators print their progress
            quantize_static(str(fp32_path), str(out_path), reader, nodes_to_exclude=list(nodes_to_exclude),
                            use_external_data_format=external_data,
                            calibration_cache_path=None if calibration_cache is None else str(calibration_cache),
                            **options)
    except Exception as exc:  # onnxruntime raises many types; name the graph
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BitDanceError(f"{fp32_path}: INT8 quantisation failed ({first})") from exc

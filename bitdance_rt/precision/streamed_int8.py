"""INT8 Q/DQ stage graphs written straight from the weight files: quantize_static's graph, no FP32 export.

precision/int8.py derives an INT8 stage from an FP32 export with ONNX Runtime's quantize_static, which
loads the graph, weights and all, more than once: about 3x the FP32 backbone in RAM (177 GiB for the
14B model). Here the stage comes as the streamed export traces it (export/weightless.py: FP32, its
large weights source placeholders), and ONNX Runtime's own QDQ quantiser, the class quantize_static
runs, with `int8.quantize_options`' settings and the same node lists (`int8.quantised_nodes`, the
policy's float layers + keep_float), places the Q/DQ nodes on it. The quantiser reads weight values
only to compute a weight's per-channel scales and its int8 data; for a placeholder `_Quantiser` plans
that instead (`_Channels`): the weight becomes an INT8 placeholder and its scales a placeholder of
one value per output channel, both filled while the weights stream (`Int8Weights`, the to_int8 hook
of export/weightless.weight_chunks), one chunk of whole output channels at a time, with quant_utils'
own maths (compute_data_quant_params per channel, the int32-bias scale adjustment, quantize_nparray),
so the values are quantize_static's. Small weights stay inline and ONNX Runtime quantises them as in
a derivation. Then the same touch-ups (qdq_fixups.fix_model). The activation ranges are a calibration
cache as int8.activation_ranges writes it (onnxruntime's save_tensors_data), of the FP32 graph of the
same stage (the classic and the streamed trace name the tensors the quantiser reads alike).
"""

from __future__ import annotations

import contextlib
import functools
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import BitDanceError
from .int8 import method_name, quantised_nodes, quantize_options, quiet_quantiser
from .policy import int8_float_layers, quantised_layers
from .qdq_fixups import fix_model

# What of ONNX Runtime's QDQQuantizer this module steps into: the places where it reads weight values
# (checked, so that another onnxruntime fails with a clear message instead of reading a placeholder).
_OVERRIDDEN = (
    "_calc_initializer_quant_params",
    "_adjust_weight_scale_for_int32_bias",
    "_add_qdq_nodes_for_initializer",
    "_make_tensor_scale_zp_initializers",
    "_make_scale_zp_initializers",
    "_create_dq_node",
)


def read_ranges(path) -> tuple:
    """(onnxruntime TensorsData, our calibration method name) of an activation-range file (a calibration
    cache, int8.activation_ranges); a one-line BitDanceError naming the file (and the tensor) when it
    cannot be read, is of another method or holds a range that is not two finite numbers."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    path = Path(path)
    if not path.is_file():
        raise BitDanceError(f"{path}: no activation-range file there (a calibration cache of the stage's FP32 graph)")
    try:
        data = load_tensors_data(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BitDanceError(
            f"{path}: not an activation-range file (onnxruntime calibration cache) that this onnxruntime reads: {first}"
        ) from None
    method = method_name(data.calibration_method)
    if method is None:
        raise BitDanceError(f"{path}: activation ranges of calibration method {data.calibration_method}, not ours")
    for name, td in data.items():
        bounds = [getattr(td, k, None) for k in ("lowest", "highest")]
        if any(b is None or np.size(b) != 1 or not np.isfinite(b).all() for b in bounds):
            raise BitDanceError(f"{path}: tensor {name!r} has no finite activation range ({bounds})")
    return data, method


@dataclass
class _Channels:
    """How one streamed weight is quantised, output channel by output channel (a row of its source):
    quantize_static's per-channel parameters, computed on the rows when they stream by."""

    weight: str  # the float weight's name in the traced graph
    quant_type: int  # onnx.TensorProto type of the int8 data
    zero_point: np.ndarray  # per channel, as the graph holds them (symmetric: data-independent)
    reduce_range: bool
    min_real_range: float | None
    adjust: Callable | None = None  # (scales, first row) -> scales: ONNX Runtime's int32-bias adjustment

    def parameters(self, rows: np.ndarray, first: int) -> tuple[np.ndarray, np.ndarray]:
        """(zero points, scales) of output channels [first, first + len(rows)), as quantize_static
        computes them (one compute_data_quant_params per channel, symmetric as it makes every
        per-channel weight, then its bias adjustment)."""
        from onnxruntime.quantization.quant_utils import compute_data_quant_params

        pairs = [
            compute_data_quant_params(
                row.ravel(), self.quant_type, True, reduce_range=self.reduce_range, min_real_range=self.min_real_range
            )
            for row in rows
        ]
        zero_point, scale = np.asarray([z for z, _ in pairs]), np.asarray([s for _, s in pairs])
        held = self.zero_point[first : first + len(rows)]
        if zero_point.dtype != held.dtype or not np.array_equal(zero_point, held):
            raise BitDanceError(
                f"weight {self.weight}: its channels' zero points are not the {held.dtype} zeros written"
            )
        return zero_point, scale if self.adjust is None else self.adjust(scale, first)

    def quantise(self, rows: np.ndarray, zero_point: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """The int8 values of whole output channels (quantize_nparray per channel, as quantize_static)."""
        from onnx import helper
        from onnxruntime.quantization.quant_utils import quantize_nparray

        out = np.empty(rows.shape, dtype=helper.tensor_dtype_to_np_dtype(self.quant_type))
        for i, row in enumerate(rows):
            out[i] = np.asarray(quantize_nparray(self.quant_type, row.ravel(), scale[i], zero_point[i])).reshape(
                row.shape
            )
        return out


class Int8Weights:
    """The `to_int8` hook of export/weightless.weight_chunks: (placeholder, float32 source rows, first
    row) -> the int8 values of those output channels, or their scales, for the placeholders of the stage
    `quantize_streamed` quantised last (its plans; the export fills a stage's placeholders right after
    its graph pass)."""

    def __init__(self):
        self.plans: dict[str, _Channels] = {}  # placeholder name -> plan (a weight's int8 data and its scales)

    def __call__(self, t, rows: np.ndarray, first: int) -> np.ndarray:
        plan = self.plans.get(t.name)
        if plan is None:
            raise BitDanceError(f"placeholder {t.name}: no INT8 quantisation was planned for it")
        zero_point, scale = plan.parameters(rows, first)
        return plan.quantise(rows, zero_point, scale) if t.data_type == plan.quant_type else scale


@functools.cache
def _quantiser_class():
    """ONNX Runtime's QDQQuantizer, but for weights that are source placeholders (its other weights,
    inline, it quantises itself)."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer, QDQTensorQuantizedValue
    from onnxruntime.quantization.quant_utils import (
        TENSOR_NAME_QUANT_SUFFIX,
        QuantizedValue,
        QuantizedValueType,
        add_dequant_output_suffix,
        add_dequant_suffix,
        compute_data_quant_params,
        tensor_proto_to_array,
    )

    from ..export.shared_weights import external_info, placeholder
    from ..export.weightless import CHANNELS, INT8, SOURCE, TRANSPOSED

    missing = [m for m in _OVERRIDDEN if not hasattr(QDQQuantizer, m)]
    if missing:
        raise BitDanceError(
            f"streamed INT8 needs the onnxruntime quantiser this version was written for (its QDQQuantizer "
            f"lacks {', '.join(missing)}): pip install -U onnxruntime"
        )

    class _Quantiser(QDQQuantizer):
        """`streamed`: {weight name: its placeholder's marks}; `ranges`: the range file (for messages);
        `source`: reads a bias that is a placeholder. `plans`: {placeholder name: _Channels}."""

        def __init__(self, model, streamed: dict, ranges: Path, source, **arguments):
            self.streamed, self.ranges, self.source = streamed, ranges, source
            self.channels: dict[str, _Channels] = {}  # weight name -> plan
            self.plans: dict[str, _Channels] = {}
            super().__init__(model, **arguments)

        def _calc_initializer_quant_params(self):
            held = self.tensors_to_quantize
            mine = {k: v for k, v in held.items() if k in self.streamed}
            self.tensors_to_quantize = {k: v for k, v in held.items() if k not in mine}
            try:
                params = super()._calc_initializer_quant_params()
            finally:
                self.tensors_to_quantize = held
            for name, info in mine.items():
                params[name] = self._plan(name, info)
            return params

        def _plan(self, name: str, info):
            """The quantisation parameters of a placeholder weight: its zero points (the same for every
            channel of a symmetric type) and stand-in scales (the scales are streamed)."""
            from onnxruntime.quantization.base_quantizer import QuantizationParams
            from onnxruntime.quantization.qdq_quantizer import QDQQuantTensorType

            marks = self.streamed[name]
            weight = self.initializers[name]
            rows_axis = 1 if marks.get(TRANSPOSED) == "1" else 0
            quant_type = self.weight_qType if info.tensor_type is QDQQuantTensorType.WEIGHT else self.activation_qType
            why = None
            if self.tensor_quant_overrides.get(name) or self.block_size:
                why = "with tensor overrides or in blocks"
            elif info.axis is None:
                why = "per tensor"
            elif info.axis != rows_axis or len(weight.dims) < 2:
                why = f"along axis {info.axis}, not per row of its source"
            elif quant_type != INT8:
                why = f"to ONNX type {quant_type}"
            if why:
                raise BitDanceError(
                    f"weight {marks[SOURCE]}: quantised {why}; a streamed INT8 weight is quantised to int8 per "
                    "output channel (a row of its source)"
                )
            channels = weight.dims[info.axis]
            zero, _ = compute_data_quant_params(
                np.array([-1.0, 1.0], np.float32), quant_type, True, self.reduce_range, self.min_real_range
            )
            plan = _Channels(
                name, quant_type, np.full(channels, zero, zero.dtype), self.reduce_range, self.min_real_range
            )
            self.channels[name] = plan
            return QuantizationParams(
                zero_point=plan.zero_point, scale=np.ones(channels, np.float32), quant_type=quant_type, axis=info.axis
            )

        def _adjust_weight_scale_for_int32_bias(self, input_scale, weight_scale, weight_name, bias_tp, is_per_channel):
            plan = self.channels.get(weight_name)
            if plan is None:
                return super()._adjust_weight_scale_for_int32_bias(
                    input_scale, weight_scale, weight_name, bias_tp, is_per_channel
                )
            bias, adjust = self._bias(bias_tp), super()._adjust_weight_scale_for_int32_bias

            def per_chunk(scale: np.ndarray, first: int) -> np.ndarray:
                part = numpy_helper.from_array(bias[first : first + len(scale)], bias_tp.name)
                changed, new = adjust(input_scale, scale, weight_name, part, is_per_channel)
                return new if changed else scale

            plan.adjust = per_chunk
            return False, None  # (the stand-in scales stay; the streamed ones are adjusted)

        def _bias(self, tensor) -> np.ndarray:
            marks = external_info(tensor)
            if SOURCE not in marks:
                return tensor_proto_to_array(tensor)
            if self.source is None:
                raise BitDanceError(f"bias {marks[SOURCE]} is a placeholder, and no weight source was given")
            return self.source.tensor(marks[SOURCE]).float().numpy()

        def _add_qdq_nodes_for_initializer(self, weight_proto):
            name = weight_proto.name
            if name not in self.streamed:
                return super()._add_qdq_nodes_for_initializer(weight_proto)
            if name in self.quantized_value_map:
                return None
            if self.add_qdq_pair_to_weight:
                raise BitDanceError(f"weight {self.streamed[name][SOURCE]}: a streamed weight is stored as int8")
            params, plan, marks = self.initializer_quant_params[name], self.channels[name], self.streamed[name]
            made = self._make_scale_zp_initializers(name, params)
            scale = self.model.get_initializer(made.scale.name)  # (the graph's copy: the stand-in)
            scale.CopyFrom(placeholder(scale, {SOURCE: marks[SOURCE], CHANNELS: 1}))
            dequantised = add_dequant_output_suffix(name)
            self.model.replace_input_of_all_nodes(name, dequantised)
            data = onnx.TensorProto(name=f"{name}{TENSOR_NAME_QUANT_SUFFIX}", data_type=plan.quant_type)
            data.dims.extend(weight_proto.dims)
            kept = {k: marks[k] for k in (SOURCE, TRANSPOSED) if k in marks}
            self.model.add_initializer(placeholder(data, kept))
            axis = params.get("axis")
            self._create_dq_node(
                data.name, dequantised, add_dequant_suffix(name), made.scale.name, made.zero_point.name, axis=axis
            )
            value = QuantizedValue(
                name, data.name, made.scale.name, made.zero_point.name, QuantizedValueType.Initializer, axis=axis
            )
            self.quantized_value_map[name] = QDQTensorQuantizedValue(value, None, None)
            self.plans[data.name] = self.plans[made.scale.name] = plan
            return None

        def _make_tensor_scale_zp_initializers(self, tensor_name: str):
            made = super()._make_tensor_scale_zp_initializers(tensor_name)
            if made is None:
                raise BitDanceError(
                    f"{self.ranges}: no activation range of tensor {tensor_name!r}, which INT8 quantises "
                    "(ranges of another graph? calibrate this stage's FP32 graph again)"
                )
            return made

    return _Quantiser


def quantize_streamed(graph, stage: str, ranges, keep_float=(), source=None, weights: Int8Weights | None = None):
    """The INT8 Q/DQ graph of `stage` (its FP32 graph as the streamed export traces it, an onnx.ModelProto
    with source placeholders, changed in place and returned) with the activation ranges in file `ranges`:
    the graph quantize_static + qdq_fixups write from the same graph (int8.quantize_int8), but for its
    placeholder weights an INT8 placeholder and a per-channel scale placeholder each, which `weights`
    (an Int8Weights, given to weight_chunks as to_int8) fills. Nodes kept float: the policy's
    (policy.int8_float_layers) and `keep_float`. `source`: the WeightSource (for a bias that is a
    placeholder)."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.quant_utils import add_infer_metadata, update_opset_version
    from onnxruntime.quantization.quantize import check_static_quant_arguments

    from ..export.shared_weights import external_info
    from ..export.skeleton import infer_shapes
    from ..export.weightless import placeholders

    ranges = Path(ranges)
    tensors, method = read_ranges(ranges)
    options = quantize_options(method)
    if options.pop("quant_format") != QuantFormat.QDQ:
        raise BitDanceError("streamed INT8 writes Q/DQ graphs only")
    options.pop("calibrate_method")  # (the ranges are given)
    extra = dict(options.pop("extra_options"))
    arguments = {
        "per_channel": options.pop("per_channel"),
        "reduce_range": options.pop("reduce_range"),
        "weight_qType": options.pop("weight_type"),
        "activation_qType": options.pop("activation_type"),
        "op_types_to_quantize": options.pop("op_types_to_quantize"),
    }
    if options:  # (a setting quantize_static would get and this pass would drop)
        raise BitDanceError(f"streamed INT8 does not apply the quantiser option(s) {', '.join(sorted(options))}")
    keep = sorted(set(keep_float) | set(int8_float_layers(stage, quantised_layers(graph))))
    # quantize_static quantises the graph as the FP32 export's file holds it: shape-inferred as its check
    # writes it back (export/stage_graph.check_graph_file), then marked as ONNX Runtime marks the graphs
    # it inferred itself
    inferred = infer_shapes(graph, check_type=True, strict_mode=True, data_prop=True)
    del graph.graph.value_info[:]
    graph.graph.value_info.extend(inferred.graph.value_info)
    add_infer_metadata(graph)
    graph = update_opset_version(
        graph,
        arguments["weight_qType"],
        arguments["activation_qType"],
        tensor_quant_overrides=extra.get("TensorQuantOverrides"),
        block_size=extra.get("BlockSize", 0),
    )
    check_static_quant_arguments(QuantFormat.QDQ, arguments["activation_qType"], arguments["weight_qType"])
    streamed = {t.name: external_info(t) for t in placeholders(graph)}
    try:
        with contextlib.redirect_stdout(io.StringIO()), quiet_quantiser():
            quantiser = _quantiser_class()(
                graph,
                streamed,
                ranges,
                source,
                tensors_range=tensors,
                nodes_to_quantize=quantised_nodes(graph, keep),
                nodes_to_exclude=keep,
                extra_options=extra,
                **arguments,
            )
            quantiser.quantize_model()
            quantiser.model.topological_sort()  # (as quantize_static's save does)
    except BitDanceError:
        raise
    except Exception as exc:  # onnxruntime raises many types; name the stage
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BitDanceError(f"stage {stage}: INT8 quantisation failed ({first})") from exc
    fix_model(graph)
    if weights is not None:
        weights.plans = quantiser.plans
    return graph

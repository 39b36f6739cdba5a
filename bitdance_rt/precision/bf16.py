"""FP32 stage graph -> BF16 stage graph: the FP16 variant's placement, BFLOAT16 where it has FLOAT16.

BF16 keeps FP32's exponent range (finite up to ~3.4e38) with 8 significant bits: the 14B
text-to-image checkpoints are BF16, and the large LLM activations that overflow FP16 (max 65504)
stay finite. TensorRT builds it on Ampere and later; ONNX Runtime's CPU provider does not run BF16
MatMuls (backends.py refuses that run). The graph is converted by fp16.py (same converter, same
policy: FP16_KEEP_FLOAT_OPS, the RMSNorm squares, a fused sampler's arithmetic, float32 inputs and
outputs; and FP32 for what ONNX has no BF16 form of, policy.bf16_float_ops), then every FLOAT16 it
made is retyped BFLOAT16 (`_retype`): value_info, Cast targets, initialisers and Constant values,
whose values are rounded from the FP32 originals (`to_bf16`), not from the FP16 ones the converter
clamped into FP16's range. Graphs of any size, as fp16.convert_fp16_file: the large tensors stream
through in chunks.
"""

from __future__ import annotations

from pathlib import Path

from .fp16 import EXTERNAL_DATA_BYTES, FLOAT, FLOAT16, _convert, _data, _inline, _stashed, _strip
from .policy import bf16_float_ops

BFLOAT16 = 16  # onnx.TensorProto
_TAG = "bitdance_rt_bf16_"  # an attribute tensor's name while converted (attributes have no key of their own)


def to_bf16(values):
    """float32 values -> bfloat16 bits (numpy uint16), rounded to nearest, ties to even, as torch's
    `.to(torch.bfloat16)` rounds (tested bit for bit); +-inf stays inf, finite values past BF16's
    largest become inf (no clamp: BF16 has FP32's range), a NaN stays a quiet NaN of its sign."""
    import numpy as np

    a = np.ascontiguousarray(values, np.float32)
    bits = a.view(np.uint32)
    out = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # (only NaNs can wrap)
    nan = np.isnan(a)
    if nan.any():  # (rounding may carry a NaN's payload into inf, or wrap it)
        out[nan] = (bits[nan] >> 16).astype(np.uint16) | 0x0040
    return out


def _tag_originals(graph, originals: dict) -> dict:
    """{key: float32 values} of the inline FLOAT tensors of a skeleton (fp16._strip's; its large
    tensors are placeholders, filled from the stash): initialisers by name; node attributes (Constant
    values) get a unique name `_TAG`<n> while converted, their own name kept in `originals` under the
    tag. The converter keeps tensor names and only turns FLOAT into FLOAT16, so the keys find them."""
    from onnx import numpy_helper

    from ..export.shared_weights import is_external, tensors

    for t, init in tensors(graph):
        if t.data_type != FLOAT or is_external(t):
            continue
        if not init:
            tag = f"{_TAG}{len(originals)}"
            originals[("name", tag)] = t.name if t.HasField("name") else None
            t.name = tag
        originals[t.name] = numpy_helper.to_array(t).astype("float32", copy=False)
    return originals


def _retype(graph, originals: dict) -> None:
    """FLOAT16 -> BFLOAT16 everywhere in `graph`: tensor types and Cast targets (`_retype_types`), and
    the data of the converted inline tensors, rounded from their `originals`; attribute tensors get
    their names back. Placeholders (external) are retyped only: their data comes from the stash."""
    from ..export.shared_weights import is_external, tensors

    _retype_types(graph)
    for t, _ in tensors(graph):
        if t.data_type == FLOAT16:
            t.data_type = BFLOAT16
            if not is_external(t):
                if t.name not in originals:
                    raise ValueError(f"tensor {t.name!r}: the FP16 converter made it FLOAT16 from no float32 tensor")
                for field in ("float_data", "int32_data", "raw_data"):
                    t.ClearField(field)
                t.raw_data = to_bf16(originals[t.name]).tobytes()
        if t.name.startswith(_TAG):
            name = originals[("name", t.name)]
            if name is None:
                t.ClearField("name")
            else:
                t.name = name


def _retype_types(graph) -> None:
    """Declared FLOAT16 types (inputs, outputs, value_info) and Cast targets -> BFLOAT16, subgraphs too."""
    for v in (*graph.input, *graph.output, *graph.value_info):
        if v.type.tensor_type.elem_type == FLOAT16:
            v.type.tensor_type.elem_type = BFLOAT16
    for node in graph.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == FLOAT16:
                a.i = BFLOAT16
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                _retype_types(g)


_HALVES = {BFLOAT16: to_bf16}


def _convert_bf16(skeleton, sampler: bool):
    """fp16._convert with policy.bf16_float_ops kept FP32, then retyped (see the module docstring)."""
    opset = next((o.version for o in skeleton.opset_import if o.domain in ("", "ai.onnx")), None)
    originals = _tag_originals(skeleton.graph, {})
    out = _convert(skeleton, sampler, bf16_float_ops({n.op_type for n in skeleton.graph.node}, opset))
    _retype(out.graph, originals)
    return out


def convert_bf16(model, sampler: bool = False, base_dir=None):
    """A BF16 copy of `model` (onnx.ModelProto), its tensors inline; arguments and graph size as
    fp16.convert_fp16's. `model` is left as it is."""
    skeleton, stash = _strip(model, base_dir)
    out = _convert_bf16(skeleton, sampler)
    _inline(_stashed(out, stash), base_dir, _HALVES)
    return out


def convert_bf16_file(src, dst, sampler: bool = False, external_bytes: int = EXTERNAL_DATA_BYTES) -> list[str]:
    """Convert the graph file `src` (with its external data, if any) into `dst`, streaming its large
    tensors as fp16.convert_fp16_file does; returns the files written."""
    import onnx

    from ..export.shared_weights import save_streamed

    src, dst = Path(src), Path(dst)
    skeleton, stash = _strip(onnx.load(str(src), load_external_data=False), src.parent)
    out = _convert_bf16(skeleton, sampler)
    fills = ((holder, _data(holder, original, src.parent, _HALVES)) for holder, original in _stashed(out, stash))
    return save_streamed(out, dst, fills, external_bytes)

"""FP32 stage graph -> weight-only INT4 stage graph: weight MatMuls as ONNX Runtime's MatMulNBits.

Weight-only 4-bit with block scales (W4A32 here: activations stay float32) is what batch-1 decoding
wants: the work is streaming weights, and 4 bits a weight is half INT8's bytes. It needs no
activation ranges: round-to-nearest is data-free. Each MatMul whose B is a constant [K, N] weight
becomes a MatMulNBits node (com.microsoft) with B as [N, K/block, block/2] packed nibbles and one
float scale per block of `block` values along K (symmetric: zero point 8, implied). The values are
those of ONNX Runtime's MatMulNBitsQuantizer (symmetric, same block; tested), written here because
that quantiser loads a whole graph (a 14B stage is tens of GB) and the streamed export quantises a
weight at a time. Only the nodes policy.int4_layers names are quantised; the graph's inputs and
outputs stay float32.

TensorRT does not parse MatMulNBits: its INT4 graphs (`quantize_int4_qdq`) are the FP16 graph with
each quantised weight as INT4 values and FP16 block scales read by a DequantizeLinear (opset 21),
the explicit weight-only form TensorRT builds. One form cannot serve both runtimes: ONNX Runtime
fuses such a DequantizeLinear into MatMulNBits only when it has one reader, and a fused sampler
reads each head weight once per step (measured, ORT 1.32: shared, the weights are expanded on every
call).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BitDanceError
from .policy import INT4_BLOCK, INT4_TRT_BLOCKS

INT4_BLOCK_SIZES = (16, 32, 64, 128)  # (MatMulNBits: a power of two from 16)
QDQ_OPSET = 21  # the first opset with INT4 tensors and DequantizeLinear's block_size
INT4 = 22  # onnx.TensorProto.INT4


def int4_blocks(weight: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A [K, N] float weight as MatMulNBits holds it: (packed uint8 [N, K/block, block/2], scales
    float32 [N, K/block]); symmetric round-to-nearest: a block's scale is its largest-magnitude value
    over -8 (that value becomes -8 exactly: ONNX Runtime's own symmetric rule), q = clip(round(w /
    scale), -8, 7) + 8, two per byte, the first in the low nibble; K padded with zeros to whole
    blocks. (A search of smaller scales, each block's least squared error, measured worse:
    docs/precision.md "INT4".)"""
    q, scale = int4_values(weight, block_size)
    q = (q + 8).astype(np.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4), scale


def int4_values(weight: np.ndarray, block_size: int, scale_dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """A [K, N] float weight's signed 4-bit values [N, K/block, block] (int8 in -8..7) and block scales
    [N, K/block] (`scale_dtype`): int4_blocks' rule, the scale rounded to `scale_dtype` before the
    values are taken (so that value * scale is what a runtime with those scales computes); K padded
    with zeros to whole blocks."""
    k, n = weight.shape
    blocks = -(-k // block_size)
    w = np.zeros((n, blocks * block_size), np.float32)
    w[:, :k] = weight.T
    w = w.reshape(n, blocks, block_size)
    extreme = np.take_along_axis(w, np.abs(w).argmax(axis=2)[..., None], axis=2)[..., 0]
    scale = (extreme / np.float32(-8)).astype(scale_dtype)
    wide = scale.astype(np.float32)
    safe = np.where(wide == 0, np.float32(1), wide)
    return np.clip(np.round(w / safe[..., None]), -8, 7).astype(np.int8), scale


def dequantised(packed: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """The [K, N] float32 weight that MatMulNBits computes with (int4_blocks' inverse)."""
    n, blocks, half = packed.shape
    q = np.empty((n, blocks, 2 * half), np.float32)
    q[..., 0::2], q[..., 1::2] = packed & 15, packed >> 4
    return ((q - 8) * scales[..., None]).reshape(n, -1)[:, :k].T.copy()


def _attributes(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _takes(node, weights: set, alias: dict) -> bool:
    """A MatMul of a constant B, or a Gemm of one (a Linear on 2-D inputs: the head's time MLP) that
    MatMulNBits computes: A as is, alpha = beta = 1, a bias C of [N] or none."""
    if len(node.input) < 2 or (node.input[1] not in weights and node.input[1] not in alias):
        return False
    if node.op_type == "MatMul":
        return True
    if node.op_type != "Gemm":
        return False
    a = _attributes(node)
    bias = node.input[2] if len(node.input) > 2 else ""
    return (
        a.get("transA", 0) == 0
        and a.get("alpha", 1.0) == 1.0
        and a.get("beta", 1.0) == 1.0
        and (not bias or bias in weights)
    )


def _aliases(graph) -> dict[str, str]:
    """{Identity output: the weight it aliases}: the exporter's way of sharing a weight between calls."""
    weights = {t.name for t in graph.initializer}
    return {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in weights}


def weight_matmuls(graph) -> list[str]:
    """Names of the MatMul / Gemm nodes of `graph` whose B is a constant weight, read directly or
    through an Identity alias of one (the exporter's way of sharing a weight between calls of a
    module), that MatMulNBits can compute (`_takes`)."""
    weights, alias = {t.name for t in graph.initializer}, _aliases(graph)
    return [n.name for n in graph.node if _takes(n, weights, alias)]


def _read_weights_directly(model) -> None:
    """Make MatMuls that read a weight through an Identity alias read the weight itself (the
    quantiser only takes a MatMul whose B is an initializer); the aliases left unread are dropped."""
    graph = model.graph
    alias = _aliases(graph)
    if not alias:
        return
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        if node.op_type in ("MatMul", "Gemm") and node.input[1] in alias:
            node.input[1] = alias[node.input[1]]
    read = {x for n in graph.node for x in n.input} | outputs
    kept = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias and n.output[0] not in read)]
    del graph.node[:]
    graph.node.extend(kept)


def quantize_int4(src, dst, nodes: list[str], block_size: int = INT4_BLOCK, external_data: bool = False) -> None:
    """Write `src` (an FP32 stage graph) with the MatMul / Gemm nodes `nodes` as MatMulNBits (4-bit, blocks of
    `block_size` along K, int4_blocks' scales) to `dst`; every other node is left as it is. A weight
    read by several of them is quantised once. `external_data`: weights in <dst>.data (graphs over
    protobuf's 2 GB)."""
    import onnx
    from onnx import helper, numpy_helper

    if block_size not in INT4_BLOCK_SIZES:
        raise BitDanceError(f"INT4 block size {block_size}: use one of {', '.join(map(str, INT4_BLOCK_SIZES))}")
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    _read_weights_directly(model)
    graph = model.graph
    missing = sorted(set(nodes) - set(weight_matmuls(graph)))
    if missing:
        raise BitDanceError(f"{src}: no weight MatMul named {', '.join(missing[:3])} to quantise to INT4")
    weights = {t.name: t for t in graph.initializer}
    wanted, made = set(nodes), {}
    for i, node in enumerate(graph.node):
        if node.name not in wanted:
            continue
        name = node.input[1]
        tensor = weights[name]
        if tensor.data_type != onnx.TensorProto.FLOAT or len(tensor.dims) != 2:
            raise BitDanceError(f"{src}: {node.name} reads {name} {list(tensor.dims)}, not a 2-D float32 weight")
        transposed = node.op_type == "Gemm" and _attributes(node).get("transB", 0) == 1  # (B is [N, K])
        n, k = tensor.dims if transposed else tensor.dims[::-1]
        key = (name, transposed)
        if key not in made:
            value = numpy_helper.to_array(tensor)
            packed, scales = int4_blocks(value.T if transposed else value, block_size)
            made[key] = (f"{name}_int4", f"{name}_int4_scales")
            graph.initializer.extend(
                [
                    numpy_helper.from_array(packed, made[key][0]),
                    numpy_helper.from_array(scales.reshape(-1), made[key][1]),
                ]
            )
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else ""
        replaced = helper.make_node(
            "MatMulNBits",
            [node.input[0], *made[key]] + (["", "", bias] if bias else []),  # (bias: input 5)
            list(node.output),
            name=node.name,
            domain="com.microsoft",
            K=k,
            N=n,
            bits=4,
            block_size=block_size,
        )
        graph.node[i].CopyFrom(replaced)
    still_read = {x for node in graph.node for x in node.input}
    replaced_weights = {name for name, _ in made}
    kept = [t for t in graph.initializer if t.name in still_read or t.name not in replaced_weights]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    dst.parent.mkdir(parents=True, exist_ok=True)
    if external_data:
        onnx.save_model(model, str(dst), save_as_external_data=True, location=f"{dst.name}.data")
    else:
        onnx.save_model(model, str(dst))


def int4_tensor(name: str, values: np.ndarray):
    """An ONNX INT4 initializer of `values` (int8 in -8..7): two per byte, the first in the low
    nibble, in row-major order (the ONNX and TensorRT packing)."""
    from onnx import helper

    flat = (values.reshape(-1).astype(np.int8) & 15).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    packed = flat[0::2] | (flat[1::2] << 4)
    return helper.make_tensor(name, INT4, list(values.shape), packed.tobytes(), raw=True)


def trt_block(k: int) -> int | None:
    """The block size of a weight with K = `k` in a TensorRT INT4 graph: the largest of
    policy.INT4_TRT_BLOCKS that divides K (None: none does, and the layer stays FP16)."""
    return next((b for b in INT4_TRT_BLOCKS if k % b == 0), None)


def quantize_int4_qdq(src, dst, nodes: list[str], external_data: bool = False) -> list[str]:
    """Write `src` (an FP16 stage graph) with the weights of the MatMul / Gemm nodes `nodes` as INT4
    values and FP16 block scales (int4_values, blocks along K of `trt_block(K)`) that a
    DequantizeLinear expands before the node, the whole graph at opset QDQ_OPSET; every other node is
    left as it is. A weight read by several of them is stored and dequantised once. Returns the names
    of the nodes left FP16 because no TensorRT block size divides their K."""
    import onnx
    from onnx import helper, numpy_helper, version_converter

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)  # (the converter sees a skeleton)
    if not any(o.domain in ("", "ai.onnx") and o.version >= QDQ_OPSET for o in model.opset_import):
        model = version_converter.convert_version(model, QDQ_OPSET)
    onnx.external_data_helper.load_external_data_for_model(model, str(src.parent))
    model.ir_version = max(model.ir_version, 10)  # (INT4 tensors)
    _read_weights_directly(model)
    graph = model.graph
    missing = sorted(set(nodes) - set(weight_matmuls(graph)))
    if missing:
        raise BitDanceError(f"{src}: no weight MatMul named {', '.join(missing[:3])} to quantise to INT4")
    weights = {t.name: t for t in graph.initializer}
    wanted, made, left, dequantise = set(nodes), {}, [], []
    for node in graph.node:
        if node.name not in wanted:
            continue
        name = node.input[1]
        tensor = weights[name]
        if tensor.data_type != onnx.TensorProto.FLOAT16 or len(tensor.dims) != 2:
            raise BitDanceError(f"{src}: {node.name} reads {name} {list(tensor.dims)}, not a 2-D float16 weight")
        transposed = node.op_type == "Gemm" and _attributes(node).get("transB", 0) == 1  # (B is [N, K])
        k = tensor.dims[1] if transposed else tensor.dims[0]
        block = trt_block(k)
        if block is None:
            left.append(node.name)
            continue
        if name not in made:
            value = numpy_helper.to_array(tensor).astype(np.float32)
            q, scales = int4_values(value.T if transposed else value, block, np.float16)  # [N, K/b, b], [N, K/b]
            n = q.shape[0]
            q = q.reshape(n, k)
            made[name] = f"{name}_int4_dequantized"
            graph.initializer.extend(
                [
                    int4_tensor(f"{name}_int4", q if transposed else q.T),
                    numpy_helper.from_array(scales if transposed else scales.T.copy(), f"{name}_int4_scales"),
                ]
            )
            dequantise.append(
                helper.make_node(
                    "DequantizeLinear",
                    [f"{name}_int4", f"{name}_int4_scales"],
                    [made[name]],
                    name=f"{name}_int4_DequantizeLinear",
                    axis=1 if transposed else 0,
                    block_size=block,
                )
            )
        node.input[1] = made[name]
    still_read = {x for node in graph.node for x in node.input}
    kept = [t for t in graph.initializer if t.name in still_read or t.name not in made]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(dequantise + rest)  # (their inputs are initializers: first keeps the order topological)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if external_data:
        onnx.save_model(model, str(dst), save_as_external_data=True, location=f"{dst.name}.data")
    else:
        onnx.save_model(model, str(dst))
    return left

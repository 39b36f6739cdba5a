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
from ..export.shared_weights import EXTERNAL_DATA_BYTES
from .policy import INT4_BLOCK, INT4_TRT_BLOCKS

INT4_BLOCK_SIZES = (16, 32, 64, 128)  # (MatMulNBits: a power of two from 16)
QDQ_OPSET = 21  # the first opset with INT4 tensors and DequantizeLinear's block_size
INT4, FLOAT16 = 22, 10  # onnx.TensorProto


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


def _weight_nodes(model, src, nodes: list[str], data_type: int, what: str):
    """(node, weight name, weight tensor, transposed) for each of `nodes` (weight MatMul / Gemm names of
    `model`, read from file `src`) in graph order, its weight read directly (no Identity alias) and checked
    to be 2-D of `data_type` (`what`); `transposed`: a Gemm's transB, B [N, K]."""
    _read_weights_directly(model)
    graph = model.graph
    missing = sorted(set(nodes) - set(weight_matmuls(graph)))
    if missing:
        raise BitDanceError(f"{src}: no weight MatMul named {', '.join(missing[:3])} to quantise to INT4")
    weights = {t.name: t for t in graph.initializer}
    wanted = set(nodes)
    for node in graph.node:
        if node.name not in wanted:
            continue
        name = node.input[1]
        tensor = weights[name]
        if tensor.data_type != data_type or len(tensor.dims) != 2:
            raise BitDanceError(f"{src}: {node.name} reads {name} {list(tensor.dims)}, not a 2-D {what} weight")
        yield node, name, tensor, node.op_type == "Gemm" and _attributes(node).get("transB", 0) == 1


def _drop_unread(graph, replaced: set) -> None:
    """Remove the initializers of `replaced` that no node reads any more."""
    still_read = {x for node in graph.node for x in node.input}
    kept = [t for t in graph.initializer if t.name in still_read or t.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept)


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
    graph = model.graph
    made = {}
    for node, name, tensor, transposed in _weight_nodes(model, src, nodes, onnx.TensorProto.FLOAT, "float32"):
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
        node.CopyFrom(replaced)
    _drop_unread(graph, {name for name, _ in made})
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    dst.parent.mkdir(parents=True, exist_ok=True)
    if external_data:
        onnx.save_model(model, str(dst), save_as_external_data=True, location=f"{dst.name}.data")
    else:
        onnx.save_model(model, str(dst))


def packed_int4(values: np.ndarray) -> bytes:
    """`values` (int8 in -8..7) as ONNX and TensorRT pack INT4: two a byte, the first in the low nibble,
    in row-major order."""
    flat = (values.reshape(-1).astype(np.int8) & 15).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


def trt_block(k: int) -> int | None:
    """The block size of a weight with K = `k` in a TensorRT INT4 graph: the largest of
    policy.INT4_TRT_BLOCKS that divides K (None: none does, and the layer stays FP16)."""
    return next((b for b in INT4_TRT_BLOCKS if k % b == 0), None)


CHUNK_VALUES = 1 << 24  # weight values quantised at once (64 MiB as float32): a 14B matrix is ~170M


def _int4_chunks(view, transposed: bool, block: int, scales: list):
    """The packed INT4 bytes of a float16 weight `view` ([K, N]; [N, K] when `transposed`), a few rows at a
    time (rows of K in whole blocks; rows of N), each chunk's FP16 scales appended to `scales` (as the
    DequantizeLinear reads them: [K/block, N]; [N, K/block])."""
    rows, cols = view.shape
    step = max(1, CHUNK_VALUES // cols) if transposed else max(1, CHUNK_VALUES // cols // block) * block
    for r in range(0, rows, step):
        w = np.asarray(view[r : r + step], dtype=np.float32)
        q, scale = int4_values(w.T if transposed else w, block, np.float16)  # [n, k/b, b], [n, k/b]
        n = q.shape[0]
        if transposed:
            yield packed_int4(q.reshape(n, -1))
            scales.append(scale)
        else:
            yield packed_int4(q.reshape(n, -1).T)
            scales.append(scale.T)


def _weight_view(tensor, base: Path):
    """A float16 weight's values, read lazily (memory-mapped) when they are in an external file."""
    from onnx import numpy_helper

    from ..export.shared_weights import external_file, is_external

    if not is_external(tensor):
        return numpy_helper.to_array(tensor)
    path, offset, length = external_file(base, tensor)
    return np.memmap(path, dtype=np.float16, mode="r", offset=offset, shape=tuple(tensor.dims))


def quantize_int4_qdq(
    src, dst, nodes: list[str], external_bytes: int = EXTERNAL_DATA_BYTES, opset: int | None = QDQ_OPSET
):
    """Write `src` (an FP16 stage graph) with the weights of the MatMul / Gemm nodes `nodes` as INT4
    values and FP16 block scales (int4_values, blocks along K of `trt_block(K)`) that a
    DequantizeLinear expands before the node, the whole graph at `opset` (None: as it is; no `nodes`
    and no opset: a copy); every other node is left as it is. A weight read by several of them is
    stored and dequantised once. Graphs of any size: weights are read memory-mapped and written a
    chunk at a time (export/shared_weights.save_streamed), the graph in dst's own files (its data
    over `external_bytes` in dst.name + ".data"). Returns (the nodes left FP16 because no TensorRT
    block size divides their K, the files written)."""
    import onnx
    from onnx import helper, version_converter

    from ..export.shared_weights import is_external, placeholder, read_chunks, save_streamed

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)  # (a skeleton: external weights stay in their files)
    if opset is not None and not any(o.domain in ("", "ai.onnx") and o.version >= opset for o in model.opset_import):
        model = version_converter.convert_version(model, opset)
    if nodes:
        model.ir_version = max(model.ir_version, 10)  # (INT4 tensors)
    graph = model.graph
    made, left, dequantise = {}, [], []
    for node, name, tensor, transposed in _weight_nodes(model, src, nodes, FLOAT16, "float16"):
        k = tensor.dims[1] if transposed else tensor.dims[0]
        block = trt_block(k)
        if block is None:
            left.append(node.name)
            continue
        if name not in made:
            source = onnx.TensorProto()
            source.CopyFrom(tensor)
            made[name] = (source, transposed, block)
            dequantise.append(
                helper.make_node(
                    "DequantizeLinear",
                    [f"{name}_int4", f"{name}_int4_scales"],
                    [f"{name}_int4_dequantized"],
                    name=f"{name}_int4_DequantizeLinear",
                    axis=1 if transposed else 0,
                    block_size=block,
                )
            )
        node.input[1] = f"{name}_int4_dequantized"
    _drop_unread(graph, set(made))
    fills = []
    for t in graph.initializer:  # the source's external data is copied into dst's own file, a chunk at a time
        if is_external(t):
            source = onnx.TensorProto()
            source.CopyFrom(t)
            fills.append((t, read_chunks(source, src.parent)))
    for name, (source, transposed, block) in made.items():
        blocks = list(source.dims)
        blocks[1 if transposed else 0] //= block
        values, scales = graph.initializer.add(), graph.initializer.add()
        values.CopyFrom(placeholder(onnx.TensorProto(name=f"{name}_int4", data_type=INT4, dims=source.dims)))
        scales.CopyFrom(placeholder(onnx.TensorProto(name=f"{name}_int4_scales", data_type=FLOAT16, dims=blocks)))
        stash: list = []
        fills.append((values, _int4_chunks(_weight_view(source, src.parent), transposed, block, stash)))
        fills.append((scales, _stashed(stash)))  # (after the values: their chunks fill the stash)
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(dequantise + rest)  # (their inputs are initializers: first keeps the order topological)
    dst.parent.mkdir(parents=True, exist_ok=True)
    return left, save_streamed(model, dst, fills, external_bytes)


def _stashed(stash: list):
    for scales in stash:
        yield np.ascontiguousarray(scales, dtype=np.float16).tobytes()

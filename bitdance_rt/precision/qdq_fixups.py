"""Touch-ups of the Q/DQ graph ONNX Runtime's quantiser writes, so that it runs on integer kernels.

A Q/DQ graph only says where values are rounded to int8; whether a runtime then computes in int8
is up to its graph optimiser. ONNX Runtime's CPU optimiser turns DQ -> MatMul into
MatMulIntegerToFloat, DQ -> Gemm into QGemm and DQ -> Conv -> Q into QLinearConv, but on x86 only
after converting the int8 activations to uint8, which it does for a QuantizeLinear with exactly one
consumer. Where a pattern is not matched, the weights are dequantised on every call and the INT8
graph runs slower than the FP32 one (measured on BitDance-B-4x: head_step 23 ms vs 11 ms FP32).
Each fix below removes one reason we met for a pattern not to match; none changes what is computed.
TensorRT reads the result the same way (it fuses Q/DQ by pattern too, and needs none of this).
"""

from __future__ import annotations

import collections

from .policy import INT8_OP_TYPES, INT8_OUTPUT_OP_TYPES


def _consumers(graph):
    out = collections.defaultdict(list)
    for node in graph.node:
        for i, name in enumerate(node.input):
            out[name].append((node, i))
    return out


def float_for_unquantised_consumers(graph, quantised_outputs=INT8_OUTPUT_OP_TYPES) -> int:
    """Point every op that is not quantised back at the float tensor a DequantizeLinear stands for.

    The quantiser rewires all consumers of a quantised graph input to its dequantised copy
    (DedicatedQDQPair covers only inner tensors), so e.g. the decoder's norm statistics would read
    the int8-rounded latent. Tensors made by ops whose outputs the policy quantises (Conv) keep
    their dequantised readers: that rounding is the point there. Returns how many inputs moved."""
    produced = {o: n for n in graph.node for o in n.output}
    fixed = 0
    for node in graph.node:
        if node.op_type in INT8_OP_TYPES or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            dq = produced.get(name)
            q = produced.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is None or q.op_type != "QuantizeLinear":
                continue
            maker = produced.get(q.input[0])
            if maker is not None and maker.op_type in quantised_outputs and node.op_type != "Shape":
                continue
            node.input[i] = q.input[0]
            fixed += 1
    return fixed


def shapes_from_graph_inputs(model) -> int:
    """Shape(x) -> the same shape rebuilt from constants and the graph inputs' symbolic dims.

    The exported decoder reads Shape(conv output) to reshape its GroupNorm back and to size its
    depth-to-space upsampling; that Shape is a second reader of the convolution's output, and a
    Conv whose output has a reader besides its QuantizeLinear is not fused. Where shape inference
    knows every dim of x as a number or as a named dim of a graph input (the batch), the shape is
    built without reading x. Returns how many Shape nodes were replaced."""
    import numpy as np
    from onnx import helper, numpy_helper

    from ..export.skeleton import infer_shapes

    graph = model.graph
    inferred = infer_shapes(model).graph  # on a skeleton: the graph may be over protobuf's 2 GB
    shapes = {v.name: v.type.tensor_type.shape for v in inferred.value_info}
    named = {}  # dim_param -> (graph input, axis)
    for inp in graph.input:
        for axis, d in enumerate(inp.type.tensor_type.shape.dim):
            if d.dim_param:
                named.setdefault(d.dim_param, (inp.name, axis))
    out, fixed = [], 0
    for node in graph.node:
        shape = shapes.get(node.input[0]) if node.op_type == "Shape" and not node.attribute else None
        dims = list(shape.dim) if shape is not None else []
        if not dims or any(not (d.HasField("dim_value") or d.dim_param in named) for d in dims):
            out.append(node)
            continue
        pieces = []
        for axis, d in enumerate(dims):
            name = f"{node.output[0]}_dim{axis}"
            if d.HasField("dim_value"):
                graph.initializer.append(numpy_helper.from_array(np.array([d.dim_value], np.int64), name))
            else:
                source, source_axis = named[d.dim_param]
                out.append(
                    helper.make_node("Shape", [source], [name], name=name, start=source_axis, end=source_axis + 1)
                )
            pieces.append(name)
        out.append(helper.make_node("Concat", pieces, list(node.output), name=node.name, axis=0))
        fixed += 1
    del graph.node[:]
    graph.node.extend(out)
    return fixed


def own_quantisation_parameters(graph) -> int:
    """Give each QuantizeLinear its own scale and zero-point initialisers.

    With DedicatedQDQPair, a tensor read by three quantised MatMuls (the head's adaLN input) gets
    three QuantizeLinear nodes with the same input, scale and zero point; ONNX Runtime's common
    subexpression elimination merges them into one Q with three consumers, which then is not
    converted to uint8 and none of the three MatMuls is fused. Distinct parameter names keep the
    nodes distinct. Returns how many nodes got their own copies."""
    import onnx

    inits = {t.name: t for t in graph.initializer}
    uses = collections.Counter(name for n in graph.node if n.op_type == "QuantizeLinear" for name in n.input[1:])
    fixed = 0
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or not any(uses[name] > 1 for name in node.input[1:]):
            continue
        for i in range(1, len(node.input)):
            source = inits.get(node.input[i])
            if source is None:
                continue
            copy = onnx.TensorProto()
            copy.CopyFrom(source)
            copy.name = f"{node.output[0]}_{'scale' if i == 1 else 'zero_point'}"
            graph.initializer.append(copy)
            node.input[i] = copy.name
        fixed += 1
    return fixed


def gemm_bias_as_add(graph) -> int:
    """Gemm(DQ a, DQ w, float bias) -> Add(Gemm(DQ a, DQ w), bias).

    ONNX Runtime fuses a Q/DQ Gemm into QGemm only when all its inputs are dequantised, bias
    included (an int32 bias, which our policy does not use: TensorRT wants float biases).
    Returns how many Gemms were split."""
    import onnx

    produced = {o: n for n in graph.node for o in n.output}
    inits = {t.name for t in graph.initializer}
    out, fixed = [], 0
    for node in graph.node:
        out.append(node)
        if node.op_type != "Gemm" or len(node.input) < 3 or not node.input[2] or node.input[2] not in inits:
            continue
        beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0)
        makers = [produced.get(x) for x in node.input[:2]]
        if beta != 1.0 or any(m is None or m.op_type != "DequantizeLinear" for m in makers):
            continue
        bias, result = node.input[2], node.output[0]
        del node.input[2]
        node.output[0] = f"{result}_no_bias"
        out.append(onnx.helper.make_node("Add", [node.output[0], bias], [result], name=f"{node.name}_bias"))
        fixed += 1
    del graph.node[:]
    graph.node.extend(out)
    return fixed


def fix_model(model) -> dict:
    """Apply every fix to a Q/DQ graph (an onnx.ModelProto, changed in place; its tensors may be
    external or placeholders: none is read). Returns how many places each fix changed."""
    return {
        "shapes": shapes_from_graph_inputs(model),
        "float_consumers": float_for_unquantised_consumers(model.graph),
        "own_qparams": own_quantisation_parameters(model.graph),
        "gemm_bias": gemm_bias_as_add(model.graph),
    }


def fix_for_integer_kernels(path) -> dict:
    """Apply every fix to the Q/DQ graph at `path` in place (external data files are left as they are:
    the graph is read without them, so this works on graphs over 2 GB)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts = fix_model(model)
    if any(counts.values()):
        onnx.save_model(model, str(path))
    return counts

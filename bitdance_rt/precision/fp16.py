"""FP32 stage graph -> FP16 stage graph (float32 inputs/outputs kept), with onnxconverter-common.

onnxconverter-common's `convert_float_to_float16` does the conversion (initialisers to FP16, Cast
nodes around the ops kept in FP32, `keep_io_types`). Two defects of its 1.16 release on our
graphs are worked around here, around the call rather than inside the graph logic:
1. a float->float Cast (torch's `.float()` on a float tensor, e.g. the sampler time) makes it
   rewire the Cast's consumer straight to the FP32 graph input without a Cast to FP16, giving
   "Type parameter (T) of Mul bound to different types": we drop such no-op Casts first;
2. a Cast from an integer type to FLOAT (e.g. a shape product turned into a divisor) gets an FP16
   value_info but keeps to=FLOAT: we point those Casts at FLOAT16 afterwards.
(Putting Cast in its block list instead loops forever in 1.16.)

RMSNorm's square (x * x feeding the ReduceMean of the exported rms_norm) is kept in FP32 by node:
ReduceMean is FP32 already, but the square before it would overflow FP16 (max 65504) for any
|x| > 256, and LLM residual streams carry such "massive activations" (in the thousands in LLaMA-2,
arXiv 2402.17762): the row's norm becomes inf and its output 0. Measured on the tiny Qwen3 model
with one hidden channel scaled to ~500 (tests/test_fp16_norms.py): FP16 with the square in FP16
gives non-finite or zeroed conditions, with it in FP32 the FP32 conditions within 1%.
NVIDIA ModelOpt's AutoCast also
converts these graphs, but it installs CUDA torch, onnxruntime-gpu and CuPy: too heavy for a CPU
deployment path, and it conflicts with the onnxruntime CPU package.
"""

from __future__ import annotations

from .policy import FP16_KEEP_FLOAT_OPS, sampler_arithmetic

FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto


def norm_squares(nodes) -> list[str]:
    """Names of the x * x nodes whose output a ReduceMean reads (the RMSNorm statistics)."""
    nodes = list(nodes)
    reduced = {name for n in nodes if n.op_type == "ReduceMean" for name in n.input[:1]}
    return [n.name for n in nodes if n.op_type == "Mul" and len(n.input) == 2 and n.input[0] == n.input[1]
            and n.output[0] in reduced]


def _drop_noop_casts(model) -> int:
    """Remove Cast nodes whose input already has the target type; returns how many."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    outputs = {o.name for o in model.graph.output}
    rename: dict[str, str] = {}
    kept = []
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if node.op_type == "Cast" and to is not None and types.get(node.input[0]) == to and node.output[0] not in outputs:
            rename[node.output[0]] = node.input[0]
            continue
        kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return len(rename)


def _fix_float_casts(model) -> int:
    """Casts to FLOAT whose output the converter declared FLOAT16: make them cast to FLOAT16."""
    declared = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    fixed = 0
    for node in model.graph.node:
        if node.op_type != "Cast" or declared.get(node.output[0]) != FLOAT16:
            continue
        for a in node.attribute:
            if a.name == "to" and a.i == FLOAT:
                a.i = FLOAT16
                fixed += 1
    return fixed


def convert_fp16(model, sampler: bool = False):
    """An FP16 copy of `model` (onnx.ModelProto, weights loaded) under the policy of policy.py;
    `sampler`: a fused head sampler graph, whose update arithmetic stays FP32."""
    from onnxconverter_common import float16

    model.graph.ClearField("value_info")
    _drop_noop_casts(model)
    blocked_nodes = (sampler_arithmetic(model.graph.node) if sampler else []) + norm_squares(model.graph.node)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns about every value clamped into FP16 range
        out = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=list(FP16_KEEP_FLOAT_OPS),
                                               node_block_list=blocked_nodes)
    _fix_float_casts(out)
    return out

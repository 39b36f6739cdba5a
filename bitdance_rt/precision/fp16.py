"""FP32 stage graph -> FP16 stage graph (float32 inputs/outputs kept), with onnxconverter-common.

onnxconverter-common's `convert_float_to_float16` does the conversion (initialisers to FP16, Cast
nodes around the ops kept in FP32, `keep_io_types`); what stays FP32 is policy.py's list, plus the
RMSNorm square (`norm_squares`) and, in a fused sampler, its own arithmetic. Two defects of its
1.16 release on our graphs are worked around around the call rather than inside the graph logic
(`_drop_noop_casts`, `_fix_float_casts`). Graphs over protobuf's 2 GB (the 14B model's text
embedding, its backbone) convert too: the converter sees a skeleton (`_convert`), and the large
tensors are converted chunk by chunk (`convert_fp16_file`, the entry derivation uses).
NVIDIA ModelOpt's AutoCast also converts these graphs, but it installs CUDA torch, onnxruntime-gpu
and CuPy: too heavy for a CPU deployment path, and it conflicts with the onnxruntime CPU package.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..export.shared_weights import EXTERNAL_DATA_BYTES
from .policy import FP16_KEEP_FLOAT_OPS, sampler_arithmetic

FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto


def norm_squares(nodes) -> list[str]:
    """Names of the x * x nodes whose output a ReduceMean reads (the RMSNorm statistics).

    They are kept in FP32 by node: ReduceMean is FP32 already, but the square before it would
    overflow FP16 (max 65504) for any |x| > 256, and LLM residual streams carry such "massive
    activations" (in the thousands in LLaMA-2, arXiv 2402.17762): the row's norm becomes inf and its
    output 0. Measured on the tiny Qwen3 model with one hidden channel scaled to ~500
    (tests/test_fp16_norms.py): FP16 with the square in FP16 gives non-finite or zeroed conditions,
    with it in FP32 the FP32 conditions within 1%."""
    nodes = list(nodes)
    reduced = {name for n in nodes if n.op_type == "ReduceMean" for name in n.input[:1]}
    return [
        n.name
        for n in nodes
        if n.op_type == "Mul" and len(n.input) == 2 and n.input[0] == n.input[1] and n.output[0] in reduced
    ]


def _drop_noop_casts(model) -> int:
    """Remove Cast nodes whose input already has the target type; returns how many. (Shape inference
    runs on a skeleton: `model` may be over 2 GB.)

    Works around a defect of onnxconverter-common 1.16: a float->float Cast (torch's `.float()` on a
    float tensor, e.g. the sampler time) makes it rewire the Cast's consumer straight to the FP32
    graph input without a Cast to FP16, giving "Type parameter (T) of Mul bound to different types".
    (Putting Cast in its block list instead loops forever in 1.16.)"""
    from ..export.skeleton import infer_shapes

    g = infer_shapes(model).graph
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
        if (
            node.op_type == "Cast"
            and to is not None
            and types.get(node.input[0]) == to
            and node.output[0] not in outputs
        ):
            rename[node.output[0]] = node.input[0]
            continue
        kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return len(rename)


def _fix_float_casts(model) -> int:
    """Casts to FLOAT whose output the converter declared FLOAT16: make them cast to FLOAT16.

    Works around a defect of onnxconverter-common 1.16: a Cast from an integer type to FLOAT (e.g. a
    shape product turned into a divisor) gets an FP16 value_info but keeps to=FLOAT."""
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


# onnxconverter-common's clamp (convert_np_to_float16's defaults, which convert_float_to_float16 uses)
_MIN_POSITIVE, _MAX_FINITE = 1e-7, 1e4
_STASH = "bitdance_rt_stash"  # external_data key of a stripped tensor's placeholder: its index in the stash


def to_fp16(values):
    """float32 values -> float16 exactly as onnxconverter-common converts an initialiser
    (convert_np_to_float16 with the converter's defaults: magnitudes in (0, 1e-7) become 1e-7, finite
    ones above 1e4 become 1e4, keeping the sign; 0, inf and NaN stay), ~10x faster than it: torch
    rounds to FP16 (vectorised; numpy's cast is scalar code), and as rounding is monotonic the
    values to clamp are exactly those whose FP16 magnitude lands below FP16(1e-7) (but 0) or above
    FP16(1e4) (but inf from inf), found on the FP16 bits."""
    import warnings

    import numpy as np
    import torch

    a = np.asarray(values, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a read-only buffer: torch warns; it is only read)
        out = torch.from_numpy(a).to(torch.float16).numpy()
    bits = out.view(np.uint16)
    mag = bits & 0x7FFF
    for limit, below in ((_MIN_POSITIVE, True), (_MAX_FINITE, False)):
        edge = int(np.array(limit, np.float32).astype(np.float16).view(np.uint16))
        fix = mag < edge if below else (mag > edge) & (mag <= 0x7C00)  # (0x7C00: inf; above: NaN)
        if fix.any():
            fix &= (a != 0) if below else np.isfinite(a)
            bits[fix] = (bits[fix] & 0x8000) | edge
    return out


def _strip(model, base):
    """A skeleton of `model` for the converter: every tensor of SKELETON_BYTES or more (inline, or
    external relative to `base`) becomes a placeholder (shape and type only) and goes to the stash;
    smaller external ones are read in, so shape inference sees every shape constant. Returns
    (skeleton, stash: [original tensor])."""
    import onnx

    from ..export.shared_weights import (
        SKELETON_BYTES,
        STRING,
        is_external,
        make_inline,
        placeholder,
        read_bytes,
        tensor_nbytes,
    )
    from ..export.skeleton import skeleton

    stash = []

    def replace(t):
        if t.data_type == STRING:  # not converted, kept as it is
            return t
        if tensor_nbytes(t) >= SKELETON_BYTES:
            stash.append(t)
            return placeholder(t, {_STASH: len(stash) - 1})
        if is_external(t):
            small = onnx.TensorProto()
            small.CopyFrom(t)
            make_inline(small, read_bytes(t, base))
            return small
        return t

    return skeleton(model, replace), stash


def sort_nodes(graph) -> None:
    """Order `graph`'s nodes as onnxconverter_common's float16.sort_graph_node does -- repeatedly the
    first node, in the current order, whose inputs no unplaced node makes -- in O(n log n): its own
    scan is quadratic (a 25-step fused sampler of the embedded model, ~15k nodes, spent most of its
    FP16 conversion there). A ready queue keyed by position gives the same order."""
    import collections
    import heapq

    nodes = list(graph.node)
    made_by = {name: i for i, node in enumerate(nodes) for name in node.output}
    waiting = [0] * len(nodes)
    readers = collections.defaultdict(list)
    for i, node in enumerate(nodes):
        for name in set(node.input):
            if name in made_by:
                waiting[i] += 1
                readers[made_by[name]].append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for j in readers[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        from ..errors import BitDanceError

        raise BitDanceError(f"graph {graph.name!r}: {len(nodes) - len(order)} nodes are on a cycle")
    del graph.node[:]
    graph.node.extend(order)


@contextlib.contextmanager
def _linear_sort(float16):
    """Within the block the converter's final node sort is `sort_nodes` (same order, linear time). The
    converter has no option to skip or replace it, so its module's function is swapped and restored."""
    library_sort = float16.sort_graph_node
    float16.sort_graph_node = sort_nodes
    try:
        yield
    finally:
        float16.sort_graph_node = library_sort


def _convert(model, sampler: bool, float_ops=FP16_KEEP_FLOAT_OPS):
    """The converter on a skeleton (see _strip), value_info from shape inference on it; `float_ops`:
    the op types kept FP32 (BF16 adds some, policy.bf16_float_ops).

    Protobuf cannot serialise a graph over 2 GB (the 14B model's 3.1 GB text embedding, its
    backbone), and both the no-op-Cast pass and the converter ran onnx.shape_inference.infer_shapes
    on the in-memory model (ValueError past 2 GB). Both now see a skeleton -- every tensor of 1 MiB
    or more replaced by a data-less placeholder of the same name, dims and type
    (export/shared_weights.py), shape constants kept -- and the converter is told not to infer shapes
    itself (`disable_shape_infer`, given the skeleton's inferred value_info): it only decides which
    tensors become FLOAT16. Those are then converted by the caller, chunk by chunk, with the
    converter's own clamp (`to_fp16`)."""
    import warnings

    from onnxconverter_common import float16

    from ..export.skeleton import infer_shapes

    floats = {v.name for v in model.graph.output if v.type.tensor_type.elem_type == FLOAT}
    model.graph.ClearField("value_info")
    _drop_noop_casts(model)
    blocked_nodes = (sampler_arithmetic(model.graph.node) if sampler else []) + norm_squares(model.graph.node)
    inferred = infer_shapes(model)  # what the converter's own infer_shapes would give, without serialising weights
    with warnings.catch_warnings(), _linear_sort(float16):
        warnings.simplefilter("ignore")  # it warns about every value clamped into FP16 range
        out = float16.convert_float_to_float16(
            inferred,
            keep_io_types=True,
            disable_shape_infer=True,
            op_block_list=list(float_ops),
            node_block_list=blocked_nodes,
        )
    _fix_float_casts(out)
    _float_outputs(out.graph, floats)
    return out


def _float_outputs(graph, names) -> None:
    """The graph outputs `names` back to FLOAT where the converter declared them FLOAT16.

    Works around a defect of onnxconverter-common 1.16: a kept-FP32 node that writes a graph output
    gets a Cast to FLOAT16 after it, and the output is declared FLOAT16, against the float32 stage
    contract: a fused sampler's final Sign (its +-1 tokens) and, in BF16, the decoder's last Conv.
    That Cast now casts to FLOAT (of a FLOAT tensor: a no-op that ONNX Runtime and TensorRT remove)."""
    made_by = {name: node for node in graph.node for name in node.output}
    for v in graph.output:
        if v.name not in names or v.type.tensor_type.elem_type != FLOAT16:
            continue
        node = made_by.get(v.name)
        if node is None or node.op_type != "Cast":
            raise ValueError(f"graph output {v.name!r}: declared FLOAT16 by the converter, and no Cast writes it")
        for a in node.attribute:
            if a.name == "to":
                a.i = FLOAT
        v.type.tensor_type.elem_type = FLOAT


def _stashed(out, stash):
    """[(placeholder in the converted skeleton, original tensor)]."""
    from ..export.shared_weights import external_info, is_external, tensors

    found = []
    for t, _ in tensors(out.graph):
        index = external_info(t).get(_STASH) if is_external(t) else None
        if index is not None:
            found.append((t, stash[int(index)]))
    return found


def _data(placeholder, original, base, halves=None):
    """The converted tensor's raw bytes, in chunks: FP16 where the converter made it FLOAT16.
    `halves`: {element type: float32 numpy -> its values} (default {FLOAT16: to_fp16}; BF16's retyped
    placeholders are rounded from the same float32 originals, bf16.py)."""
    import numpy as np

    from ..export.shared_weights import read_chunks

    halves = halves or {FLOAT16: to_fp16}
    chunks = read_chunks(original, base)
    if placeholder.data_type == original.data_type:
        return chunks
    if original.data_type != FLOAT or placeholder.data_type not in halves:
        raise ValueError(
            f"tensor {original.name!r}: converted from type {original.data_type} to {placeholder.data_type}"
        )
    half = halves[placeholder.data_type]
    return (memoryview(half(np.frombuffer(c, np.float32))).cast("B") for c in chunks)


def convert_fp16(model, sampler: bool = False, base_dir=None):
    """An FP16 copy of `model` (onnx.ModelProto) under the policy of policy.py, its tensors inline;
    `sampler`: a fused head sampler graph, whose update arithmetic stays FP32; `base_dir`: where the
    external data of a model loaded without it lives. `model` is left as it is.

    Graph size: the converter and shape inference see a skeleton (large tensors' data dropped), so
    graphs over protobuf's 2 GB convert; the copy then holds every tensor in memory. Derivation
    converts files with convert_fp16_file, which streams the tensors instead."""
    skeleton, stash = _strip(model, base_dir)
    out = _convert(skeleton, sampler)
    _inline(_stashed(out, stash), base_dir)
    return out


def _inline(stashed, base, halves=None) -> None:
    """Put the converted data into the placeholders themselves (a graph that fits one protobuf)."""
    from ..export.shared_weights import make_inline

    for placeholder, original in stashed:  # (bytes(c): the file reader reuses its buffer)
        make_inline(placeholder, b"".join(bytes(c) for c in _data(placeholder, original, base, halves)))


def convert_fp16_file(src, dst, sampler: bool = False, external_bytes: int = EXTERNAL_DATA_BYTES) -> list[str]:
    """Convert the graph file `src` (with its external data, if any) into `dst`; returns the files
    written (dst's name, and dst.name + ".data" when the FP16 tensors are over `external_bytes`).

    The entry derivation uses, for graphs of any size: the graph is read without its weights, the
    converter works on a skeleton, and each large tensor is then read, converted and written in
    chunks (peak memory: the graph's small tensors plus one chunk; no ModelProto over 2 GB is ever
    serialised)."""
    import onnx

    from ..export.shared_weights import save_streamed

    src, dst = Path(src), Path(dst)
    skeleton, stash = _strip(onnx.load(str(src), load_external_data=False), src.parent)
    out = _convert(skeleton, sampler)
    fills = ((holder, _data(holder, original, src.parent)) for holder, original in _stashed(out, stash))
    return save_streamed(out, dst, fills, external_bytes)

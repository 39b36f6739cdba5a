"""Skeletons of ONNX models: copies with their large tensors swapped out, for graphs of any size.

Protobuf cannot serialise a message over 2 GB (the 14B model's text embedding graph, 3.1 GB, and
its backbone), and `onnx.shape_inference.infer_shapes`, like the FP16 converter, serialises the
whole model. A skeleton (`skeleton`) is built field by field with each tensor replaced as the
caller says (`replace`: a data-less placeholder of shared_weights.py for a large one), so the large
tensors are never copied or serialised; `infer_shapes` runs shape inference on one.
"""

from __future__ import annotations

from .shared_weights import SKELETON_BYTES, is_external, placeholder, tensor_nbytes


def _repeated(field) -> bool:
    flag = getattr(field, "is_repeated", None)  # (protobuf >= 6; `label` is deprecated there)
    return flag if isinstance(flag, bool) else field.label == field.LABEL_REPEATED


def skeleton(model, replace):
    """A copy of `model` in which every TensorProto `t` (initializers, node attributes, subgraphs)
    is `replace(t)` (a TensorProto to copy in; `t` itself to keep it), built field by field, so that
    the large tensors `replace` drops are never copied or serialised. For shape inference and graph
    rewrites of graphs over protobuf's 2 GB."""
    import onnx

    return _copy_fields(
        model, onnx.ModelProto(), {"graph": lambda out, g: out.graph.CopyFrom(_skeleton_graph(g, replace))}
    )


def _copy_fields(src, out, special: dict):
    """Copy the set fields of message `src` into `out`; a field named in `special` is handled by
    `special[name](out, value)` instead (where the tensors are)."""
    for field, value in src.ListFields():
        if field.name in special:
            special[field.name](out, value)
        elif _repeated(field):
            getattr(out, field.name).extend(value)
        elif field.message_type is not None:
            getattr(out, field.name).CopyFrom(value)
        else:
            setattr(out, field.name, value)
    return out


def _skeleton_graph(graph, replace):
    import onnx

    return _copy_fields(
        graph,
        onnx.GraphProto(),
        {
            "initializer": lambda out, ts: out.initializer.extend(replace(t) for t in ts),
            "node": lambda out, nodes: out.node.extend(_skeleton_node(n, replace) for n in nodes),
        },
    )


def _skeleton_node(node, replace):
    if not any(a.HasField("t") or a.tensors or a.HasField("g") or a.graphs for a in node.attribute):
        return node
    import onnx

    attribute = {
        "t": lambda a, t: a.t.CopyFrom(replace(t)),
        "tensors": lambda a, ts: a.tensors.extend(replace(t) for t in ts),
        "g": lambda a, g: a.g.CopyFrom(_skeleton_graph(g, replace)),
        "graphs": lambda a, gs: a.graphs.extend(_skeleton_graph(g, replace) for g in gs),
    }
    return _copy_fields(
        node,
        onnx.NodeProto(),
        {"attribute": lambda out, attrs: [_copy_fields(a, out.attribute.add(), attribute) for a in attrs]},
    )


def infer_shapes(model, min_bytes: int = SKELETON_BYTES, **options):
    """onnx.shape_inference.infer_shapes on a skeleton of `model` (its inline tensors of `min_bytes`
    or more replaced by placeholders): the same value_info for a graph of any size, without
    serialising its weights. Returns the inferred skeleton (use its graph's value_info)."""
    import onnx

    def strip(t):
        return placeholder(t) if not is_external(t) and tensor_nbytes(t) >= min_bytes else t

    return onnx.shape_inference.infer_shapes(skeleton(model, strip), **options)

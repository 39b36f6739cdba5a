"""A stage graph cut into consecutive pieces of bounded weight, run one piece at a time.

An ONNX Runtime session holds every weight of its graph: the FP16 backbone of the 14B is ~27 GB, more
than the INT8 export's whole budget. To measure activations over such a graph (fp16_ranges.py), the
nodes the wanted tensors depend on are cut, in the graph's own (topological) order, into pieces of
about `piece_bytes` of weights each. A piece is a small weightless graph of its own: its inputs are
the stage inputs it reads and the tensors earlier pieces made that it or later pieces read (the
carry, kept by the caller until its last reader has run); its outputs are the wanted tensors it makes
and the carry it hands on. Constants are copied into each piece that reads them. Each piece runs the
same kernels on the same values as the whole graph would, so its outputs are the whole graph's, bit for
bit (ONNX Runtime may compute a run of FP16 nodes in FP32 inside one graph, where a piece's carry is
FP16: fp16_ranges' test says by how much).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import BitDanceError


@dataclass
class Piece:
    """One piece: `model` (weightless ModelProto, weights still named by the export's external data),
    the stage inputs it reads, the carry it reads and hands on, and the wanted tensors it makes."""

    model: object
    inputs: list[str]
    carry_in: list[str]
    carry_out: list[str]
    wanted: list[str] = field(default_factory=list)
    weight_bytes: int = 0


def tensor_bytes(tensor) -> int:
    """Bytes of an initializer: its external data's length, or its data held in the proto."""
    import numpy as np
    import onnx

    for entry in tensor.external_data:
        if entry.key == "length":
            return int(entry.value)
    if tensor.raw_data:
        return len(tensor.raw_data)
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def cut(model, wanted: list[str], types: dict[str, int], piece_bytes: int) -> list[Piece]:
    """`model` (weightless) cut into pieces of about `piece_bytes` of weights that together make the
    tensors `wanted` (see the module doc). `types`: {tensor: ONNX element type} for every tensor that
    may be carried (shape inference's). A graph within budget is one piece, whatever it holds."""
    graph = model.graph
    nodes = list(graph.node)
    made = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    inits = {t.name: t for t in graph.initializer}
    stage_inputs = {i.name for i in graph.input}
    missing = [w for w in wanted if w not in made and w not in stage_inputs]
    if missing:
        raise BitDanceError(f"tensors {missing[:3]} are made by no node and are no input of the graph")
    if any(a.type in (a.GRAPH, a.GRAPHS) for n in nodes for a in n.attribute):
        piece_bytes = float("inf")  # (a subgraph reads outer tensors its node does not list: one piece)
    needed, todo = set(), [w for w in wanted if w in made]
    while todo:  # the nodes the wanted tensors depend on
        i = made.get(todo.pop())
        if i is not None and i not in needed:
            needed.add(i)
            todo.extend(x for x in nodes[i].input if x)
    constant = {i for i in needed if nodes[i].op_type == "Constant"}
    order = [i for i in sorted(needed) if i not in constant]
    last_use: dict[str, int] = {}
    for k, i in enumerate(order):
        for x in nodes[i].input:
            if x in made and made[x] not in constant:
                last_use[x] = k
    live_after, live = [], set()  # tensors made at or before k that a later node reads
    for k, i in enumerate(order):
        live |= {o for o in nodes[i].output if last_use.get(o, -1) > k}
        live = {t for t in live if last_use[t] > k}
        live_after.append(len(live))
    weights = [sum(tensor_bytes(inits[x]) for x in set(nodes[i].input) if x in inits) for i in order]
    ends, start = [], 0
    while start < len(order):  # greedy: past the budget, end at the thinnest carry before twice it
        total, k = 0, start
        while k < len(order) and total < piece_bytes:
            total += weights[k]
            k += 1
        if k >= len(order):
            ends.append(len(order))
            break
        limit = k
        while limit < len(order) and total + weights[limit] < 2 * piece_bytes:
            total += weights[limit]
            limit += 1
        end = min(range(k - 1, max(limit, k)), key=lambda j: live_after[j]) + 1
        ends.append(end)
        start = end
    pieces, begin = [], 0
    for end in ends:
        pieces.append(_piece(model, nodes, order[begin:end], set(order[end:]), constant, made, wanted, types, inits))
        begin = end
    reads_inputs = [w for w in wanted if w not in made]  # (wanted stage inputs: fetched from the first piece)
    if reads_inputs:
        first = pieces[0]
        first.wanted = reads_inputs + first.wanted
        absent = [i for i in graph.input if i.name in reads_inputs and i.name not in first.inputs]
        first.model.graph.input.extend(absent)
        first.inputs += [i.name for i in absent]
    _check_chain(pieces)
    return pieces


def _piece(model, nodes, body, later, constant, made, wanted, types, inits) -> Piece:
    """The piece of nodes `body` (indices into `nodes`); `later`: the indices of the pieces after it."""
    import onnx

    graph = model.graph
    here = {o for i in body for o in nodes[i].output}
    reads = {x for i in body for x in nodes[i].input if x}
    after = {x for i in later for x in nodes[i].input if x}
    consts = sorted({made[x] for x in reads if x in made and made[x] in constant})
    carry_in = sorted(x for x in reads if x in made and made[x] not in constant and x not in here)
    carry_out = sorted(x for x in here & after)
    stage_inputs = [i for i in graph.input if i.name in reads]
    mine = [w for w in wanted if w in here]
    used = sorted(x for x in reads if x in inits)
    for name in carry_in:
        if name not in types:
            raise BitDanceError(f"tensor {name!r} crosses a piece boundary and has no inferred type")
    piece_graph = onnx.helper.make_graph(
        [nodes[i] for i in consts] + [nodes[i] for i in body],
        f"{graph.name}-piece",
        list(stage_inputs) + [onnx.helper.make_tensor_value_info(n, types[n], None) for n in carry_in],
        [onnx.helper.make_tensor_value_info(n, types[n], None) for n in carry_out],
        [inits[n] for n in used],
    )
    piece_model = onnx.helper.make_model(
        piece_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version
    )
    piece_model.functions.extend(model.functions)
    return Piece(
        piece_model,
        [i.name for i in stage_inputs],
        carry_in,
        carry_out,
        mine,
        sum(tensor_bytes(inits[n]) for n in used),
    )


def _check_chain(pieces: list[Piece]) -> None:
    """Every carried tensor a piece reads was handed on by a piece before it."""
    handed: set[str] = set()
    for n, piece in enumerate(pieces):
        lost = [t for t in piece.carry_in if t not in handed]
        if lost:  # (a defect here, not the user's: say where)
            raise BitDanceError(f"graph piece {n} reads {lost[:3]}, which no earlier piece hands on")
        handed |= set(piece.carry_out)

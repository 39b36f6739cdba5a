"""The FP16 conversion's node sort: the converter's own order, without its quadratic scan."""

from __future__ import annotations

import random

import pytest


def _random_dag(nodes: int, seed: int):
    """A graph of `nodes` Add nodes, each reading two earlier tensors (or the input), listed shuffled."""
    from onnx import TensorProto, helper

    rng = random.Random(seed)
    made, body = ["x"], []
    for i in range(nodes):
        a, b = rng.choice(made), rng.choice(made)
        body.append(helper.make_node("Add", [a, b], [f"t{i}"], name=f"n{i}"))
        made.append(f"t{i}")
    rng.shuffle(body)
    value = helper.make_tensor_value_info
    return helper.make_graph(
        body, "dag", [value("x", TensorProto.FLOAT, [1])], [value(f"t{nodes - 1}", TensorProto.FLOAT, [1])]
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sort_gives_the_converters_own_order(seed):
    import onnx
    from onnxconverter_common import float16

    from bitdance_rt.precision.fp16 import sort_nodes

    theirs = _random_dag(400, seed)
    ours = onnx.GraphProto()
    ours.CopyFrom(theirs)
    float16.sort_graph_node(theirs)
    sort_nodes(ours)
    assert [n.name for n in ours.node] == [n.name for n in theirs.node]
    position = {o: i for i, n in enumerate(ours.node) for o in n.output}
    assert all(position.get(x, -1) < i for i, n in enumerate(ours.node) for x in n.input)  # topological


def test_a_cycle_is_named_and_the_converter_gets_its_sort_back():
    from onnx import TensorProto, helper
    from onnxconverter_common import float16

    from bitdance_rt.errors import BitDanceError
    from bitdance_rt.precision.fp16 import _linear_sort, sort_nodes

    value = helper.make_tensor_value_info
    loop = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["a"], name="one"), helper.make_node("Relu", ["a"], ["b"], name="two")],
        "loop",
        [value("x", TensorProto.FLOAT, [1])],
        [value("b", TensorProto.FLOAT, [1])],
    )
    with pytest.raises(BitDanceError, match="'loop': 2 nodes are on a cycle"):
        sort_nodes(loop)
    library_sort = float16.sort_graph_node
    with pytest.raises(RuntimeError), _linear_sort(float16):
        assert float16.sort_graph_node is sort_nodes
        raise RuntimeError("a conversion that fails")
    assert float16.sort_graph_node is library_sort

"""Graphs over protobuf's 2 GB limit through every derivation pass: FP16 conversion, weight sharing,
INT8 Q/DQ quantisation (the 14B model's text embedding is a 3.1 GB graph, its backbone far larger).

Before, FP16 conversion raised ValueError on any such graph (shape inference serialised the whole
in-memory model), and the INT8 derivation reached it on its FP16-carried prefix_embed only after
quantising the backbone. The big graphs here are built in a second: their weights are a sparse
external-data file, zeros but for patterned row blocks at the start, across the 2 GiB offset and at
the end (the passes write zero chunks back as holes). Peak memory is ONNX Runtime's quantiser's
(about 3x the graph), the rest streams.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxconverter_common")

from onnx import TensorProto, helper  # noqa: E402

from bitdance_rt import stages as st  # noqa: E402
from bitdance_rt.export.shared_weights import SHARED_WEIGHTS, external_info, share_weights  # noqa: E402
from bitdance_rt.precision import derive  # noqa: E402
from bitdance_rt.precision.fp16 import convert_fp16_file, to_fp16  # noqa: E402
from bitdance_rt.precision.int8 import quantize_int8  # noqa: E402

GIB2 = 1 << 31  # protobuf's limit: 2 GiB


def _pattern(r0: int, r1: int, cols: int) -> np.ndarray:
    """Row block [r0, r1) of a table: values in [-2.046, 2.046] that FP16 does not hold exactly."""
    r = np.arange(r0, r1, dtype=np.int64)[:, None]
    c = np.arange(cols, dtype=np.int64)[None, :]
    return ((((r * 7 + c * 13) % 4093) - 2046) / 1000.0).astype(np.float32)


class Table:
    """A [rows, cols] float32 table in a sparse file: the pattern in `blocks`, zeros elsewhere."""

    def __init__(self, rows: int, cols: int):
        self.rows, self.cols = rows, cols
        across = GIB2 // (cols * 4)  # the row holding byte 2 GiB
        self.blocks = [(0, 256), (across - 200, across + 200), (rows - 256, rows)]

    @property
    def nbytes(self) -> int:
        return self.rows * self.cols * 4

    def write(self, path: Path) -> None:
        with open(path, "wb") as f:
            f.truncate(self.nbytes)
            for r0, r1 in self.blocks:
                f.seek(r0 * self.cols * 4)
                f.write(_pattern(r0, r1, self.cols).tobytes())

    def row(self, r: int) -> np.ndarray:
        inside = any(r0 <= r < r1 for r0, r1 in self.blocks)
        return _pattern(r, r + 1, self.cols)[0] if inside else np.zeros(self.cols, np.float32)

    def patterned(self) -> tuple[np.ndarray, np.ndarray]:
        """(row indices, rows) of the non-zero part."""
        index = np.concatenate([np.arange(r0, r1) for r0, r1 in self.blocks])
        return index, np.concatenate([_pattern(r0, r1, self.cols) for r0, r1 in self.blocks])


def _external(name: str, dims, location: str) -> TensorProto:
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims, data_location=TensorProto.EXTERNAL)
    for k, v in (("location", location), ("offset", 0), ("length", int(np.prod(dims)) * 4)):
        entry = t.external_data.add()
        entry.key, entry.value = k, str(v)
    return t


def _model(nodes, inputs, outputs, initializers):
    g = helper.make_graph(nodes, "big", inputs, outputs, initializers)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run(path: Path, feeds: dict) -> np.ndarray:
    """One run on ONNX Runtime, with the INT8 kernels the runtime picks for this CPU (exact ones)."""
    from bitdance_rt.runtime.int8_kernels import configure, resolve

    options = ort.SessionOptions()
    configure(options, resolve())
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    out = session.run(None, feeds)[0]
    del session
    return out


EMBED = Table(136_000, 4_000)  # 2.18 GB: a text embedding table (contract-like prefix_embed: ids -> x)
IDS = np.array(
    [[0, 7, 255, EMBED.blocks[1][0] + 199, EMBED.blocks[1][0] + 200, EMBED.blocks[1][1] - 1, 1000, EMBED.rows - 1]],
    np.int64,
)


@pytest.fixture(scope="module")
def big_embed(tmp_path_factory):
    """A prefix_embed-like FP32 graph over 2 GB, stored as an export stores it (external data)."""
    d = tmp_path_factory.mktemp("big")
    EMBED.write(d / "prefix_embed.onnx.data")
    model = _model(
        [helper.make_node("Gather", ["table", "ids"], ["x"], name="/embed_tokens/Gather")],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["rows", IDS.shape[1]])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", IDS.shape[1], EMBED.cols])],
        [_external("table", [EMBED.rows, EMBED.cols], "prefix_embed.onnx.data")],
    )
    onnx.save_model(model, str(d / "prefix_embed.onnx"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def scratch(tmp_path):
    """tmp_path, emptied when the test ends (pytest keeps the last runs' directories: not GBs of them)."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_to_fp16_is_the_converters_clamp():
    from onnxconverter_common.float16 import convert_np_to_float16

    rng = np.random.default_rng(0)
    values = np.concatenate(
        [
            np.array(
                [0, -0.0, 1e-8, -1e-8, 1e-7, -1e-7, 2e-7, 1e4, -1e4, 1.5e4, -7e4, 65504, np.inf, -np.inf, np.nan],
                np.float32,
            ),
            (rng.standard_normal(20_000) * 10.0 ** rng.integers(-9, 6, 20_000)).astype(np.float32),
        ]
    )
    with pytest.warns(UserWarning):
        want = convert_np_to_float16(values.copy())
    assert np.array_equal(to_fp16(values).view(np.uint16), want.view(np.uint16))


def test_fp16_of_a_graph_over_2gb(big_embed, scratch):
    """The entry derivation uses converts it (weights streamed to external data), the result passes
    derivation's ONNX checks and gives the FP32 graph's output rounded to FP16."""
    src, dst = big_embed / "prefix_embed.onnx", scratch / "prefix_embed.onnx"
    assert (big_embed / "prefix_embed.onnx.data").stat().st_size > GIB2
    # 1.09 GB of FP16 weights: below shared_weights.EXTERNAL_DATA_BYTES, which the 14B's table (1.55 GB in FP16) is
    # over; a lower bound here makes this graph take that graph's path, weights streamed to external data
    files = convert_fp16_file(src, dst, external_bytes=EMBED.nbytes // 4)
    assert files == ["prefix_embed.onnx", "prefix_embed.onnx.data"]
    derive._check(dst, st.PREFIX_EMBED)
    graph = onnx.load(str(dst), load_external_data=False).graph
    (table,) = graph.initializer
    assert table.data_type == TensorProto.FLOAT16 and int(external_info(table)["length"]) == EMBED.nbytes // 2
    assert [v.type.tensor_type.elem_type for v in graph.output] == [TensorProto.FLOAT]

    want = _run(src, {"ids": IDS})
    np.testing.assert_array_equal(want[0], np.stack([EMBED.row(r) for r in IDS[0]]))  # (the FP32 graph reads right)
    got = _run(dst, {"ids": IDS})
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32))
    assert not np.array_equal(got, want)  # (the pattern is not FP16-exact: the check above means something)


def test_share_weights_of_two_graphs_over_2gb(big_embed, scratch):
    """Two graphs over 2 GB holding the same table: it is stored once and both still compute. (Before,
    each graph was loaded whole, 6.5 GB peak here, and the file lists named the graphs' own data
    files, which no longer existed once their only tensor had moved.)"""
    files = {}
    for stage, name in ((st.PREFIX_EMBED, "a"), ("other", "b")):
        model = onnx.load(str(big_embed / "prefix_embed.onnx"), load_external_data=False)
        model.graph.initializer[0].external_data[0].value = f"{name}.onnx.data"
        onnx.save_model(model, str(scratch / f"{name}.onnx"))
        EMBED.write(scratch / f"{name}.onnx.data")
        files[stage] = [f"{name}.onnx", f"{name}.onnx.data"]
    out = share_weights(scratch, files)
    assert out == {st.PREFIX_EMBED: ["a.onnx", SHARED_WEIGHTS], "other": ["b.onnx", SHARED_WEIGHTS]}
    assert sorted(p.name for p in scratch.iterdir()) == ["a.onnx", "b.onnx", SHARED_WEIGHTS]
    assert (scratch / SHARED_WEIGHTS).stat().st_size == EMBED.nbytes
    want = np.stack([EMBED.row(r) for r in IDS[0]])
    for name in "ab":
        np.testing.assert_array_equal(_run(scratch / f"{name}.onnx", {"ids": IDS})[0], want)


class _Reader:
    """quantize_int8's calibration reader: one sample."""

    def __init__(self, feeds):
        self.feeds, self.i = feeds, 0

    def __len__(self):
        return len(self.feeds)

    def get_next(self):
        self.i += 1
        return self.feeds[self.i - 1] if self.i <= len(self.feeds) else None

    def rewind(self):
        self.i = 0


@pytest.mark.slow  # ~60 s: ONNX Runtime's quantiser loads the graph twice and writes a calibration copy of it
def test_int8_of_a_graph_over_2gb(scratch):
    """ONNX Runtime's quantize_static handles a MatMul with a 2.18 GB weight once it writes external
    data (quantize_int8 now picks that for a graph that has external data, whatever the caller says:
    without it the calibrator's augmented copy is written unparseable); the fix-ups edit the result
    without loading it, and it runs and computes the product (int8 rounding: ~2% here)."""
    weight = Table(34_000_000, 16)  # [in, out]: per-output-channel scales, 16 of them
    weight.write(scratch / "proj.onnx.data")
    model = _model(
        [helper.make_node("MatMul", ["h", "w"], ["y"], name="/proj/MatMul")],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["rows", weight.rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", weight.cols])],
        [_external("w", [weight.rows, weight.cols], "proj.onnx.data")],
    )
    onnx.save_model(model, str(scratch / "proj.onnx"))
    h = np.random.default_rng(0).standard_normal((1, weight.rows), dtype=np.float32)
    dst = scratch / "q" / "proj.onnx"
    dst.parent.mkdir()
    quantize_int8(scratch / "proj.onnx", dst, _Reader([{"h": h}]))
    (scratch / "proj.onnx.data").unlink()
    derive._check(dst, st.BACKBONE)
    graph = onnx.load(str(dst), load_external_data=False).graph
    quantised = [t for t in graph.initializer if t.data_type == TensorProto.INT8 and list(t.dims) == [weight.rows, 16]]
    assert len(quantised) == 1 and {n.op_type for n in graph.node} >= {"QuantizeLinear", "DequantizeLinear", "MatMul"}
    rows, values = weight.patterned()
    want = h[:, rows].astype(np.float64) @ values
    got = _run(dst, {"h": h})
    assert np.abs(got - want).max() <= 0.03 * np.abs(want).max()


def test_int8_derivation_converts_the_fp16_carried_stages_first():
    """An export's manifest lists its stages alphabetically, which put the backbone (hours of INT8
    quantisation for the large models) before prefix_embed (its FP16 conversion: minutes)."""
    stages = sorted([st.PREFIX_EMBED, st.TOKEN_EMBED, st.BACKBONE, st.HEAD_STEP, st.DECODER])
    order = derive._work_order(stages, "int8")
    assert order[0] == st.PREFIX_EMBED and sorted(order) == stages
    assert derive._work_order(stages, "fp16") == stages

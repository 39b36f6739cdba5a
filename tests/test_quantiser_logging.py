"""INT8 derivation silences ONNX Runtime's quantiser only: no process-wide logging.disable, the
application's loggers still emit during it, and the root logger is left as it was."""

from __future__ import annotations

import logging

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from bitdance_rt.precision.int8 import quantize_int8, quiet_quantiser  # noqa: E402

app = logging.getLogger("an_application")


class _LoudReader:
    """A calibration reader (read during the derivation) that logs through the application's logger."""

    def __init__(self, feeds):
        self.feeds, self.i = feeds, 0

    def __len__(self):
        return len(self.feeds)

    def get_next(self):
        app.warning("the application still speaks (sample %d)", self.i)
        self.i += 1
        return self.feeds[self.i - 1] if self.i <= len(self.feeds) else None

    def rewind(self):
        self.i = 0


def _matmul(path) -> None:
    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["h", "w"], ["y"], name="/proj/MatMul")],
        "proj",
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["rows", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 4])],
        [numpy_helper.from_array(w, "w")],
    )
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_an_application_logger_emits_during_int8_derivation(tmp_path, caplog):
    _matmul(tmp_path / "proj.onnx")
    feeds = [{"h": np.random.default_rng(i).standard_normal((2, 8)).astype(np.float32)} for i in range(2)]
    root = logging.getLogger()
    disabled, handlers, filters = logging.root.manager.disable, list(root.handlers), list(root.filters)
    caplog.set_level(logging.INFO)
    quantize_int8(tmp_path / "proj.onnx", tmp_path / "proj.int8.onnx", _LoudReader(feeds))
    assert (tmp_path / "proj.int8.onnx").is_file()
    assert any("the application still speaks" in r.getMessage() for r in caplog.records if r.name == app.name)
    assert not [r for r in caplog.records if r.name == "root" and r.levelno < logging.ERROR]  # the quantiser's
    assert logging.root.manager.disable == disabled
    assert root.handlers == handlers and root.filters == filters


def test_quiet_quantiser_drops_only_what_is_logged_on_the_root_itself(caplog):
    caplog.set_level(logging.INFO)
    named = logging.getLogger("onnxruntime.quantization.shape_inference")
    with quiet_quantiser():
        logging.warning("advice of the quantiser")  # the module function: a record of the root logger
        named.info("a named quantiser logger")
        logging.error("an error still shows")
        app.info("an application's record")
        assert logging.root.manager.disable == logging.NOTSET
    assert [r.getMessage() for r in caplog.records] == ["an error still shows", "an application's record"]
    named.info("after the block")
    assert caplog.records[-1].getMessage() == "after the block"


def test_quiet_quantiser_leaves_no_root_handler_behind():
    """logging.warning() calls basicConfig() on a root without handlers: that handler goes at the end."""
    root = logging.getLogger()
    saved = list(root.handlers)
    for h in saved:
        root.removeHandler(h)
    try:
        with quiet_quantiser():
            logging.warning("advice")
            assert root.handlers  # basicConfig ran
        assert root.handlers == []
    finally:
        for h in saved:
            root.addHandler(h)

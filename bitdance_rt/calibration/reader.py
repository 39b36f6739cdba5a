"""Calibration feeds in the form onnxruntime.quantization.quantize_static reads them."""

from __future__ import annotations

try:  # onnxruntime is optional: the reader still works as a plain iterator without it
    from onnxruntime.quantization import CalibrationDataReader as _Base
except ImportError:  # pragma: no cover - exercised only without onnxruntime
    _Base = object


class StageDataReader(_Base):
    """get_next() -> the next feed dict of one stage (numpy, contract input names), None at the end.

    Feeds are built lazily (a backbone_step feed expands the compact cache), and `rewind()`
    starts over, as ONNX Runtime's calibrators expect of a CalibrationDataReader.
    """

    def __init__(self, cset, stage: str):
        self.cset = cset
        self.stage = stage
        self.rewind()

    def get_next(self):
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = self.cset.feeds(self.stage)

    def __len__(self) -> int:
        return len(self.cset.samples.get(self.stage, []))

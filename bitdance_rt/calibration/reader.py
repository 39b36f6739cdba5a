"""Calibration feeds in the form onnxruntime.quantization.quantize_static reads them."""

from __future__ import annotations

try:  # onnxruntime is optional: the reader still works as a plain iterator without it
    from onnxruntime.quantization import CalibrationDataReader as _Base
except ImportError:  # pragma: no cover - exercised only without onnxruntime
    _Base = object


def split_rows(spec, feed: dict) -> list[dict]:
    """One feed per row: inputs whose first contract dim is symbolic (rows / batch) are sliced.

    Rows are independent in every stage graph, so this changes no value the graph computes; it
    gives every feed of a stage the same shape, which ONNX Runtime's histogram calibrators
    (entropy, percentile) need: they stack each tensor's values across feeds."""
    symbolic = {(name, i, d) for name in spec.input_names for i, d in enumerate(spec.tensor(name).shape)
                if isinstance(d, str)}
    if not symbolic or {(i, d) for _, i, d in symbolic} not in ({(0, "rows")}, {(0, "batch")}):
        return [feed]  # the fused samplers: rows paired across inputs (noise [S+1, rows, ...], 2*batch)
    sliced = sorted({name for name, _, _ in symbolic})
    rows = feed[sliced[0]].shape[0]
    return [{name: (a[r : r + 1] if name in sliced else a) for name, a in feed.items()} for r in range(rows)]


class StageDataReader(_Base):
    """get_next() -> the next feed dict of one stage (numpy, contract input names), None at the end.

    Feeds are built lazily (a backbone_step feed expands the compact cache) and split into rows
    (`split_rows`); `rewind()` starts over, as ONNX Runtime's calibrators expect of a
    CalibrationDataReader.
    """

    def __init__(self, cset, stage: str, per_row: bool = True):
        """`cset`: a CalibrationSet (anything with feeds(stage), samples and stage_specs())."""
        self.cset = cset
        self.stage = stage
        self.spec = cset.stage_specs()[stage] if per_row else None
        self.rewind()

    def _feeds(self):
        for feed in self.cset.feeds(self.stage):
            yield from (split_rows(self.spec, feed) if self.spec is not None else [feed])

    def get_next(self):
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = self._feeds()

    def __len__(self) -> int:
        """Recorded samples (calls) of the stage, before the split into rows."""
        return len(self.cset.samples.get(self.stage, []))

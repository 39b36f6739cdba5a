"""Calibration feeds in the form onnxruntime.quantization's calibrators read them.

The backbone is one graph for two phases, so its feeds come in two shapes (x [1, prefix_len, dim]
at the prefill, [1, P, dim] at a step). ONNX Runtime's MinMax calibrator reduces every tensor to a
scalar per feed and merges any shapes, but its histogram calibrators (entropy, percentile) stack
each tensor's values over all feeds of one `collect_data` call with np.asarray, which fails on two
shapes ("inhomogeneous shape"). They do merge histograms across calls, though (HistogramCollector
keeps them), so `StageDataReader.groups()` gives one reader per phase and the caller runs
`collect_data` once per group (precision/int8.activation_ranges): every phase's activations count.
"""

from __future__ import annotations

try:  # onnxruntime is optional: the reader still works as a plain iterator without it
    from onnxruntime.quantization import CalibrationDataReader as _Base
except ImportError:  # pragma: no cover - exercised only without onnxruntime
    _Base = object

_ROWS = ("rows", "batch")


def split_rows(spec, feed: dict) -> list[dict]:
    """One feed per row when every input's first contract dim is the row dim (rows / batch).

    Rows are independent in every stage graph, so this changes no value the graph computes; it
    gives every feed of a stage (and phase) the same shape, which the histogram calibrators need.
    Other symbolic dims (the backbone's seq) stay; the fused samplers pair rows across inputs
    (noise [S+1, rows, ...], cond_row indices) and are not split."""
    tensors = [spec.tensor(name) for name in spec.input_names]
    first = {t.shape[0] if t.shape else None for t in tensors}
    elsewhere = any(d in _ROWS for t in tensors for d in t.shape[1:])
    if len(first) != 1 or first.pop() not in _ROWS or elsewhere:
        return [feed]
    rows = feed[spec.input_names[0]].shape[0]
    return [{name: a[r : r + 1] for name, a in feed.items()} for r in range(rows)]


class StageDataReader(_Base):
    """get_next() -> the next feed dict of one stage (numpy, contract input names), None at the end.

    Feeds are built lazily (a backbone feed expands the compact cache) and split into rows
    (`split_rows`); `rewind()` starts over, as ONNX Runtime's calibrators expect of a
    CalibrationDataReader. `phase`: only that phase's samples (the backbone); None: all of them,
    prefill samples first.
    """

    def __init__(self, cset, stage: str, per_row: bool = True, phase: str | None = None):
        """`cset`: a CalibrationSet (anything with feeds(stage, phase), phase_samples and stage_specs())."""
        self.cset = cset
        self.stage = stage
        self.phase = phase
        self.per_row = per_row
        self.spec = cset.stage_specs()[stage]
        if phase is not None and phase not in self.spec.phases:
            raise ValueError(f"stage {stage} has no phase {phase!r} (phases: {list(self.spec.phases) or 'none'})")
        self.rewind()

    def _feeds(self):
        for feed in self.cset.feeds(self.stage, self.phase):
            yield from (split_rows(self.spec, feed) if self.per_row else [feed])

    def get_next(self):
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = self._feeds()

    def groups(self) -> list["StageDataReader"]:
        """One reader per phase that has samples (its per-row feeds share one shape), for one
        `collect_data` call each (see the module doc); [self] for a stage without phases."""
        if self.phase is not None or not self.spec.phases:
            return [self]
        return [
            StageDataReader(self.cset, self.stage, self.per_row, phase)
            for phase in self.spec.phases
            if self.cset.phase_samples(self.stage, phase)
        ]

    def __len__(self) -> int:
        """Recorded samples (calls) of the stage (and phase), before the split into rows."""
        return len(self.cset.phase_samples(self.stage, self.phase))

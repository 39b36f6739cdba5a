"""Per-stage wall-clock accounting for any backend (benchmarks, `--profile`-style reports).

Two views of one generation: the loop's calls (STAGE_CALLS; "prefill" runs prefix_embed and the
backbone's prefill phase, "step" token_embed and its step phase), and the stage graphs the backend
runs inside them (STAGE_GRAPHS, the backbone per phase: one graph, two very different costs).
"""

from __future__ import annotations

import time
from collections import defaultdict

from .. import stages as st

STAGE_CALLS = ("prefill", "step", "sample_tokens", "decode")  # the names reports use
# the calls that count under each name: the scheduler's row-level ones and the batch-level ones
TIMED = {
    "prefill_rows": "prefill",
    "step_rows": "step",
    "sample_rows": "sample_tokens",
    "decode": "decode",
    **{name: name for name in STAGE_CALLS},
}
BACKBONE_PHASES = ("prefill", "step")  # stages.backbone_phases
STAGE_GRAPHS = tuple(
    name
    for stage in st.ALL_STAGES
    for name in ([f"{stage}.{p}" for p in BACKBONE_PHASES] if stage == st.BACKBONE else [stage])
)


def graph_name(stage: str, phase: str | None = None) -> str:
    """The report name of one graph call: the stage, and the phase of a stage that has phases."""
    return stage if phase is None else f"{stage}.{phase}"


class TimedBackend:
    """Wraps a backend; forwards every call and adds its duration to `seconds[call]`, and each stage
    graph it runs to `graph_seconds[graph_name]` (through the backend's stage observers,
    runtime/core.StageBackend.add_observer).

    Backends return host tensors or synchronise before returning (TensorRT copies every output but
    the cache's to the host), so wall-clock time per call is the stage's cost as the loop sees it.
    One TimedBackend times a backend's graphs at a time (a backend has one loop): a newer one of the
    same backend takes the graph timing over, and `detach` ends it.
    """

    def __init__(self, backend):
        self.inner = backend
        self.name = backend.name
        self.config = backend.config
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.graph_seconds: dict[str, float] = defaultdict(float)
        self.graph_calls: dict[str, int] = defaultdict(int)
        self._observing = hasattr(backend, "add_observer")  # a stage backend (else: its calls only)
        if self._observing:
            for older in backend.observers:
                if isinstance(getattr(older, "__self__", None), TimedBackend):
                    older.__self__.detach()
            backend.add_observer(self._graph_ran)

    def _graph_ran(self, call) -> None:
        self.graph_seconds[call.graph] += call.seconds
        self.graph_calls[call.graph] += 1

    def __getattr__(self, attr):
        fn = getattr(self.inner, attr)
        if attr not in TIMED:
            return fn
        name = TIMED[attr]

        def timed(*args, **kwargs):  # a batch-level call runs the inner's row calls, not these wrappers
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds[name] += time.perf_counter() - start
            self.calls[name] += 1
            return out

        return timed

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        self.graph_seconds.clear()
        self.graph_calls.clear()

    def detach(self) -> None:
        """Stop timing the inner backend's graphs (its calls through this wrapper are still timed)."""
        if self._observing:
            self._observing = False
            self.inner.remove_observer(self._graph_ran)


def process_seconds() -> float | None:
    """Seconds since this process started (Linux: /proc), or None where that cannot be read."""
    import os

    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None

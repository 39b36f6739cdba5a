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
TIMED = {"prefill_rows": "prefill", "step_rows": "step", "sample_rows": "sample_tokens", "decode": "decode",
         **{name: name for name in STAGE_CALLS}}
BACKBONE_PHASES = ("prefill", "step")  # stages.backbone_phases
STAGE_GRAPHS = tuple(name for stage in st.ALL_STAGES
                     for name in ([f"{stage}.{p}" for p in BACKBONE_PHASES] if stage == st.BACKBONE else [stage]))


def graph_name(stage: str, phase: str | None = None) -> str:
    """The report name of one graph call: the stage, and the phase of a stage that has phases."""
    return stage if phase is None else f"{stage}.{phase}"


class TimedBackend:
    """Wraps a backend; forwards every call and adds its duration to `seconds[call]`, and each stage
    graph it runs (its `_run`) to `graph_seconds[graph_name]`.

    Backends return host tensors or synchronise before returning (TensorRT copies every output but
    the cache's to the host), so wall-clock time per call is the stage's cost as the loop sees it.
    The graph timing wraps the inner backend's `_run` in place (a backend has one loop); a newer
    TimedBackend of the same backend takes it over, and `detach` gives it back.
    """

    def __init__(self, backend):
        self.inner = backend
        self.name = backend.name
        self.config = backend.config
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.graph_seconds: dict[str, float] = defaultdict(float)
        self.graph_calls: dict[str, int] = defaultdict(int)
        self._wrapper = None
        if callable(getattr(backend, "_run", None)):
            own = backend.__dict__.get("_run")  # None: the class's method
            self._own = getattr(own, "__wrapped__", own)  # not a wrapper of an earlier TimedBackend
            run = self._own if self._own is not None else type(backend)._run.__get__(backend)

            def timed_run(stage, feeds, phase=None):
                start = time.perf_counter()
                out = run(stage, feeds, phase=phase)
                name = graph_name(stage, phase)
                self.graph_seconds[name] += time.perf_counter() - start
                self.graph_calls[name] += 1
                return out

            timed_run.__wrapped__ = self._own
            self._wrapper = backend._run = timed_run

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
        """Stop timing the inner backend's graphs: its own `_run` again."""
        if self._wrapper is not None and self.inner.__dict__.get("_run") is self._wrapper:
            if self._own is None:
                del self.inner._run
            else:
                self.inner._run = self._own
        self._wrapper = None


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

"""Per-stage wall-clock accounting for any backend (benchmarks, `--profile`-style reports)."""

from __future__ import annotations

import time
from collections import defaultdict

STAGE_CALLS = ("prefill", "step", "sample_tokens", "decode")  # the names reports use
# the calls that count under each name: the scheduler's row-level ones and the batch-level ones
TIMED = {"prefill_rows": "prefill", "step_rows": "step", "sample_rows": "sample_tokens", "decode": "decode",
         **{name: name for name in STAGE_CALLS}}


class TimedBackend:
    """Wraps a backend; forwards every call and adds its duration to `seconds[call]`.

    Backends return host tensors or synchronise before returning, so wall-clock time per call is
    the stage's cost as the loop sees it.
    """

    def __init__(self, backend):
        self.inner = backend
        self.name = backend.name
        self.config = backend.config
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

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

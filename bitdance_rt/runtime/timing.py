"""Per-stage wall-clock accounting for any backend (benchmarks, `--profile`-style reports)."""

from __future__ import annotations

import time
from collections import defaultdict

STAGE_CALLS = ("prefill", "step", "sample_tokens", "decode")


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
        if attr not in STAGE_CALLS:
            return fn

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds[attr] += time.perf_counter() - start
            self.calls[attr] += 1
            return out

        return timed

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

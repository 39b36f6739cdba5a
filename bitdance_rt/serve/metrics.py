"""Prometheus metrics of one server (prometheus-client, its own registry so that several apps in
one process, as in the tests, never share counters). Every name starts with bitdance_."""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ERROR_KINDS = (
    "bad_request",
    "unauthorized",
    "not_found",
    "queue_full",
    "loading",
    "draining",
    "timeout",
    "disconnected",
    "internal",
    "too_large",
    "body_timeout",
)
RATE_WINDOW_S = 60.0

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    def __init__(self, pipeline_ref):
        """`pipeline_ref`: a callable giving the Pipeline, or None while it loads."""
        self.registry = CollectorRegistry()
        r = self.registry
        self._pipe = pipeline_ref
        Gauge("bitdance_queue_length", "requests waiting for cache rows", registry=r).set_function(
            lambda: self._read("queued")
        )
        Gauge("bitdance_rows_in_flight", "KV-cache rows of running requests", registry=r).set_function(
            lambda: self._read("rows_in_flight")
        )
        Gauge(
            "bitdance_images_per_second", f"images answered per second over the last {RATE_WINDOW_S:.0f} s", registry=r
        ).set_function(self.images_per_second)
        self.ready = Gauge("bitdance_ready", "1 once the model is loaded and requests are admitted", registry=r)
        self.images = Counter("bitdance_images", "images answered", registry=r)
        self.requests = Counter(
            "bitdance_requests", "generation requests answered, by outcome", ["outcome"], registry=r
        )
        self.errors = Counter("bitdance_errors", "refused or failed requests, by kind", ["kind"], registry=r)
        for kind in ERROR_KINDS:
            self.errors.labels(kind)
        self.request_seconds = Histogram(
            "bitdance_request_seconds",
            "time from request to its last image",
            ["stream"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.first_image_seconds = Histogram(
            "bitdance_first_image_seconds",
            "time from request to its first (partial or final) image",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "bitdance_ar_step_seconds",
            "one scheduler iteration: admissions, one backbone and one head call",
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        self.step_rows = Histogram(
            "bitdance_ar_step_rows",
            "active rows per scheduler iteration",
            buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64),
            registry=r,
        )
        self._answered: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def _read(self, name: str) -> float:
        pipe = self._pipe()
        return float(getattr(pipe, name)) if pipe is not None else 0.0

    def observe_step(self, seconds: float, rows: int) -> None:
        """Scheduler observer (runtime/scheduler.py): one AR-step iteration."""
        self.step_seconds.observe(seconds)
        self.step_rows.observe(rows)

    def answered(self, images: int, seconds: float, stream: bool) -> None:
        self.images.inc(images)
        self.requests.labels("ok").inc()
        self.request_seconds.labels("true" if stream else "false").observe(seconds)
        now = time.monotonic()
        with self._lock:
            self._answered.append((now, images))
            self._trim(now)

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()
        self.requests.labels(kind).inc()

    def images_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._answered) / RATE_WINDOW_S

    def _trim(self, now: float) -> None:
        while self._answered and self._answered[0][0] < now - RATE_WINDOW_S:
            self._answered.popleft()

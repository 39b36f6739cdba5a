"""What the server knows between requests: its settings (admission, time and access limits), the
Pipeline once loaded, readiness and draining, and the admission check that answers 503 or 429."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastapi.responses import JSONResponse

from .errors import ApiError, error_body
from .metrics import Metrics


@dataclass
class ServerSettings:
    """What `bitdance-rt serve` takes besides the model: admission, time and access limits."""

    max_queue: int = 64  # requests waiting for cache rows before new ones get 429
    request_timeout: float = 600.0  # seconds from arrival to the last image; then 504 and the rows are freed
    max_images: int = 16  # images per request (n x labels)
    api_key: str | None = None  # bearer token for every route but /health
    shutdown_timeout: float = 30.0  # seconds SIGTERM waits for requests in flight before cancelling them
    body_timeout: float = 10.0  # seconds a client may take to send a request's headers, and then its body
    max_body_bytes: int = 1 << 20  # larger bodies get 413 (a request body is a few hundred bytes)


class ServerState:
    """The Pipeline (None while it loads), readiness, draining, and the recent request time that
    Retry-After is estimated from."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.pipeline = None
        self.load_error: BaseException | None = None
        self.draining = False
        self.metrics = Metrics(lambda: self.pipeline)
        self._seconds = 1.0  # moving mean of request seconds

    def ready(self, pipe) -> None:
        self.pipeline = pipe
        pipe.scheduler.observers.append(self.metrics.observe_step)
        self.metrics.ready.set(1)

    def admit(self):
        """The Pipeline, if a new request may join the queue now; else the 503 / 429 to answer."""
        if self.draining:
            raise ApiError(503, "the server is shutting down", "draining", headers={"Retry-After": "5"})
        pipe = self.pipeline
        if pipe is None:
            what = f"the model failed to load: {self.load_error}" if self.load_error else "the model is loading"
            raise ApiError(503, what, "loading", headers={"Retry-After": "5"})
        # Only requests that the free cache rows cannot take count: a burst that merely waits for the next
        # AR step boundary is no backlog (with --max-queue 0, any backlog refuses).
        backlog = pipe.backlog
        if backlog > 0 and backlog >= self.settings.max_queue:
            wait = max(1, min(60, math.ceil(self._seconds)))
            raise ApiError(
                429,
                f"{backlog} requests are waiting for cache rows (the limit is "
                f"{self.settings.max_queue}); retry after {wait} s",
                "queue_full",
                headers={"Retry-After": str(wait)},
            )
        return pipe

    def took(self, seconds: float) -> None:
        self._seconds = 0.8 * self._seconds + 0.2 * seconds

    def refuse(self, exc: ApiError) -> JSONResponse:
        """The error's answer, counted."""
        self.metrics.error(exc.kind)
        return JSONResponse(error_body(str(exc), exc.status, exc.param, exc.code), exc.status, headers=exc.headers)

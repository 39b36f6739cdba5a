"""What belongs to one request, apart from the model: its condition, rows, cache slots, AR step,
guidance per step and its own noise source (so its tokens never depend on who shares a batch).

A request of B images holds 2B rows with guidance (cfg_scale > 1: conditional rows, then their
unconditional twins) or B rows without. Per AR step it draws its noise from its own source in the
official order (runtime/loop.py), so one request run alone is exactly the official sampler.
Requests larger than the backend's batch run as consecutive parts that share the one noise
source, as the official code would draw them batch after batch.

What a caller asked for is a `GenerationParams` (runtime/params.py), checked once at the front door;
a Request is the scheduler's working copy of it (`params`: that very object) and is never re-checked.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..sampling import NoiseSource, batch_layout, cfg_at_step
from .params import MAX_PARTIAL_IMAGES, MAX_STEPS, GenerationParams  # noqa: F401  (the caps live in params.py)


def preview_steps(ar_steps: int, partial_images: int) -> list[int]:
    """The AR steps after which a streamed request's partial images are decoded: `partial_images`
    of them, evenly spaced before the last step (fewer when the model has fewer steps)."""
    picks = {round(ar_steps * i / (partial_images + 1)) for i in range(1, partial_images + 1)}
    return sorted(s for s in picks if 1 <= s < ar_steps)


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # [B, N, C] +/-1, generation order
    latent: torch.Tensor  # [B, C, h, w]
    image: torch.Tensor  # [B, 3, H, W] float32, about [-1, 1]
    seconds: float
    first_step_seconds: float | None = None  # from submission to the end of its first AR step

    @property
    def images_per_second(self) -> float:
        return self.tokens.shape[0] / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class Event:
    """Progress of a request: kind "step" after each AR step (`step` of `total` done; `image` the
    partial latent decoded when a preview was asked for at this step), "done" with the result, "error"."""

    kind: str
    step: int = 0
    total: int = 0
    image: torch.Tensor | None = None
    result: GenerationResult | None = None
    error: BaseException | None = None


@dataclass
class Request:
    """One request in the scheduler: values from a checked GenerationParams (trusted here), then state."""

    parts: list  # conditions (runtime/conditions.py) of at most max_batch images each, run in order
    steps: int
    cfg_scale: float
    cfg_schedule: str
    noise: NoiseSource
    ar_steps: int
    preview_steps: frozenset = frozenset()  # AR steps whose "step" event carries the partial latent decoded
    on_event: Callable[[Event], None] | None = None
    params: GenerationParams | None = None  # what the front door checked (None: made by make_request directly)
    future: Future = field(default_factory=Future)
    # ---- state (the scheduler's) ----
    part: int = 0
    step: int = 0
    slots: list = field(default_factory=list)
    last: torch.Tensor | None = None  # tokens of all rows at the previous AR step
    cond: torch.Tensor | None = None  # head conditions of the current AR step (after prefill)
    tokens: list = field(default_factory=list)  # per AR step, conditional rows
    done_parts: list = field(default_factory=list)
    submitted: float = field(default_factory=time.perf_counter)
    first_step: float | None = None
    cancelled: bool = False

    @property
    def condition(self):
        return self.parts[self.part]

    @property
    def images(self) -> int:
        return len(self.condition)

    @property
    def guided_rows(self) -> bool:
        """Whether this request carries unconditional twin rows (guidance at some AR step)."""
        return self.cfg_scale > 1.0

    @property
    def rows(self) -> int:
        return self.images * (2 if self.guided_rows else 1)

    def guidance(self) -> tuple[float, bool]:
        """(CFG value, guided) of the current AR step; a step whose value is 1 runs unguided."""
        g = cfg_at_step(self.cfg_scale, self.cfg_schedule, self.step, self.ar_steps)
        return g, g > 1.0

    def draw_noise(self, p: int, c: int) -> torch.Tensor:
        """This step's noise for every row [S+1, rows, P, C], drawn in the official order: guided,
        one draw per image, shared by its two rows; unguided, one per row."""
        g, guided = self.guidance()
        draw = self.images if guided else self.rows
        noise = torch.stack([self.noise.draw((draw, p, c)) for _ in range(self.steps + 1)])
        return batch_layout(self.rows, noise, g, guided)[0]

    def emit(self, event: Event) -> None:
        """Tell the caller; a caller's callback that raises fails its own request, never the batch."""
        if self.on_event is None:
            return
        try:
            self.on_event(event)
        except Exception as exc:
            self.on_event, self.cancelled = None, True  # the scheduler frees its rows at the next step
            if not self.future.done():
                self.future.set_exception(exc)

"""One generation (a batch of images) through the continuous-batching scheduler, driven in the
calling thread: the batch-at-a-time entry points that export checks, calibration, eval and the
benchmarks use. The scheduler (runtime/scheduler.py) is the one loop; this module only builds
the request.

The condition is class labels (ImageNet) or prompt token ids (text-to-image), see
runtime/conditions.py. With guidance (cfg_scale > 1) every image has a conditional and an
unconditional row; per AR step i the CFG value follows the schedule, and a step whose value is 1
(step 0 of the linear schedule) is sampled unguided, so every row, unconditional ones included,
gets its own noise and tokens, exactly as the official sampler does. Noise is drawn from `noise`
in the official order; outputs keep only the conditional rows.
"""

from __future__ import annotations

from tqdm.auto import tqdm

from ..errors import BitDanceError
from ..sampling import NoiseSource, schedule_for
from .conditions import as_condition
from .params import check_cfg, check_cfg_schedule, check_labels, check_steps
from .request import GenerationResult, Request
from .scheduler import Scheduler

__all__ = ["GenerationResult", "check_request", "generate", "generate_batched", "make_request"]


def check_request(num_classes: int, labels, steps: int) -> None:
    """Labels and sampler steps of a request, before any weights are loaded (runtime/params.py)."""
    check_labels(labels, num_classes)
    check_steps(steps)


def make_request(
    cfg,
    condition,
    steps: int,
    cfg_scale: float,
    cfg_schedule: str | None,
    noise: NoiseSource,
    batch_size: int | None,
    **options,
) -> Request:
    """A validated request: `condition` labels or a condition, split into parts of `batch_size`."""
    if not hasattr(condition, "rows") and hasattr(cfg, "num_classes"):
        check_labels(condition, cfg.num_classes)
    condition = as_condition(condition, cfg)
    if len(condition) == 0:
        raise BitDanceError("nothing to generate: give at least one label or prompt")
    steps, cfg_scale = check_steps(steps), check_cfg(cfg_scale)
    schedule = schedule_for(check_cfg_schedule(cfg_schedule), cfg)
    size = batch_size or len(condition)
    if size < 1:
        raise BitDanceError(f"batch size must be >= 1, got {size}")
    parts = [condition[i : i + size] for i in range(0, len(condition), size)]
    return Request(parts, steps, cfg_scale, schedule, noise, cfg.ar_steps, **options)


def _rows_for(backend, request: Request) -> int:
    """Cache slots of a run alone: the backend's, or (torch, unbounded) what the largest part needs."""
    need = max(len(p) for p in request.parts) * (2 if request.guided_rows else 1)
    return backend.max_rows or max(need, 4)


def _run_alone(backend, request: Request, progress: bool) -> GenerationResult:
    scheduler = Scheduler(backend, max_rows=_rows_for(backend, request))
    bar = tqdm(
        total=request.ar_steps * len(request.parts), desc=f"{backend.name} AR steps", disable=not progress, leave=False
    )
    request.on_event = lambda e: bar.update(1) if e.kind in ("step", "done") else None
    scheduler.submit(request)
    try:
        scheduler.run_until_idle()
    finally:
        bar.close()
    return request.future.result()


def generate_batched(
    backend,
    labels,
    steps: int,
    cfg_scale: float,
    cfg_schedule: str | None,
    noise: NoiseSource,
    progress: bool = False,
    batch_size: int | None = None,
) -> GenerationResult:
    """Generate in parts of at most `batch_size` images (default: the backend's `max_batch`, if it
    has one), drawing noise from the one source in order; results are concatenated.
    `labels`: class labels, or a condition (runtime/conditions.py) such as encoded prompts."""
    size = batch_size if batch_size is not None else backend.max_batch
    if size is not None and size < 1:
        raise BitDanceError(f"batch size must be >= 1, got {size}")
    request = make_request(backend.config, labels, steps, cfg_scale, cfg_schedule, noise, size)
    return _run_alone(backend, request, progress)


def generate(
    backend,
    labels,
    steps: int,
    cfg_scale: float,
    cfg_schedule: str | None,
    noise: NoiseSource,
    progress: bool = False,
    finish: bool = True,
) -> GenerationResult:
    """One batch, alone. `cfg_schedule` None: the model family's (sampling.schedule_for).
    `finish=False` leaves the check that a replayed noise file was used up to the caller."""
    request = make_request(backend.config, labels, steps, cfg_scale, cfg_schedule, noise, None)
    if not finish:
        request.noise = _Unchecked(noise)
    return _run_alone(backend, request, progress)


class _Unchecked(NoiseSource):
    """A noise source whose end-of-generation check is left to the caller."""

    def __init__(self, inner: NoiseSource):
        self.inner = inner

    def draw(self, shape):
        return self.inner.draw(shape)

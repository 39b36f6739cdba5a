"""One generation (a batch of images) through the continuous-batching scheduler, driven in the
calling thread: the batch-at-a-time entry points that export checks, calibration, eval and the
benchmarks use. The scheduler (runtime/scheduler.py) is the one loop; this module only builds
the request: `generate` / `generate_batched` are a front door (their values become checked
GenerationParams, runtime/params.py), `make_request` / `request_for` behind every door trust them.

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
from ..sampling import NoiseSource, SeededNoise, schedule_for
from .conditions import as_condition
from .params import GenerationParams, ModelLimits, check_labels, check_steps
from .request import GenerationResult, Request
from .scheduler import Scheduler

__all__ = ["GenerationResult", "check_request", "generate", "generate_batched", "make_request", "request_for"]


def check_request(num_classes: int, labels, steps: int) -> None:
    """Labels and sampler steps of a calibration run, before any weights are loaded (the calibrate
    command and calibration/capture.py; their values reach generate_batched, which checks them
    again as GenerationParams: this early check only saves loading the weights of a refused run)."""
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
    """A Request of values already checked (GenerationParams.create, at a front door), trusted here:
    `condition` labels or a condition, split into parts of `batch_size`; `cfg_schedule` None: the
    model family's. Nothing is re-checked (the scheduler refuses only what it could never admit)."""
    condition = as_condition(condition, cfg)
    size = batch_size or len(condition)
    parts = [condition[i : i + size] for i in range(0, len(condition), size)]
    schedule = schedule_for(cfg_schedule, cfg)
    return Request(parts, steps, cfg_scale, schedule, noise, cfg.ar_steps, **options)


def request_for(
    params: GenerationParams, cfg, condition, default_steps: int, batch_size: int | None, **options
) -> Request:
    """The Request of checked `params` (`condition`: what its labels or prompts became), the model's
    defaults filled in where it has None; `params` rides along (Request.params), unchanged."""
    steps = default_steps if params.steps is None else params.steps
    scale = float(cfg.default_cfg) if params.cfg is None else params.cfg
    noise = SeededNoise(params.seed) if params.noise is None else params.noise
    return make_request(cfg, condition, steps, scale, params.cfg_schedule, noise, batch_size, params=params, **options)


def _batch_request(cfg, labels, steps, cfg_scale, cfg_schedule, noise, batch_size) -> Request:
    """The batch entry points' front door: their values as checked GenerationParams, then the Request."""
    given = {"condition": labels} if hasattr(labels, "rows") else {"labels": labels}
    params = GenerationParams.create(
        ModelLimits.of(cfg), steps=steps, cfg=cfg_scale, cfg_schedule=cfg_schedule, noise=noise, **given
    )
    condition = params.condition if params.condition is not None else params.per_image
    return request_for(params, cfg, condition, cfg.default_steps, batch_size)


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
    request = _batch_request(backend.config, labels, steps, cfg_scale, cfg_schedule, noise, size)
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
    request = _batch_request(backend.config, labels, steps, cfg_scale, cfg_schedule, noise, None)
    if not finish:
        request.noise = _Unchecked(noise)
    return _run_alone(backend, request, progress)


class _Unchecked(NoiseSource):
    """A noise source whose end-of-generation check is left to the caller."""

    def __init__(self, inner: NoiseSource):
        self.inner = inner

    def draw(self, shape):
        return self.inner.draw(shape)

"""The AR x diffusion generation loop, written once for every backend and model family.

The condition is class labels (ImageNet) or prompt token ids (text-to-image), see
runtime/conditions.py. Rows: with guidance (cfg_scale > 1) the batch is doubled, conditional rows
first, then the unconditional ones (null class / empty chat prompt). Per AR step i the CFG value follows the schedule; a step whose value is 1 (step 0 of the
linear schedule) is sampled unguided, so every row, unconditional ones included, gets its own
noise and tokens, exactly as the official sampler does. Noise is drawn from `noise` in the
official order; outputs keep only the conditional rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import BitDanceError
from ..models.layout import tokens_to_latent
from ..sampling import NoiseSource, cfg_at_step, schedule_for
from .backend import Backend
from .conditions import as_condition, row_count


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # [B, N, C] +/-1, generation order
    latent: torch.Tensor  # [B, C, h, w]
    image: torch.Tensor  # [B, 3, H, W] float32, about [-1, 1]
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.tokens.shape[0] / self.seconds if self.seconds > 0 else float("inf")


def check_request(num_classes: int, labels, steps: int) -> None:
    if len(labels) == 0:
        raise BitDanceError("no labels given: pass at least one class label")
    bad = [int(l) for l in labels if not 0 <= int(l) < num_classes]
    if bad:
        raise BitDanceError(f"label(s) {bad} out of range: this model has classes 0..{num_classes - 1}")
    if int(steps) < 1:
        raise BitDanceError(f"steps must be >= 1, got {steps}")


def generate_batched(backend: Backend, labels, steps: int, cfg_scale: float, cfg_schedule: str | None,
                     noise: NoiseSource, progress: bool = False, batch_size: int | None = None) -> GenerationResult:
    """`generate` over chunks of at most `batch_size` images (default: the backend's `max_batch`,
    if it has one), drawing noise from the one source in order; results are concatenated.
    `labels`: class labels, or a condition (runtime/conditions.py) such as encoded prompts."""
    labels = labels if hasattr(labels, "rows") else list(labels)
    size = batch_size if batch_size is not None else (getattr(backend, "max_batch", None) or len(labels) or 1)
    if size < 1:
        raise BitDanceError(f"batch size must be >= 1, got {size}")
    parts = [generate(backend, labels[i : i + size], steps, cfg_scale, cfg_schedule, noise, progress, finish=False)
             for i in range(0, max(len(labels), 1), size)]
    noise.finish()
    if len(parts) == 1:
        return parts[0]
    return GenerationResult(*(torch.cat([getattr(p, f) for p in parts]) for f in ("tokens", "latent", "image")),
                            seconds=sum(p.seconds for p in parts))


def generate(
    backend: Backend,
    labels,
    steps: int,
    cfg_scale: float,
    cfg_schedule: str | None,
    noise: NoiseSource,
    progress: bool = False,
    finish: bool = True,
) -> GenerationResult:
    """One batch. `finish=False` leaves the check that a replayed noise file was used up to the caller.
    `labels`: class labels, or a condition (runtime/conditions.py) such as encoded prompts.
    `cfg_schedule` None: the model family's (sampling.schedule_for)."""
    cfg = backend.config
    cfg_schedule = schedule_for(cfg_schedule, cfg)
    if not hasattr(labels, "rows") and hasattr(cfg, "num_classes"):
        check_request(cfg.num_classes, labels, steps)
    condition = as_condition(labels, cfg)
    if len(condition) == 0:
        raise BitDanceError("nothing to generate: give at least one label or prompt")
    if int(steps) < 1:
        raise BitDanceError(f"steps must be >= 1, got {steps}")
    cfg_at_step(cfg_scale, cfg_schedule, 0, cfg.ar_steps)  # validates the schedule name early
    started = time.perf_counter()
    batch = len(condition)
    rows = condition.rows(cfg_scale > 1.0)
    n_rows = row_count(rows)
    p, c = cfg.parallel_num, cfg.token_dim
    all_tokens = []
    tokens = None
    cond = backend.prefill(rows)
    for i in tqdm(range(cfg.ar_steps), desc=f"{backend.name} AR steps", disable=not progress, leave=False):
        if i > 0:
            cond = backend.step(tokens, i)
        g = cfg_at_step(cfg_scale, cfg_schedule, i, cfg.ar_steps)
        guided = g > 1.0
        draw_rows = n_rows // 2 if guided else n_rows
        step_noise = torch.stack([noise.draw((draw_rows, p, c)) for _ in range(steps + 1)])
        tokens = backend.sample_tokens(cond, step_noise, g, guided)
        all_tokens.append(tokens[:batch].cpu())
    if finish:
        noise.finish()
    out_tokens = torch.cat(all_tokens, dim=1)
    latent = tokens_to_latent(out_tokens, cfg)
    image = backend.decode(latent).float().cpu()
    return GenerationResult(out_tokens, latent, image, time.perf_counter() - started)

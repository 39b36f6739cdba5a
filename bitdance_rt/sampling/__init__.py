"""The diffusion-head sampler: time grid, CFG schedule, Euler-Maruyama, noise sources."""

from .euler_maruyama import (
    LAST_STEP_SIZE,
    batch_layout,
    guidance_rows,
    sample_head,
    sample_rows,
    sample_tokens,
    sample_tokens_rows,
    time_grid,
)
from .noise import NoiseSource, ReplayNoise, SeededNoise
from .schedule import CFG_SCHEDULES, cfg_at_step, schedule_for

__all__ = [
    "LAST_STEP_SIZE",
    "batch_layout",
    "guidance_rows",
    "sample_head",
    "sample_rows",
    "sample_tokens_rows",
    "sample_tokens",
    "time_grid",
    "NoiseSource",
    "ReplayNoise",
    "SeededNoise",
    "CFG_SCHEDULES",
    "cfg_at_step",
    "schedule_for",
]

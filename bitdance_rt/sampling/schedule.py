"""Classifier-free-guidance scale per AR step (official `head_sample`)."""

from __future__ import annotations

from ..errors import ConfigError

CFG_SCHEDULES = ("linear", "constant")


def schedule_for(schedule: str | None, model_cfg) -> str:
    """`schedule`, or when None the model family's default (`default_cfg_schedule` of its config:
    linear for ImageNet, constant for text-to-image, as the official samplers)."""
    return model_cfg.default_cfg_schedule if schedule is None else schedule


def cfg_at_step(cfg_scale: float, schedule: str, step: int, num_steps: int) -> float:
    """Guidance at AR step `step` of `num_steps`: 1+(G-1)*i/N (linear) or G (constant); 1 if G<=1.

    Under the linear schedule step 0 gets exactly 1.0, so it is sampled unguided (see the loop).
    """
    if schedule not in CFG_SCHEDULES:
        raise ConfigError(f"unknown cfg schedule {schedule!r}: use one of {', '.join(CFG_SCHEDULES)}")
    if cfg_scale <= 1.0:
        return 1.0
    if schedule == "constant":
        return cfg_scale
    return 1.0 + (cfg_scale - 1.0) * step / num_steps

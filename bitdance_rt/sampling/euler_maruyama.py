"""Euler-Maruyama sampling of the diffusion head with classifier-free guidance.

This is the one implementation of the sampler math. It mirrors the official
`sampling_parallel.euler_maruyama` operation for operation (float32, the same time grid, the
same accumulation of t), so with the same noise it gives the official tokens bit for bit. Noise
is an explicit argument: `noise[0]` is the initial x, `noise[k+1]` the draw of EM step k.

`net(x, t, cond)` is any x-prediction callable (the torch head, an ONNX Runtime session, a
TensorRT engine); the fused head-sampler graph is exported from this very function.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

LAST_STEP_SIZE = 0.05

HeadNet = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def time_grid(num_steps: int, time_shift: float = 1.0, last_step_size: float = LAST_STEP_SIZE) -> torch.Tensor:
    """t_k = (1/s) / ((1/s) + (1/u_k - 1)) on u = linspace(0, 1-last_step_size, S+1), float32.

    The shift is applied even when s == 1 (it then perturbs t by rounding only), as officially.
    """
    u = torch.linspace(0, 1 - last_step_size, num_steps + 1, dtype=torch.float32)
    return (1 / time_shift) / ((1 / time_shift) + (1 / u - 1))


def sample_head(
    net: HeadNet,
    cond: torch.Tensor,
    noise: Sequence[torch.Tensor] | torch.Tensor,
    cfg: float | torch.Tensor,
    guided: bool,
    time_shift: float = 1.0,
    last_step_size: float = LAST_STEP_SIZE,
) -> torch.Tensor:
    """Sample one AR step's tokens (continuous, before sign).

    cond [R, P, D] are the head conditions of all R rows. Unguided: x has R rows. Guided (CFG,
    `guided=True`): cond holds conditional rows then unconditional rows, x has R/2 rows, the net
    sees [x; x], and v = v_u + cfg (v_c - v_u). Returns x [R or R/2, P, C].
    """
    num_steps = len(noise) - 1
    if num_steps < 1:
        raise ValueError("the sampler needs noise for at least one step (S+1 tensors)")
    mult = 2 if guided else 1
    t_all = time_grid(num_steps, time_shift, last_step_size).to(cond.device)
    dt = t_all[1:] - t_all[:-1]
    x = noise[0]
    t = torch.zeros((), dtype=torch.float32, device=cond.device)
    t_rows = torch.zeros(cond.shape[0], dtype=torch.float32, device=cond.device)

    def velocity(x: torch.Tensor, t_rows: torch.Tensor) -> torch.Tensor:
        both = torch.cat([x] * mult, dim=0)
        out = net(both, t_rows, cond)
        v = (out - both) / (1 - t_rows.view(-1, 1, 1)).clamp_min(0.05)
        if guided:
            v_cond, v_uncond = v.chunk(2, dim=0)
            v = v_uncond + cfg * (v_cond - v_uncond)
        return v

    for k in range(num_steps):
        v = velocity(x, t_rows + t)
        dtk = dt[k]
        # score of the linear path x_t = t x + (1-t) e; var = (1-t)^2 + t(1-t)
        score = (t * v - x) / ((1 - t) ** 2 - (t * -1) * (1 - t))
        drift = v + (1 - t) * score
        x = x + drift * dtk + (2.0 * (1.0 - t) * dtk) ** 0.5 * noise[k + 1]
        t = t + dtk
    # Final deterministic Euler step from t = 1 - last_step_size (no draw).
    v = velocity(x, t_rows + (1 - last_step_size))
    return x + v * last_step_size


def sample_tokens(
    net: HeadNet,
    cond: torch.Tensor,
    noise: Sequence[torch.Tensor] | torch.Tensor,
    cfg: float | torch.Tensor,
    guided: bool,
    time_shift: float = 1.0,
    last_step_size: float = LAST_STEP_SIZE,
) -> torch.Tensor:
    """+/-1 tokens for all R rows: sign of the sampler output, repeated for both CFG halves."""
    x = sample_head(net, cond, noise, cfg, guided, time_shift, last_step_size)
    return torch.sign(torch.cat([x, x], dim=0) if guided else x)

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


def sample_rows(
    net: HeadNet,
    cond: torch.Tensor,
    noise: Sequence[torch.Tensor] | torch.Tensor,
    cfg: torch.Tensor,
    cond_row: torch.Tensor,
    uncond_row: torch.Tensor,
    time_shift: float = 1.0,
    last_step_size: float = LAST_STEP_SIZE,
) -> torch.Tensor:
    """Sample one AR step's tokens (continuous, before sign) for R rows that each carry their own
    guidance: the form the continuous-batching scheduler needs, where rows of several requests at
    different AR steps (guided or not, each with its own CFG value) share one call.

    cond [R, P, D], noise [S+1, R, P, C] (x has R rows), cfg [R] float32, cond_row / uncond_row [R]
    int64. Row r moves with v_r = v[u] + cfg_r (v[c] - v[u]), c = cond_row[r], u = uncond_row[r]:
    a guided pair (both rows with the pair's c, u, cfg and the same noise) evolves identically, as the
    official guided sampler's one x per image; an unguided row has c = u = r, which gives exactly
    v_r (v[u] + cfg * 0). Returns x [R, P, C].
    """
    num_steps = len(noise) - 1
    if num_steps < 1:
        raise ValueError("the sampler needs noise for at least one step (S+1 tensors)")
    t_all = time_grid(num_steps, time_shift, last_step_size).to(cond.device)
    dt = t_all[1:] - t_all[:-1]
    x = noise[0]
    t = torch.zeros((), dtype=torch.float32, device=cond.device)
    t_rows = torch.zeros(cond.shape[0], dtype=torch.float32, device=cond.device)
    scale = cfg.view(-1, 1, 1)

    def velocity(x: torch.Tensor, t_rows: torch.Tensor) -> torch.Tensor:
        out = net(x, t_rows, cond)
        v = (out - x) / (1 - t_rows.view(-1, 1, 1)).clamp_min(0.05)
        v_u = v.index_select(0, uncond_row)
        return v_u + scale * (v.index_select(0, cond_row) - v_u)

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


def guidance_rows(rows: int, cfg: float, guided: bool, device=None):
    """(cfg [R], cond_row [R], uncond_row [R]) of one batch in the official layout: guided, rows
    [0, R/2) conditional and [R/2, R) their unconditional twins; unguided, every row alone."""
    idx = torch.arange(rows, device=device)
    if not guided:
        return torch.ones(rows, device=device), idx, idx
    half = rows // 2
    pair = idx % half
    return torch.as_tensor(cfg, dtype=torch.float32, device=device).expand(rows), pair, pair + half


def batch_layout(rows: int, noise, cfg, guided: bool, device=None):
    """One batch in the official layout as `sample_rows` inputs: (noise with one draw per row, cfg,
    cond_row, uncond_row). Guided, each image's draw serves both of its rows (`noise` [S+1, R/2, ...]
    or a sequence of [R/2, ...]); unguided, every row has its own."""
    scale, c, u = guidance_rows(rows, cfg, guided, device)
    if guided:
        noise = torch.cat([noise, noise], dim=1) if torch.is_tensor(noise) else [torch.cat([n, n]) for n in noise]
    return noise, scale, c, u


def sample_head(
    net: HeadNet,
    cond: torch.Tensor,
    noise: Sequence[torch.Tensor] | torch.Tensor,
    cfg: float | torch.Tensor,
    guided: bool,
    time_shift: float = 1.0,
    last_step_size: float = LAST_STEP_SIZE,
) -> torch.Tensor:
    """Sample one AR step of one batch (continuous, before sign), through `sample_rows`.

    cond [R, P, D] are the head conditions of all R rows. Unguided: x has R rows. Guided (CFG,
    `guided=True`): cond holds conditional rows then unconditional rows, noise has R/2 rows (one
    per image), the net sees [x; x], and v = v_u + cfg (v_c - v_u). Returns x [R or R/2, P, C].
    """
    rows = cond.shape[0]
    x = sample_rows(net, cond, *batch_layout(rows, noise, cfg, guided, cond.device), time_shift, last_step_size)
    return x[: rows // 2] if guided else x


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


def sample_tokens_rows(
    net: HeadNet,
    cond: torch.Tensor,
    noise: Sequence[torch.Tensor] | torch.Tensor,
    cfg: torch.Tensor,
    cond_row: torch.Tensor,
    uncond_row: torch.Tensor,
    time_shift: float = 1.0,
    last_step_size: float = LAST_STEP_SIZE,
) -> torch.Tensor:
    """+/-1 tokens of `sample_rows` (the fused head_sampler stage is exported from this)."""
    return torch.sign(sample_rows(net, cond, noise, cfg, cond_row, uncond_row, time_shift, last_step_size))

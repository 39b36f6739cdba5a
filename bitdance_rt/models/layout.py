"""Sequence geometry of the ImageNet models: token order, 2D RoPE angles, block-causal mask.

These are pure functions of the config; the backbone registers their results as buffers and the
runtime uses `tokens_to_latent` to put generated tokens back on the latent grid.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


def token_grid_order(cfg: ModelConfig) -> torch.Tensor:
    """(r, c) grid coordinates of generated token n, shape [N, 2] (int64).

    'patch' mode: p x p patches in raster order, raster order inside each patch:
    n = ((R*(w/p) + Q)*p + i)*p + j  <->  (r, c) = (R*p + i, Q*p + j). 1x and 'standard': raster.
    """
    h, w = cfg.grid
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    coords = torch.stack([rows, cols], dim=1)  # raster order
    if cfg.is_parallel and cfg.parallel_mode == "patch":
        p = cfg.patch_side
        coords = coords.view(h // p, p, w // p, p, 2).permute(0, 2, 1, 3, 4).reshape(h * w, 2)
    return coords


def tokens_to_latent(tokens: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Tokens [B, N, C] in generation order -> latent grid [B, C, h, w]."""
    b, n, c = tokens.shape
    h, w = cfg.grid
    coords = token_grid_order(cfg).to(tokens.device)
    index = coords[:, 0] * w + coords[:, 1]  # raster index of token n
    latent = torch.empty(b, h * w, c, dtype=tokens.dtype, device=tokens.device)
    latent[:, index] = tokens
    return latent.view(b, h, w, c).permute(0, 3, 1, 2).contiguous()


def latent_to_tokens(latent: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Latent grid [B, C, h, w] -> tokens [B, N, C] in generation order."""
    b, c, h, w = latent.shape
    coords = token_grid_order(cfg).to(latent.device)
    return latent.permute(0, 2, 3, 1)[:, coords[:, 0], coords[:, 1]]


def rope_table(cfg: ModelConfig, base: float = 10000.0) -> torch.Tensor:
    """cos/sin table [max_seq_len, head_dim/2, 2] of the interleaved-pair 2D RoPE.

    Prefix positions get angle 0. Token n at grid (r, c): pair j < hd/4 rotates by (c+1.5)*f_j,
    the others by (r+1.5)*f_(j-hd/4), with f_k = base^(-4k/hd). Built with the same float32 ops as
    the official `precompute_freqs_cis_2d` so the table is bit-identical.
    """
    half = cfg.head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    coords = token_grid_order(cfg).float()
    # official: centres (k + 0.5) then +1.0; column (x) first, then row (y)
    pos = torch.stack([coords[:, 1], coords[:, 0]], dim=1) + 0.5 + 1.0
    pos = torch.cat([torch.zeros(cfg.prefix_len, 2), pos], dim=0)
    angles = torch.outer(pos.flatten(), freqs).view(pos.shape[0], -1)
    table = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    return table[: cfg.max_seq_len].contiguous()


def attention_mask_table(cfg: ModelConfig) -> torch.Tensor:
    """Additive mask [max_seq_len, max_seq_len] (0 = visible, -inf = hidden).

    Key j is visible from query i iff j <= i, or (next-patch models) both lie in the same block
    [cls-1+kP, cls-1+(k+1)P): the last class token with the queries, and each fed-back patch,
    attend bidirectionally. Rows [start, end) of this table are the mask of a chunk at
    [start, end); keys past `end` are always hidden by it.
    """
    n = cfg.max_seq_len
    i = torch.arange(n).unsqueeze(1)
    j = torch.arange(n).unsqueeze(0)
    visible = j <= i
    if cfg.is_parallel:
        first = cfg.cls_token_num - 1
        bi = torch.div(i - first, cfg.parallel_num, rounding_mode="floor")
        bj = torch.div(j - first, cfg.parallel_num, rounding_mode="floor")
        visible = visible | ((i >= first) & (j >= first) & (bi == bj))
    mask = torch.zeros(n, n)
    return mask.masked_fill(~visible, float("-inf"))


def gather_positions(table: torch.Tensor, first, count: int) -> torch.Tensor:
    """Rows [first, first+count) of `table` [L, ...]: [count, ...] for an int or 0-d `first`, or
    [R, count, ...] for one first position per row (`first` [R]). A Gather, not a Slice: a Slice
    starting at a graph input makes TensorRT treat the position as a shape tensor."""
    offsets = torch.arange(count, device=table.device)
    if torch.is_tensor(first) and first.dim() == 1:
        index = (first.view(-1, 1) + offsets).reshape(-1)
        return table.index_select(0, index).view(first.shape[0], count, *table.shape[1:])
    return table.index_select(0, first + offsets)


# ---- one chunk of the sequence (the backbone's prefill and steps alike) ----------------------------
def chunk_positions(start, count: int) -> torch.Tensor:
    """Positions of a chunk of `count` at `start`: [count] (int or 0-d start) or [R, count] (start [R])."""
    offsets = torch.arange(count, device=start.device if torch.is_tensor(start) else None)
    if torch.is_tensor(start) and start.dim() == 1:
        return start.view(-1, 1) + offsets
    return start + offsets


def key_limit(cfg, positions: torch.Tensor) -> torch.Tensor:
    """First key position hidden from a query at each position: keys [0, limit) are visible.

    Causal before the first block, then blocks of P from prefix_len - P (the last prefix token with
    the queries, then each fed-back patch) see all of themselves; the same rule as
    `attention_mask_table` (ImageNet) and the text-to-image prefix (t2i.py), written as arithmetic
    so that one graph computes the prefill's mask and the steps' (all visible) from positions."""
    p = cfg.parallel_num
    first = cfg.prefix_len - p
    block_end = first + p * (torch.div((positions - first).clamp(min=0), p, rounding_mode="floor") + 1)
    return torch.where(positions < first, positions + 1, block_end)


def chunk_visible(cfg, start, count: int) -> torch.Tensor:
    """[count, count] (or [R, count, count]) bool: query i of the chunk sees key j of the chunk."""
    pos = chunk_positions(start, count)
    return pos.unsqueeze(-2) < key_limit(cfg, pos).unsqueeze(-1)


def chunk_step(cfg, start, count: int):
    """The AR step whose head conditions a chunk at `start` of `count` positions yields: 0 for the
    prefix [0, prefix_len), i for the tokens fed at step_start(i)."""
    end = start + count - cfg.prefix_len
    if torch.is_tensor(end):
        return torch.div(end, cfg.parallel_num, rounding_mode="floor")
    return end // cfg.parallel_num

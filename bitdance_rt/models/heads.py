"""Diffusion-head networks: one x-prediction evaluation net(x_t, t, cond).

- `MlpHead`: the 1x models' MLP (official diff_head.MlpEncoder), adaLN (scale, shift, gate).
- `TransformerHead`: the 4x/16x models' per-patch transformer (official
  diff_head_parallel.TransEncoder): attention over the P tokens of one row, adaLN with six terms.
  The text-to-image head (official flow_head_parallel_x.TransEncoder) is the same net with
  ch//128 heads, a SwiGLU MLP and a 2*sigmoid-1 output: `TransformerHead(..., variant="t2i")`.

All heads take x [R, P, C], t [R], cond [R, P, ch_cond] (P=1 for the 1x models); state-dict
keys are the official ones under `net.`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(1000 t w_k), sin(1000 t w_k)] with w_k = exp(-ln(max_period) k / (dim/2))."""
    half = dim // 2
    t = 1000.0 * t.float()
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim))


class SwiGLU(nn.Module):
    """w2(silu(a) * b) with [a|b] = w1(x); hidden 1.5*channels, with biases."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = int(channels * 1.5)
        self.w1 = nn.Linear(channels, 2 * hidden)
        self.w2 = nn.Linear(hidden, channels)

    def forward(self, x):
        a, b = self.w1(x).chunk(2, dim=-1)
        return self.w2(F.silu(a) * b)


class FinalLayer(nn.Module):
    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(channels, eps=1e-6, elementwise_affine=False)
        self.ada_ln_modulation = nn.Linear(channels, 2 * channels)
        self.linear = nn.Linear(channels, out_channels)

    def forward(self, x, y):
        scale, shift = self.ada_ln_modulation(y).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1.0 + scale) + shift)


class MlpResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        hidden = int(channels * 1.5)
        self.w1 = nn.Linear(channels, 2 * hidden)
        self.w2 = nn.Linear(hidden, channels)

    def forward(self, x, scale, shift, gate):
        a, b = self.w1(self.norm(x) * (1 + scale) + shift).chunk(2, dim=-1)
        return x + self.w2(F.silu(a) * b) * gate


class HeadAttention(nn.Module):
    """Unmasked multi-head attention over the P tokens of one row (with biases)."""

    def __init__(self, dim: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.head_dim = dim // n_head
        self.scale = self.head_dim**-0.5
        self.wqkv = nn.Linear(dim, 3 * dim)
        self.wo = nn.Linear(dim, dim)

    def forward(self, x):
        b, p, dim = x.shape
        q, k, v = self.wqkv(x).view(b, p, 3, self.n_head, self.head_dim).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        probs = torch.softmax((q * self.scale) @ k.transpose(-1, -2), dim=-1)
        return self.wo((probs @ v).transpose(1, 2).reshape(b, p, dim))


class TransBlock(nn.Module):
    def __init__(self, channels: int, n_head: int, swiglu: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels, eps=1e-6)
        self.attn = HeadAttention(channels, n_head)
        self.norm2 = nn.LayerNorm(channels, eps=1e-6)
        self.swiglu = swiglu
        hidden = int(channels * 1.5)
        if swiglu:
            self.w1 = nn.Linear(channels, 2 * hidden)
            self.w2 = nn.Linear(hidden, channels)
        else:  # official t2i head with use_swiglu=False
            self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, channels))

    def forward(self, x, scale1, shift1, gate1, scale2, shift2, gate2):
        x = x + self.attn(self.norm1(x) * (1 + scale1) + shift1) * gate1
        h = self.norm2(x) * (1 + scale2) + shift2
        if self.swiglu:
            a, b = self.w1(h).chunk(2, dim=-1)
            h = self.w2(F.silu(a) * b)
        else:
            h = self.mlp(h)
        return x + h * gate2


class _AdaLNNet(nn.Module):
    """Shared skeleton: input_proj, time/cond embedding, blocks with shared adaLN, final layer."""

    n_mod: int  # adaLN terms per block

    def __init__(
        self, in_channels: int, channels: int, cond_channels: int, depth: int, n_ada: int, blocks: list[nn.Module]
    ):
        super().__init__()
        self.time_embed = TimestepEmbedder(channels)
        self.cond_embed = nn.Linear(cond_channels, channels)
        self.input_proj = nn.Linear(in_channels, channels)
        self.res_blocks = nn.ModuleList(blocks)
        self.ada_ln_blocks = nn.ModuleList(nn.Linear(channels, self.n_mod * channels) for _ in range(n_ada))
        self.ada_ln_switch_freq = max(1, depth // n_ada)
        self.final_layer = FinalLayer(channels, in_channels)

    def trunk(self, x, t, c):
        x = self.input_proj(x)
        y = F.silu(self.time_embed(t).unsqueeze(1) + self.cond_embed(c))
        for i, block in enumerate(self.res_blocks):
            if i % self.ada_ln_switch_freq == 0:
                mods = self.ada_ln_blocks[i // self.ada_ln_switch_freq](y).chunk(self.n_mod, dim=-1)
            x = block(x, *mods)
        return self.final_layer(x, y)


class MlpHead(_AdaLNNet):
    n_mod = 3

    def __init__(self, in_channels, channels, cond_channels, depth, n_ada):
        super().__init__(
            in_channels, channels, cond_channels, depth, n_ada, [MlpResBlock(channels) for _ in range(depth)]
        )

    def forward(self, x, t, c):
        return self.trunk(x, t, c)


class TransformerHead(_AdaLNNet):
    n_mod = 6

    def __init__(
        self, in_channels, channels, cond_channels, depth, n_ada, variant: str = "imagenet", swiglu: bool = True
    ):
        if variant not in ("imagenet", "t2i"):
            raise ValueError(f"unknown head variant {variant!r}")
        n_head = max(1, channels // (64 if variant == "imagenet" else 128))
        super().__init__(
            in_channels,
            channels,
            cond_channels,
            depth,
            n_ada,
            [TransBlock(channels, n_head, swiglu or variant == "imagenet") for _ in range(depth)],
        )
        self.variant = variant

    def forward(self, x, t, c):
        out = self.trunk(x, t, c)
        if self.variant == "t2i":
            out = 2 * torch.sigmoid(out) - 1
        return out


class DiffusionHead(nn.Module):
    """Wrapper whose only child is `net`, so keys read `head.net.*` as in the official model."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, t, c):
        return self.net(x, t, c)

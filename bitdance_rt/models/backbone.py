"""Blocks of the Llama-style AR backbone (ImageNet models), written against a static KV cache.

The cache is one preallocated tensor `kv [n_layer, 2, rows, n_head, max_seq_len, head_dim]`
(k then v). A chunk of T positions starting at `start` writes its keys/values at
[start, start+T) and attends over [0, kv_len) with rows [start, start+T) of the block-causal mask
table, which hides every key past the chunk. `kv_len` defaults to the whole cache (a fixed shape,
as exported graphs and CUDA graphs need); eager callers may pass start+T to skip unwritten keys.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, T, H, D] by the cos/sin table [T, D/2, 2]."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos = table[:, None, :, 0]
    sin = table[:, None, :, 1]
    out = torch.stack(
        [xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], dim=-1
    )
    return out.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.head_dim = dim // n_head
        self.scale = self.head_dim**-0.5
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x, rope, mask, kv, start, kv_len):
        """x [B,T,dim]; kv [2,B,H,L,D] is written in place at [start, start+T)."""
        b, t, dim = x.shape
        q, k, v = self.wqkv(x).view(b, t, 3, self.n_head, self.head_dim).unbind(2)
        q = apply_rope(q, rope).transpose(1, 2)
        k = apply_rope(k, rope).transpose(1, 2)
        v = v.transpose(1, 2)
        kv[0, :, :, start : start + t] = k
        kv[1, :, :, start : start + t] = v
        keys, values = kv[0, :, :, :kv_len], kv[1, :, :, :kv_len]
        scores = (q * self.scale) @ keys.transpose(-1, -2)
        probs = torch.softmax(scores + mask[:, :kv_len], dim=-1)
        out = (probs @ values).transpose(1, 2).reshape(b, t, dim)
        return self.wo(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        a, b = self.w1(x).chunk(2, dim=-1)
        return self.w2(F.silu(a) * b)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, n_head: int, hidden: int):
        super().__init__()
        self.attention = Attention(dim, n_head)
        self.feed_forward = FeedForward(dim, hidden)
        self.attention_norm = nn.RMSNorm(dim, eps=1e-6)
        self.ffn_norm = nn.RMSNorm(dim, eps=1e-6)

    def forward(self, x, rope, mask, kv, start, kv_len):
        h = x + self.attention(self.attention_norm(x), rope, mask, kv, start, kv_len)
        return h + self.feed_forward(self.ffn_norm(h))


class MLPConnector(nn.Module):
    """The input projection (SwiGLU, hidden 1.5*dim, with biases): +/-1 tokens -> backbone width."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        hidden = int(dim * 1.5)
        self.w1 = nn.Linear(in_dim, 2 * hidden, bias=True)
        self.w2 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x):
        a, b = self.w1(x).chunk(2, dim=-1)
        return self.w2(F.silu(a) * b)

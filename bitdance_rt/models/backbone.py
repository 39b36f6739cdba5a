"""Blocks of the Llama-style AR backbone (ImageNet models), reading a static KV cache.

The cache is one preallocated tensor `kv [n_layer, 2, rows, n_head, max_seq_len, head_dim]`
(k then v), which the blocks only READ: a chunk of T positions at [start, start+T) attends to
the cache positions [0, kv_len) (those at or past `start` are masked out, so kv_len may be the
whole static length) and to its own keys, and returns its new keys/values; the caller writes
them into the cache at [start, start+T). No graph ever updates a buffer in place or copies the
cache, which is what ONNX, TensorRT (no input/output aliasing) and CUDA graphs need.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, T, H, D] by the cos/sin table [T, D/2, 2] (shared by every
    row) or [B, T, D/2, 2] (per row: rows at different positions)."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos = table[..., None, :, 0]
    sin = table[..., None, :, 1]
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], dim=-1)
    return out.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.head_dim = dim // n_head
        self.scale = self.head_dim**-0.5
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x, rope, chunk_mask, kv, start, kv_len):
        """x [B,T,dim] at positions [start, start+T) -> (out [B,T,dim], k [B,H,T,D], v [B,H,T,D]).

        chunk_mask [T,T] (or None: all visible) masks the chunk's own keys; kv (keys, values), a
        [2,B,H,L,D] tensor or a pair of [B,H,L,D] (or None: nothing cached), is read at
        [0, kv_len), positions >= start hidden.
        """
        b, t, dim = x.shape
        q, k, v = self.wqkv(x).view(b, t, 3, self.n_head, self.head_dim).unbind(2)
        q = apply_rope(q, rope).transpose(1, 2) * self.scale
        k = apply_rope(k, rope).transpose(1, 2)
        v = v.transpose(1, 2)
        scores = q @ k.transpose(-1, -2)
        if chunk_mask is not None:
            scores = scores + chunk_mask
        if kv is None or kv_len == 0:
            out = torch.softmax(scores, dim=-1) @ v
        else:
            if isinstance(kv_len, int) and kv_len == kv[0].shape[-2]:
                old_k, old_v = kv[0], kv[1]  # the whole static cache: no slice (a copy in ONNX)
            else:
                old_k, old_v = kv[0][:, :, :kv_len], kv[1][:, :, :kv_len]
            old = q @ old_k.transpose(-1, -2)
            if not (isinstance(kv_len, int) and isinstance(start, int) and kv_len <= start):
                # start: an int, a 0-d tensor, or one position per row [B] (continuous batching)
                first = start.view(-1, 1, 1, 1) if torch.is_tensor(start) and start.dim() == 1 else start
                hidden = torch.arange(old.shape[-1], device=x.device) >= first
                old = old.masked_fill(hidden, float("-inf"))
            probs = torch.softmax(torch.cat([old, scores], dim=-1), dim=-1)
            n_old = old.shape[-1]
            out = probs[..., :n_old] @ old_v + probs[..., n_old:] @ v
        return self.wo(out.transpose(1, 2).reshape(b, t, dim)), k, v


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

    def forward(self, x, rope, chunk_mask, kv, start, kv_len):
        a, k, v = self.attention(self.attention_norm(x), rope, chunk_mask, kv, start, kv_len)
        h = x + a
        return h + self.feed_forward(self.ffn_norm(h)), k, v


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

"""The Qwen3 decoder (the BitDance text-to-image backbone), reading a static KV cache.

Written from the Qwen3 architecture: RMSNorm pre-norm blocks, grouped-query attention with a
per-head RMSNorm on q and k (before RoPE), rotate-half RoPE with theta from the config, SwiGLU
MLP (gate/up/down), final RMSNorm. Parameter names are the Hugging Face Qwen3 names under
`model.` (model.layers.N.self_attn.q_proj.weight, ..., q_norm, k_norm), so the official
safetensors shards load unchanged. The LM head is not needed to generate images and is not built.

The cache contract is the ImageNet backbone's (models/backbone.py): a chunk at [start, start+T)
reads keys/values [0, kv_len) of one static buffer [rows, n_kv_head, L, head_dim] per layer
and part, never writes it, and returns its own keys (after RoPE) and values. Masks are additive
and per row ([R, 1, T, *]), because left-padded prompts hide a different number of keys per row.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..t2i_config import Qwen3Config


def rope_table(cfg: Qwen3Config, length: int) -> torch.Tensor:
    """cos/sin [length, head_dim/2, 2] of positions 0..length-1, theta = cfg.rope_theta (float32)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def apply_rope_half(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: pairs (i, i + D/2) of x [B, H, T, D] turn by table [T, D/2, 2]."""
    cos, sin = table[..., 0], table[..., 1]
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.hidden_size, bias=False)
        self.q_norm = nn.RMSNorm(self.hd, eps=cfg.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.hd, eps=cfg.rms_norm_eps)

    def forward(self, x, rope, chunk_mask, kv, cache_mask):
        """x [R, T, dim] -> (out [R, T, dim], k, v [R, n_kv, T, hd]).

        chunk_mask [R, 1, T, T] (additive) masks the chunk's own keys; kv = (keys, values)
        [R, n_kv, L, hd] or None, with cache_mask [R, 1, 1, L] (additive) hiding unwritten or
        padding positions. Query heads are grouped per kv head (GQA) without repeating the cache.
        """
        r, t, _ = x.shape
        g = self.n_head // self.n_kv
        q = self.q_norm(self.q_proj(x).view(r, t, self.n_head, self.hd)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(r, t, self.n_kv, self.hd)).transpose(1, 2)
        v = self.v_proj(x).view(r, t, self.n_kv, self.hd).transpose(1, 2)
        q = apply_rope_half(q, rope) * self.hd**-0.5
        k = apply_rope_half(k, rope)
        qg = q.reshape(r, self.n_kv, g * t, self.hd)  # heads h = kv * g + j share kv head `kv`
        own = (qg @ k.transpose(-1, -2)).view(r, self.n_kv, g, t, t) + chunk_mask.unsqueeze(1)
        if kv is None:
            probs = torch.softmax(own, dim=-1)
            out = probs.reshape(r, self.n_kv, g * t, t) @ v
        else:
            old = (qg @ kv[0].transpose(-1, -2)).view(r, self.n_kv, g, t, -1) + cache_mask.unsqueeze(1)
            n_old = old.shape[-1]
            probs = torch.softmax(torch.cat([old, own], dim=-1), dim=-1).reshape(r, self.n_kv, g * t, -1)
            out = probs[..., :n_old] @ kv[1] + probs[..., n_old:] @ v
        out = out.view(r, self.n_head, t, self.hd).transpose(1, 2).reshape(r, t, self.n_head * self.hd)
        return self.o_proj(out), k, v


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3Layer(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = Qwen3Attention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = Qwen3MLP(cfg)

    def forward(self, x, rope, chunk_mask, kv, cache_mask):
        a, k, v = self.self_attn(self.input_layernorm(x), rope, chunk_mask, kv, cache_mask)
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h)), k, v


class Qwen3Model(nn.Module):
    """embed_tokens, layers, norm: HF `Qwen3ForCausalLM.model` (keys without the `model.` prefix)."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen3Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, x, rope, chunk_mask, cache=None, cache_mask=None):
        """Embeddings x [R, T, dim] -> (normed hidden [R, T, dim], kv_new [n_layer, 2, R, n_kv, T, hd])."""
        new = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, rope, chunk_mask, None if cache is None else cache[i], cache_mask)
            new.append(torch.stack([k, v]))
        return self.norm(x), torch.stack(new)

"""The BitDance text-to-image model (BitDance-14B-16x / -64x) as stage computations.

State-dict keys are the official files' keys under one prefix each: `model.*` (the Qwen3 LLM
shards), `head.net.*` (vision_head.safetensors), `projector.*` (projector.safetensors),
`vae.*` (ae.safetensors); see bitdance_rt/t2i/loading.py.

Sequence (one row; prompts are LEFT-padded to a fixed length so every row shares positions):
    [pad .. pad | chat prompt | <|vision_start|> <|res_h|> <|res_w|> | <|query_1|> .. <|query_P-1|>]
is the prefill: causal, except that its last P positions (<|res_w|> and the queries) attend to each
other, as the official pipeline's second prefill call with an all-ones mask does. Padding keys are
hidden from every query (`pad[r]` = padding length of row r). Because RoPE only sees position
differences, shifting a row by its padding leaves its attention what the official unpadded call
computes. Step i >= 1 feeds projector(tokens of step i-1) + the 2D sin-cos embedding of those
tokens' grid cells, as one bidirectional block over the whole cache. Head conditions of step i are
the block's last P hidden states + the 2D embedding of the cells step i generates.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..t2i_config import T2IConfig
from . import layout
from .kv_cache import write_cache
from .heads import DiffusionHead, TransformerHead
from .qwen3 import Qwen3Model, rope_table
from .tokenizer import BinaryAutoencoder


def sincos_1d(dim: int, length: int) -> torch.Tensor:
    """[length, dim]: sin(p w_k) then cos(p w_k), w_k = 10000^(-k/(dim/2)), k < dim/2 (float32)."""
    omega = torch.arange(dim // 2, dtype=torch.float32) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = torch.outer(torch.arange(length, dtype=torch.float32), omega)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def pos_embed_2d(cfg: T2IConfig) -> torch.Tensor:
    """[N, dim] in generation order: token n at grid (r, c) gets [e(c), e(r)] (column half first)."""
    table = sincos_1d(cfg.dim // 2, cfg.pos_embed_len)
    coords = layout.token_grid_order(cfg)
    return torch.cat([table[coords[:, 1]], table[coords[:, 0]]], dim=1).contiguous()


class Projector(nn.Module):
    """Official MLPconnector(z_channels, hidden, gelu_pytorch_tanh): +/-1 tokens -> LLM width."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class BitDanceT2I(nn.Module):
    step_context = ("pad",)  # per-generation inputs the backbone step needs besides tokens and cache

    def __init__(self, cfg: T2IConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        h = cfg.head
        self.model = Qwen3Model(cfg.llm)
        self.head = DiffusionHead(TransformerHead(h.ch_target, h.ch_latent, h.ch_cond, h.depth_latent,
                                                  h.depth_adanln, variant="t2i", swiglu=h.use_swiglu))
        self.projector = Projector(cfg.token_dim, cfg.dim)
        self.vae = BinaryAutoencoder(cfg.vae)
        self.reset_buffers()

    def reset_buffers(self, device=None) -> None:
        """(Re)compute the derived tables: RoPE, 2D position embedding, prefix visibility.
        The loader calls it after assigning weights into a model built on the meta device."""
        cfg = self.cfg
        n, p = cfg.prefix_len, cfg.parallel_num
        i, j = torch.arange(n).unsqueeze(1), torch.arange(n).unsqueeze(0)
        tables = {"rope": rope_table(cfg.llm, cfg.max_seq_len), "pos2d": pos_embed_2d(cfg),
                  "prefix_visible": (j <= i) | ((i >= n - p) & (j >= n - p))}
        for name, value in tables.items():
            self.register_buffer(name, value.to(device) if device is not None else value, persistent=False)

    # ---- cache --------------------------------------------------------------------------
    def new_cache(self, rows: int) -> torch.Tensor:
        c = self.cfg
        ref = self.model.norm.weight
        return torch.zeros(c.n_layer, 2, rows, c.n_kv_head, c.max_seq_len, c.head_dim, device=ref.device, dtype=ref.dtype)

    def write_cache(self, kv: torch.Tensor, new: torch.Tensor, start: int) -> None:
        write_cache(kv, new, start)

    def step_start(self, step):
        return self.cfg.prefix_len + (step - 1) * self.cfg.parallel_num

    # ---- stages -------------------------------------------------------------------------
    def _pos(self, step):
        """2D embeddings of step `step`'s P cells: [P, dim], or [R, P, dim] for a step per row."""
        p = self.cfg.parallel_num
        return layout.gather_positions(self.pos2d, step * p, p)

    def prefill(self, ids: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [R, prefix_len], pad [R] -> (head conditions of step 0, kv of [0, prefix_len))."""
        n = self.cfg.prefix_len
        pos = torch.arange(n, device=ids.device)
        key_ok = pos.unsqueeze(0) >= pad.unsqueeze(1)  # [R, n]: padding keys are hidden ...
        visible = self.prefix_visible.unsqueeze(0) & (key_ok.unsqueeze(1) | torch.eye(n, dtype=torch.bool,
                                                                                     device=ids.device))
        mask = torch.zeros(visible.shape, device=ids.device).masked_fill(~visible, float("-inf")).unsqueeze(1)
        # ... except from themselves, so that no softmax row is empty (their outputs are never read)
        hidden, new = self.model(self.model.embed_tokens(ids), self.rope[:n], mask)
        return hidden[:, -self.cfg.parallel_num:] + self._pos(0), new

    def step(self, tokens: torch.Tensor, step, kv, kv_len=None, pad: torch.Tensor | None = None):
        """AR step >= 1: tokens [R, P, C] of step-1 -> (head conditions [R, P, dim], kv of [start, +P)).

        kv: [n_layer, 2, R, n_kv, L, hd] or a list of (keys, values) per layer; reads [0, kv_len)."""
        p = self.cfg.parallel_num
        start = self.step_start(step)
        x = self.projector(tokens) + self._pos(step - 1)
        rope = layout.gather_positions(self.rope, start, p)  # [P, ...], or [R, P, ...] per row
        if rope.dim() == 4:
            rope = rope.unsqueeze(1)  # [R, 1, P, hd/2, 2]: broadcast over heads
        length = self.cfg.max_seq_len if kv_len is None else kv_len
        cache = [(layer[0][:, :, :length], layer[1][:, :, :length]) if kv_len is not None else (layer[0], layer[1])
                 for layer in kv]
        keys = torch.arange(length, device=tokens.device)
        first = start.view(-1, 1) if torch.is_tensor(start) and start.dim() == 1 else start
        hidden_key = (keys.unsqueeze(0) >= first) | (keys.unsqueeze(0) < pad.unsqueeze(1))  # [R, L]
        cache_mask = torch.zeros(hidden_key.shape, device=tokens.device).masked_fill(hidden_key, float("-inf"))
        chunk_mask = torch.zeros(1, 1, p, p, device=tokens.device)
        hidden, new = self.model(x, rope, chunk_mask, cache, cache_mask[:, None, None, :])
        return hidden + self._pos(step), new

    def head_net(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.head(x, t, cond)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image)

"""The BitDance text-to-image model (BitDance-14B-16x / -64x) as stage computations.

State-dict keys are the official files' keys under one prefix each: `model.*` (the Qwen3 LLM
shards), `head.net.*` (vision_head.safetensors), `projector.*` (projector.safetensors),
`vae.*` (ae.safetensors); see bitdance_rt/t2i/loading.py.

Sequence (one row; prompts are LEFT-padded to a fixed length so every row shares positions):
    [pad .. pad | chat prompt | <|vision_start|> <|res_h|> <|res_w|> | <|query_1|> .. <|query_P-1|>]
is the prefill; each AR step i >= 1 then feeds the tokens of step i-1 as one block of P positions.
Left padding gives what the official unpadded call computes, because RoPE only sees position
differences and padding keys are hidden (docs/text-to-image.md "The prefill"). The masks, the 2D
position embedding and the head conditions: `BitDanceT2I.transformer`.
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
        self.head = DiffusionHead(
            TransformerHead(
                h.ch_target, h.ch_latent, h.ch_cond, h.depth_latent, h.depth_adanln, variant="t2i", swiglu=h.use_swiglu
            )
        )
        self.projector = Projector(cfg.token_dim, cfg.dim)
        self.vae = BinaryAutoencoder(cfg.vae)
        self.reset_buffers()

    def reset_buffers(self, device=None) -> None:
        """(Re)compute the derived tables: RoPE, 2D position embedding.
        The loader calls it after assigning weights into a model built on the meta device."""
        cfg = self.cfg
        tables = {
            "rope": rope_table(cfg.llm, cfg.max_seq_len),
            "pos2d": pos_embed_2d(cfg),
        }
        for name, value in tables.items():
            self.register_buffer(name, value.to(device) if device is not None else value, persistent=False)

    # ---- cache --------------------------------------------------------------------------
    def new_cache(self, rows: int) -> torch.Tensor:
        c = self.cfg
        ref = self.model.norm.weight
        return torch.zeros(
            c.n_layer, 2, rows, c.n_kv_head, c.max_seq_len, c.head_dim, device=ref.device, dtype=ref.dtype
        )

    def write_cache(self, kv: torch.Tensor, new: torch.Tensor, start: int) -> None:
        write_cache(kv, new, start)

    def step_start(self, step):
        return self.cfg.prefix_len + (step - 1) * self.cfg.parallel_num

    # ---- stages -------------------------------------------------------------------------
    def _pos(self, step):
        """2D embeddings of step `step`'s P cells: [P, dim], or [R, P, dim] for a step per row."""
        p = self.cfg.parallel_num
        return layout.gather_positions(self.pos2d, step * p, p)

    def prefix_embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [R, prefix_len] -> token embeddings [R, prefix_len, dim]."""
        return self.model.embed_tokens(ids)

    def token_embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [R, P, C] -> projector(tokens); the transformer adds their cells' 2D embedding (the
        one stage that holds the table: it adds it to the head conditions too)."""
        return self.projector(tokens)

    def _fed_pos(self, start, t: int) -> torch.Tensor:
        """The 2D embedding of the cells a chunk feeds: position q >= prefix_len holds the tokens of
        cell q - prefix_len; the prefix none (0). [T, dim] or [R, T, dim]."""
        pos = layout.chunk_positions(start, t) - self.cfg.prefix_len
        fed = (pos >= 0).unsqueeze(-1).to(self.pos2d.dtype)
        flat = self.pos2d.index_select(0, pos.clamp(min=0).reshape(-1)).view(*pos.shape, -1)
        return flat * fed

    def transformer(self, x: torch.Tensor, start, pad: torch.Tensor, kv=None, kv_len=None):
        """Embeddings x [R, T, dim] at [start, start+T) -> (head conditions [R, P, dim] of the AR step the
        chunk completes, kv_new [n_layer, 2, R, n_kv, T, hd]).

        Inside the chunk: causal, then blocks of P (layout.key_limit): the prefill's mask (causal,
        except that its last P positions, <|res_w|> and the queries, attend to each other, as the
        official pipeline's second prefill call with an all-ones mask does), and all visible in a step
        (one bidirectional block over the whole cache). Padding keys (positions < pad[r], pad[r] = the
        padding length of row r) are hidden from every query except themselves, so that no softmax row
        is empty (their outputs are never read). Step i >= 1 feeds projector(tokens of step i-1) + the
        2D sin-cos embedding of those tokens' grid cells; the head conditions of step i are the
        block's last P hidden states + the 2D embedding of the cells step i generates. kv: None (nothing
        cached) or a list of (keys, values) [R, n_kv, L, hd] per layer, read at [0, kv_len), positions
        at or past `start` hidden."""
        t = x.shape[1]
        x = x + self._fed_pos(start, t)
        pos = layout.chunk_positions(start, t)
        rope = layout.gather_positions(self.rope, start, t)  # [T, ...], or [R, T, ...] per row
        if rope.dim() == 4:
            rope = rope.unsqueeze(1)  # [R, 1, T, hd/2, 2]: broadcast over heads
        key_pos = pos if pos.dim() == 2 else pos.unsqueeze(0)  # [R or 1, T]
        key_ok = key_pos >= pad.unsqueeze(1)  # [R, T]
        offsets = torch.arange(t, device=x.device)
        itself = offsets.unsqueeze(1) == offsets.unsqueeze(0)  # (not EyeLike: ONNX Runtime has no bool kernel)
        visible = layout.chunk_visible(self.cfg, start, t) & (key_ok.unsqueeze(1) | itself)
        chunk_mask = torch.zeros(visible.shape, device=x.device).masked_fill(~visible, float("-inf")).unsqueeze(1)
        cache, cache_mask = None, None
        if kv is not None:
            length = self.cfg.max_seq_len if kv_len is None else kv_len
            cache = [
                (layer[0][:, :, :length], layer[1][:, :, :length]) if kv_len is not None else (layer[0], layer[1])
                for layer in kv
            ]
            keys = torch.arange(length, device=x.device)
            first = start.view(-1, 1) if torch.is_tensor(start) and start.dim() == 1 else start
            hidden_key = (keys.unsqueeze(0) >= first) | (keys.unsqueeze(0) < pad.unsqueeze(1))  # [R, L]
            cache_mask = torch.zeros(hidden_key.shape, device=x.device).masked_fill(hidden_key, float("-inf"))
            cache_mask = cache_mask[:, None, None, :]
        hidden, new = self.model(x, rope, chunk_mask, cache, cache_mask)
        return hidden[:, -self.cfg.parallel_num :] + self._pos(layout.chunk_step(self.cfg, start, t)), new

    def prefill(self, ids: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [R, prefix_len], pad [R] -> (head conditions of step 0, kv of [0, prefix_len)), nothing cached."""
        return self.transformer(self.prefix_embed(ids), 0, pad)

    def step(self, tokens: torch.Tensor, step, kv, kv_len=None, pad: torch.Tensor | None = None):
        """AR step >= 1: tokens [R, P, C] of step-1 -> (head conditions [R, P, dim], kv of [start, +P)).

        kv: [n_layer, 2, R, n_kv, L, hd] or a list of (keys, values) per layer; reads [0, kv_len)."""
        return self.transformer(self.token_embed(tokens), self.step_start(step), pad, kv, kv_len)

    def head_net(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.head(x, t, cond)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image)

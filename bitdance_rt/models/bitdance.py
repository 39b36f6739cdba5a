"""The class-conditional ImageNet BitDance model (1x, 4x, 16x), state-dict compatible with the
official `model.py` / `model_parallel.py` BitDance (keys `cls_embedding`, `query_token`,
`proj_in`, `emb_norm`, `layers.*`, `norm`, `pos_for_diff`, `head.net.*`, `vae.*`).

The model exposes the stage computations the runtime needs, each as a method:
`prefill` (class + query tokens -> head conditions of the first step), `step` (fed-back tokens
-> head conditions of the next step), `head` (one net evaluation), `decode` / `encode`.
Head conditions are the backbone output of the last P positions plus their `pos_for_diff` rows.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig
from . import layout
from .backbone import MLPConnector, TransformerBlock
from .heads import DiffusionHead, MlpHead, TransformerHead
from .tokenizer import BinaryAutoencoder


class BitDance(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.vae = BinaryAutoencoder(cfg.vae)
        self.cls_embedding = nn.Embedding(cfg.num_classes + 1, cfg.dim * cfg.cls_token_num)
        if cfg.is_parallel:
            self.query_token = nn.Parameter(torch.zeros(1, cfg.parallel_num - 1, cfg.dim))
        self.proj_in = MLPConnector(cfg.token_dim, cfg.dim)
        self.emb_norm = nn.RMSNorm(cfg.dim, eps=1e-6)
        self.layers = nn.ModuleList(
            TransformerBlock(cfg.dim, cfg.n_head, cfg.ffn_hidden) for _ in range(cfg.n_layer)
        )
        self.norm = nn.RMSNorm(cfg.dim, eps=1e-6)
        self.pos_for_diff = nn.Embedding(cfg.num_tokens, cfg.dim)
        head_cls = TransformerHead if cfg.is_parallel else MlpHead
        self.head = DiffusionHead(
            head_cls(cfg.token_dim, cfg.diff_dim, cfg.dim, cfg.diff_layers, cfg.diff_adanln_layers)
        )
        self.register_buffer("rope", layout.rope_table(cfg), persistent=False)
        self.register_buffer("mask", layout.attention_mask_table(cfg), persistent=False)

    # ---- backbone ----------------------------------------------------------------------
    def new_cache(self, rows: int) -> torch.Tensor:
        """Static KV cache [n_layer, 2, rows, n_head, max_seq_len, head_dim], zero-filled."""
        c = self.cfg
        return torch.zeros(c.n_layer, 2, rows, c.n_head, c.max_seq_len, c.head_dim,
                           device=self.norm.weight.device, dtype=self.norm.weight.dtype)

    def backbone(self, x: torch.Tensor, kv: torch.Tensor, start: int, kv_len: int | None = None) -> torch.Tensor:
        """Embeddings x [R, T, dim] at positions [start, start+T) -> normed hidden [R, T, dim].

        Writes keys/values into `kv` in place. Attends over kv[..., :kv_len] (default: the whole
        cache, masked); `kv_len=start+T` gives the same result with less work.
        """
        t = x.shape[1]
        end = start + t
        kv_len = self.cfg.max_seq_len if kv_len is None else kv_len
        rope = self.rope[start:end]
        mask = self.mask[start:end]
        x = self.emb_norm(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, kv[i], start, kv_len)
        return self.norm(x)

    def prefix_embeddings(self, labels: torch.Tensor) -> torch.Tensor:
        """Class tokens (row `label` of cls_embedding as [cls, dim]) ++ the P-1 query tokens."""
        rows = labels.shape[0]
        x = self.cls_embedding(labels).view(rows, self.cfg.cls_token_num, self.cfg.dim)
        if self.cfg.is_parallel:
            x = torch.cat([x, self.query_token.expand(rows, -1, -1)], dim=1)
        return x

    def step_start(self, step: int) -> int:
        """First cache position of the tokens fed at AR step `step` >= 1."""
        return self.cfg.prefix_len + (step - 1) * self.cfg.parallel_num

    def head_condition(self, hidden: torch.Tensor, step: int) -> torch.Tensor:
        """Conditions of AR step `step`: the last P hidden states + pos_for_diff rows of its tokens."""
        p = self.cfg.parallel_num
        return hidden[:, -p:] + self.pos_for_diff.weight[step * p : (step + 1) * p]

    def prefill(self, labels: torch.Tensor, kv: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
        """AR step 0: labels [R] -> head conditions [R, P, dim]; fills kv [0, prefix_len)."""
        hidden = self.backbone(self.prefix_embeddings(labels), kv, 0, kv_len)
        return self.head_condition(hidden, 0)

    def step(self, tokens: torch.Tensor, step: int, kv: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
        """AR step `step` >= 1: tokens [R, P, C] of step-1 -> head conditions [R, P, dim]."""
        hidden = self.backbone(self.proj_in(tokens), kv, self.step_start(step), kv_len)
        return self.head_condition(hidden, step)

    # ---- head and tokenizer ------------------------------------------------------------
    def head_net(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """One x-prediction: x [R, P, C], t [R], cond [R, P, dim] -> [R, P, C]."""
        return self.head(x, t, cond)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image)

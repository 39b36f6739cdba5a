"""The class-conditional ImageNet BitDance model (1x, 4x, 16x), state-dict compatible with the
official `model.py` / `model_parallel.py` BitDance (keys `cls_embedding`, `query_token`,
`proj_in`, `emb_norm`, `layers.*`, `norm`, `pos_for_diff`, `head.net.*`, `vae.*`).

The model exposes the stage computations the runtime needs, each as a method:
`prefix_embed` (class + query tokens), `token_embed` (fed-back tokens), `transformer` (a chunk of
embeddings at its positions -> head conditions of the AR step it completes, for the prefill and
every step alike), `head_net` (one net evaluation), `decode` / `encode`; `prefill` and `step`
compose them. Head conditions are the backbone output of the last P positions plus their
`pos_for_diff` rows.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig
from . import layout
from .backbone import MLPConnector, TransformerBlock
from .kv_cache import write_cache
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
        self.layers = nn.ModuleList(TransformerBlock(cfg.dim, cfg.n_head, cfg.ffn_hidden) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.dim, eps=1e-6)
        self.pos_for_diff = nn.Embedding(cfg.num_tokens, cfg.dim)
        head_cls = TransformerHead if cfg.is_parallel else MlpHead
        self.head = DiffusionHead(
            head_cls(cfg.token_dim, cfg.diff_dim, cfg.dim, cfg.diff_layers, cfg.diff_adanln_layers)
        )
        self.register_buffer("rope", layout.rope_table(cfg), persistent=False)

    # ---- backbone ----------------------------------------------------------------------
    def new_cache(self, rows: int) -> torch.Tensor:
        """Static KV cache [n_layer, 2, rows, n_head, max_seq_len, head_dim], zero-filled."""
        c = self.cfg
        return torch.zeros(
            c.n_layer,
            2,
            rows,
            c.n_head,
            c.max_seq_len,
            c.head_dim,
            device=self.norm.weight.device,
            dtype=self.norm.weight.dtype,
        )

    def backbone(
        self,
        x: torch.Tensor,
        start,
        kv: torch.Tensor | None = None,
        kv_len=None,
        chunk_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings x [R, T, dim] at positions [start, start+T) -> (normed hidden [R, T, dim],
        new keys/values [n_layer, 2, R, n_head, T, head_dim]) to be written at [start, start+T).

        Reads kv[..., :kv_len] (default: the whole static cache, masked past `start`);
        `kv_len=start` gives the same result with less work. `start` may be a 0-d tensor, or a
        tensor [R] of one position per row (rows at different AR steps, continuous batching).
        """
        t = x.shape[1]
        if kv is not None and kv_len is None:
            kv_len = self.cfg.max_seq_len
        # Gather, not Slice: a Slice starting at a graph input makes TensorRT treat `start` as a shape tensor
        rope = layout.gather_positions(self.rope, start, t)
        x = self.emb_norm(x)
        new = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, rope, chunk_mask, None if kv is None else kv[i], start, kv_len)
            new.append(torch.stack([k, v]))
        return self.norm(x), torch.stack(new)

    def write_cache(self, kv: torch.Tensor, new: torch.Tensor, start: int) -> None:
        """Store a chunk's keys/values (from `backbone`) at [start, start+T) of the cache, in place."""
        write_cache(kv, new, start)

    def prefix_embed(self, labels: torch.Tensor) -> torch.Tensor:
        """Class tokens (row `label` of cls_embedding as [cls, dim]) ++ the P-1 query tokens."""
        rows = labels.shape[0]
        x = self.cls_embedding(labels).view(rows, self.cfg.cls_token_num, self.cfg.dim)
        if self.cfg.is_parallel:
            x = torch.cat([x, self.query_token.expand(rows, -1, -1)], dim=1)
        return x

    def token_embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """+/-1 tokens [R, P, C] -> backbone inputs [R, P, dim] (the input projection)."""
        return self.proj_in(tokens)

    def step_start(self, step):
        """First cache position of the tokens fed at AR step `step` >= 1 (int or 0-d tensor)."""
        return self.cfg.prefix_len + (step - 1) * self.cfg.parallel_num

    def head_condition(self, hidden: torch.Tensor, step) -> torch.Tensor:
        """Conditions of AR step `step`: the last P hidden states + pos_for_diff rows of its tokens."""
        p = self.cfg.parallel_num
        return hidden[:, -p:] + layout.gather_positions(self.pos_for_diff.weight, step * p, p)

    def transformer(self, x: torch.Tensor, start, kv=None, kv_len=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings x [R, T, dim] at positions [start, start+T) -> (head conditions [R, P, dim] of the
        AR step the chunk completes, keys/values [n_layer, 2, R, n_head, T, head_dim]).

        The prefill (start 0, T = prefix_len) attends block-causally to itself; a step's patch sees
        all of itself; both follow from positions (layout.key_limit). `kv` (None: nothing cached) is
        read as in `backbone`."""
        t = x.shape[1]
        visible = layout.chunk_visible(self.cfg, start, t)
        mask = torch.zeros(visible.shape, device=x.device).masked_fill(~visible, float("-inf"))
        if mask.dim() == 3:
            mask = mask.unsqueeze(1)  # [R, 1, T, T]: per row, broadcast over heads
        hidden, new = self.backbone(x, start, kv, kv_len, chunk_mask=mask)
        return self.head_condition(hidden, layout.chunk_step(self.cfg, start, t)), new

    def prefill(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """AR step 0: labels [R] -> (head conditions [R, P, dim], keys/values of [0, prefix_len)),
        with nothing cached (an empty cache has nothing to add)."""
        return self.transformer(self.prefix_embed(labels), 0)

    def step(self, tokens: torch.Tensor, step, kv: torch.Tensor, kv_len=None) -> tuple[torch.Tensor, torch.Tensor]:
        """AR step `step` >= 1: tokens [R, P, C] of step-1 -> (head conditions [R, P, dim], new
        keys/values for [step_start(step), +P))."""
        return self.transformer(self.token_embed(tokens), self.step_start(step), kv, kv_len)

    # ---- head and tokenizer ------------------------------------------------------------
    def head_net(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """One x-prediction: x [R, P, C], t [R], cond [R, P, dim] -> [R, P, C]."""
        return self.head(x, t, cond)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image)

"""Seeded random weights for models without a checkpoint (tests, benchmarks, the tiny default).

The scheme is the one of the official fixtures: every parameter is drawn, including those the
official init zeroes (adaLN, final layers), so all paths carry signal: norm scales 1+0.1N,
biases 0.1N, embeddings and query tokens N(0,1), pos_for_diff 0.5N, Linear/Conv N(0,1)/sqrt(fan_in).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


@torch.no_grad()
def random_init(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)

    def normal(p: torch.Tensor) -> torch.Tensor:
        return torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)

    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if "pos_for_diff" in name:
            p.copy_(0.5 * normal(p))
        elif "cls_embedding" in name or leaf == "query_token":
            p.copy_(normal(p))
        elif leaf == "bias":
            p.copy_(0.1 * normal(p))
        elif p.dim() == 1:  # norm scales
            p.copy_(1.0 + 0.1 * normal(p))
        else:
            fan_in = math.prod(p.shape[1:])
            p.copy_(normal(p) / math.sqrt(fan_in))
    return model

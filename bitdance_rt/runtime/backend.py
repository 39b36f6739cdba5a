"""The few calls every backend (torch, onnxruntime, tensorrt) implements for the loop."""

from __future__ import annotations

from typing import Protocol

import torch

from ..config import ModelConfig


class Backend(Protocol):
    config: ModelConfig
    name: str

    def prefill(self, labels: torch.Tensor) -> torch.Tensor:
        """Start a generation of R rows: labels [R] int64 -> head conditions [R, P, dim]."""

    def step(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """Feed the +/-1 tokens [R, P, C] of AR step `step`-1 -> head conditions [R, P, dim]."""

    def sample_tokens(self, cond: torch.Tensor, noise: torch.Tensor, cfg: float, guided: bool) -> torch.Tensor:
        """Head sampling of one AR step: noise [S+1, rows, P, C] -> +/-1 tokens [R, P, C]."""

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """+/-1 latent [B, C, h, w] -> image [B, 3, H, W] in about [-1, 1]."""

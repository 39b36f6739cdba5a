"""The PyTorch eager backend: the float32 reference every other backend is checked against."""

from __future__ import annotations

import torch

from ..models import BitDance
from ..sampling import sample_tokens


class TorchBackend:
    name = "torch"

    def __init__(self, model: BitDance, device: str | torch.device = "cpu"):
        self.model = model.to(device).eval()
        self.config = model.cfg
        self.device = torch.device(device)
        self.kv: torch.Tensor | None = None

    @torch.inference_mode()
    def prefill(self, labels):
        self.kv = self.model.new_cache(labels.shape[0])
        return self.model.prefill(labels.to(self.device), self.kv, kv_len=self.config.prefix_len)

    @torch.inference_mode()
    def step(self, tokens, step):
        # Attend over the written part of the cache only, as the official code does.
        end = self.model.step_start(step) + self.config.parallel_num
        return self.model.step(tokens.to(self.device), step, self.kv, kv_len=end)

    @torch.inference_mode()
    def sample_tokens(self, cond, noise, cfg, guided):
        return sample_tokens(self.model.head_net, cond, noise.to(self.device), cfg, guided, self.config.time_shift)

    @torch.inference_mode()
    def decode(self, latent):
        return self.model.decode(latent.to(self.device))

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
        self.head_net = self.model.head_net  # the sampler's net; wrappers (calibration) may observe it

    @torch.inference_mode()
    def prefill(self, labels):
        """labels [R], or a dict of named prefill inputs (text-to-image: ids, pad)."""
        inputs = labels if isinstance(labels, dict) else {"labels": labels}
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        self.kv = self.model.new_cache(next(iter(inputs.values())).shape[0])
        cond, new = self.model.prefill(*inputs.values())
        # inputs the backbone step needs again (text-to-image: each row's padding)
        self._context = {k: inputs[k] for k in getattr(self.model, "step_context", ())}
        self.model.write_cache(self.kv, new, 0)
        return cond

    @torch.inference_mode()
    def step(self, tokens, step):
        # Read the written part of the cache only, as the official code does.
        start = self.model.step_start(step)
        cond, new = self.model.step(tokens.to(self.device), step, self.kv, kv_len=start, **self._context)
        self.model.write_cache(self.kv, new, start)
        return cond

    @torch.inference_mode()
    def sample_tokens(self, cond, noise, cfg, guided):
        return sample_tokens(self.head_net, cond, noise.to(self.device), cfg, guided, self.config.time_shift)

    @torch.inference_mode()
    def decode(self, latent):
        return self.model.decode(latent.to(self.device))

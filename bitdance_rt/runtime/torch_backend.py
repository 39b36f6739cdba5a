"""The PyTorch eager backend: the float32 reference every other backend is checked against.

It runs each stage as the very module the ONNX export traces (export/wrappers.py), on the shared
core (runtime/core.py), so torch, ONNX Runtime and TensorRT compute the same graph per stage.
With sampler "step" (calibration capture) the core runs every head-net evaluation as a head_step
stage, which its stage observers see; the fused path samples with `self.head_net` inside one
head_sampler stage run.
"""

from __future__ import annotations

import torch

from .. import stages as st
from ..export.wrappers import stage_module
from ..sampling import sample_tokens_rows
from .core import StageBackend


class TorchBackend(StageBackend):
    name = "torch"
    specs = None  # every stage, any sampler step count

    def __init__(self, model, device: str | torch.device = "cpu", max_batch: int | None = None):
        """`max_batch`: most images per call (None: no limit; the cache grows as rows arrive)."""
        self.model = model.to(device).eval()
        self.config = model.cfg
        self.device = torch.device(device)
        self.head_net = self.model.head_net  # the sampler's net (head_step and head_sampler stages)
        specs = {
            name: st.stage_spec(name, self.config, steps=1)
            for name in (st.PREFIX_EMBED, st.TOKEN_EMBED, st.BACKBONE, st.DECODER, st.ENCODER)
        }
        self._names = {name: spec.input_names for name, spec in specs.items()}
        self._outputs = {name: spec.output_names for name, spec in specs.items()}
        self._modules = {name: stage_module(name, self.model) for name in self._names}  # made once: no races
        self._init_core(None if max_batch is None else 2 * max_batch)

    @property
    def concurrent_decode(self) -> bool:
        """Decode on the scheduler's decode thread on a GPU; on the CPU it would take the cores the AR
        steps use (see OrtBackend.concurrent_decode)."""
        return self.device.type == "cuda"

    def _alloc_cache(self, rows: int) -> torch.Tensor:
        return torch.zeros(st.kv_shape(self.config, rows), dtype=torch.float32, device=self.device)

    @torch.inference_mode()
    def _run(self, stage, feeds, phase=None):
        feeds = {k: v.to(self.device) for k, v in feeds.items()}
        if stage == st.HEAD_SAMPLER:
            return {
                "tokens": sample_tokens_rows(
                    self.head_net,
                    feeds["cond"],
                    feeds["noise"],
                    feeds["cfg"],
                    feeds["cond_row"],
                    feeds["uncond_row"],
                    self.config.time_shift,
                )
            }
        if stage == st.HEAD_STEP:
            return {"x_pred": self.head_net(feeds["x"], feeds["t"], feeds["cond"])}
        out = self._modules[stage](*(feeds[n] for n in self._names[stage]))
        return dict(zip(self._outputs[stage], out if isinstance(out, tuple) else (out,)))

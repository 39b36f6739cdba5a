"""The PyTorch eager backend: the float32 reference every other backend is checked against.

It runs each stage as the very module the ONNX export traces (export/wrappers.py), on the shared
core (runtime/core.py), so torch, ONNX Runtime and TensorRT compute the same graph per stage.
With sampler "step" (calibration capture) the core runs every head-net evaluation as a head_step
stage, which its stage observers see; the fused path samples with `self.head_net` inside one
head_sampler stage run.

`precision="bf16"` (CUDA only) runs the networks under torch.autocast to bfloat16: matmuls and
convolutions in BF16, norms, softmax and the sampler's own arithmetic in float32 (autocast's float32
list, and the sampler's float32 inputs), the stage outputs float32 as every backend's. The weights stay
float32 in memory. Unmeasured on a GPU so far.
"""

from __future__ import annotations

import torch

from .. import stages as st
from ..export.wrappers import stage_module
from ..sampling import sample_tokens_rows
from .core import StageBackend


TORCH_PRECISIONS = ("fp32", "bf16")


def check_torch_precision(precision: str | None, device) -> str:
    """The torch backend's precision (None: fp32), or one BitDanceError line: it runs the float32
    reference, and bf16 on a CUDA device (CPU autocast to BF16 is emulated and slow, and unchecked)."""
    from ..errors import BitDanceError

    precision = precision or "fp32"
    if precision not in TORCH_PRECISIONS:
        raise BitDanceError(
            f"precision {precision}: the torch backend is the float32 reference (and bf16 on a CUDA GPU); use "
            f"backend onnxruntime (or tensorrt) for {precision}"
        )
    if precision == "bf16" and torch.device(device).type != "cuda":
        raise BitDanceError(
            f"precision bf16 on the torch backend runs on a CUDA GPU (device cuda), not on {device}: on a CPU "
            "use fp32, or run bf16 with backend tensorrt on a GPU"
        )
    return precision


class TorchBackend(StageBackend):
    name = "torch"
    specs = None  # every stage, any sampler step count

    def __init__(
        self, model, device: str | torch.device = "cpu", max_batch: int | None = None, precision: str | None = None
    ):
        """`max_batch`: most images per call (None: no limit; the cache grows as rows arrive); `precision`:
        fp32 (None) or bf16 (CUDA only, see the module docstring)."""
        self.precision = check_torch_precision(precision, device)
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
        if self.precision == "fp32":
            return self._run_stage(stage, feeds)
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            out = self._run_stage(stage, feeds)
        return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}  # (the stage contract)

    def _run_stage(self, stage, feeds):
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

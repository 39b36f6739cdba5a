"""nn.Module wrappers that give each stage of the contract (bitdance_rt.stages) a forward().

They only adapt calling conventions; the maths stays in the model methods and in
bitdance_rt.sampling, so the exported graphs compute what the torch reference computes.

The cache is made functional for export (kv in, kv out) with as few full-cache copies as ONNX
allows. The model writes keys/values in place (`kv[i][0, :, :, a:b] = k`) and reads them back
(`kv[i][0, :, :, :L]`); an in-place write through a *view* of a graph input would be lost by the
TorchScript exporter, and a naive clone/unbind/stack of the whole cache costs ~6 copies of it per
step. So the model gets, per layer, a `_LayerCache` holding its own key and value buffers
(`kv[i]` indexes a list as it indexes the stacked tensor): writes go to those buffers (ScatterND,
which ONNX Runtime does in place) and are recorded; the full-length read returns the buffer itself.
The output cache is then one ScatterND of all new keys/values into kv_in at [start, start+T).
Measured on BitDance-B-4x (ORT CPU EP, 1 thread) against the naive clone/unbind/stack graph:
cache ops 37 -> 26 ms, step 93 -> 74 ms (rows=2); 220 -> 120 ms, step 338 -> 262 ms (rows=8).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import stages as st
from ..models import BitDance
from ..sampling import sample_tokens


class _LayerCache:
    """One layer's cache as the model's Attention indexes it: kv[0|1, :, :, positions]."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.parts = [keys, values]  # [rows, n_head, L, head_dim], own buffers
        self.new: list[torch.Tensor | None] = [None, None]

    @staticmethod
    def _split(idx) -> tuple[int, tuple]:
        if not (isinstance(idx, tuple) and len(idx) == 4 and idx[0] in (0, 1)
                and idx[1] == slice(None) and idx[2] == slice(None) and isinstance(idx[3], slice)):
            raise RuntimeError(f"unexpected KV-cache access {idx!r}: the model's Attention changed; "
                               "update bitdance_rt/export/wrappers.py")
        return idx[0], idx[1:]

    def __setitem__(self, idx, value):
        which, rest = self._split(idx)
        if self.new[which] is not None:
            raise RuntimeError("the model wrote the same KV-cache part twice in one call")
        self.parts[which][rest] = value
        self.new[which] = value

    def __getitem__(self, idx):
        which, rest = self._split(idx)
        part = self.parts[which]
        if rest[-1].start is None and rest[-1].step is None and rest[-1].stop == part.shape[2]:
            return part  # kv_len=None: the whole static cache; no Slice (= copy) in the graph
        return part[rest]


def _run_with_cache(kv: torch.Tensor, start, length: int, call) -> tuple[torch.Tensor, torch.Tensor]:
    """Run call(layers) over per-layer caches of kv; return (its result, kv with the new entries)."""
    layers = [_LayerCache(kv[i, 0].clone(), kv[i, 1].clone()) for i in range(kv.shape[0])]
    out = call(layers)
    if any(part is None for layer in layers for part in layer.new):
        raise RuntimeError("the model did not write every layer's keys and values")
    new = torch.stack([torch.stack(layer.new) for layer in layers])  # [n_layer, 2, rows, H, T, hd]
    kv_out = kv.clone()
    kv_out[:, :, :, :, start:start + length] = new
    return out, kv_out


class PrefillStage(nn.Module):
    """labels [rows] -> cond [rows, P, dim], kv (full length, prefix written, rest zero)."""

    def __init__(self, model: BitDance):
        super().__init__()
        self.model = model

    def forward(self, labels):
        kv = self.model.new_cache(labels.shape[0])
        # kv_len=None: attend over the full cache with the mask table, as backbone_step does
        return _run_with_cache(kv, 0, self.model.cfg.prefix_len, lambda layers: self.model.prefill(labels, layers))


class BackboneStepStage(nn.Module):
    """tokens [rows, P, C], start (cache position), kv_in -> cond [rows, P, dim], kv_out."""

    def __init__(self, model: BitDance):
        super().__init__()
        self.model = model

    def forward(self, tokens, start, kv_in):
        cfg = self.model.cfg
        # invert stages.step_start: start = prefix_len + (step - 1) * P
        step = torch.div(start - cfg.prefix_len, cfg.parallel_num, rounding_mode="floor") + 1
        return _run_with_cache(kv_in, start, tokens.shape[1], lambda layers: self.model.step(tokens, step, layers))


class HeadStepStage(nn.Module):
    def __init__(self, model: BitDance):
        super().__init__()
        self.model = model

    def forward(self, x, t, cond):
        return self.model.head_net(x, t, cond)


class HeadSamplerStage(nn.Module):
    """The whole sampler of one AR step via sampling.sample_tokens, S fixed by noise's length."""

    def __init__(self, model: BitDance, guided: bool):
        super().__init__()
        self.model = model
        self.guided = guided

    def forward(self, cond, noise, cfg=None):
        scale = cfg if self.guided else 1.0
        return sample_tokens(self.model.head_net, cond, noise, scale, self.guided, self.model.cfg.time_shift)


class DecoderStage(nn.Module):
    def __init__(self, model: BitDance):
        super().__init__()
        self.model = model

    def forward(self, latent):
        return self.model.decode(latent)


class EncoderStage(nn.Module):
    def __init__(self, model: BitDance):
        super().__init__()
        self.model = model

    def forward(self, image):
        return self.model.encode(image)


def stage_module(name: str, model: BitDance) -> nn.Module:
    """The wrapper of stage `name`, in eval mode."""
    if name in st.SAMPLER_STAGES:
        return HeadSamplerStage(model, name == st.HEAD_SAMPLER_GUIDED).eval()
    classes = {st.PREFILL: PrefillStage, st.BACKBONE_STEP: BackboneStepStage, st.HEAD_STEP: HeadStepStage,
               st.DECODER: DecoderStage, st.ENCODER: EncoderStage}
    return classes[name](model).eval()


def example_inputs(spec: st.StageSpec, model: BitDance, batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Valid inputs of a stage (labels in range, +/-1 tokens, a real cache position, ...).

    Used to trace the export and to compare backends. `batch` sets "batch" and rows = 2*batch
    (so that no dynamic size equals a static one by accident).
    """
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    values = {"batch": batch, "rows": 2 * batch}
    out = []
    for t in spec.inputs:
        shape = spec.shape(t.name, **values)
        if t.name == "labels":
            x = torch.randint(0, cfg.num_classes + 1, shape, generator=gen)
        elif t.name == "start":
            x = torch.tensor(st.step_start(cfg, max(1, cfg.ar_steps // 2)), dtype=torch.int64)
        elif t.name == "tokens":
            x = torch.where(torch.rand(shape, generator=gen) > 0.5, 1.0, -1.0)
        elif t.name == "latent":
            x = torch.where(torch.rand(shape, generator=gen) > 0.5, 1.0, -1.0)
        elif t.name == "image":
            x = torch.rand(shape, generator=gen) * 2 - 1
        elif t.name == "t":
            x = torch.rand(shape, generator=gen)
        elif t.name == "cfg":
            x = torch.tensor(2.5)
        elif t.name == "kv_in":
            x = torch.randn(shape, generator=gen)
        else:
            x = torch.randn(shape, generator=gen)
        out.append(x.to(torch.int64 if t.dtype == "int64" else torch.float32))
    return tuple(out)

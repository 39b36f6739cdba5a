"""nn.Module wrappers that give each stage of the contract (bitdance_rt.stages) a forward().

They only adapt calling conventions; the maths stays in the model methods and in
bitdance_rt.sampling, so the exported graphs compute what the torch reference computes.
The backbone stages read the cache and return the new keys/values of their chunk (the model is
written that way), so no graph copies or updates the cache: the runtime stores `kv_new`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import stages as st
from ..models import BitDance
from ..sampling import guidance_rows, sample_tokens_rows


class PrefixEmbedStage(nn.Module):
    """labels [rows] (text-to-image: ids [rows, prefix_len]) -> x [rows, prefix_len, dim]."""

    def __init__(self, model: BitDance):
        super().__init__()
        self.model = model

    def forward(self, *inputs):
        return self.model.prefix_embed(*inputs)


class TokenEmbedStage(nn.Module):
    """tokens [rows, P, C] (text-to-image: and start [rows]) -> x [rows, P, dim]."""

    def __init__(self, model: BitDance):
        super().__init__()
        self.model = model

    def forward(self, *inputs):
        return self.model.token_embed(*inputs)


class BackboneStage(nn.Module):
    """x [rows, seq, dim], start [rows] (each row's first position), (text-to-image: pad), per-layer
    keys and values -> cond [rows, P, dim], kv_new for [start[row], +seq): the prefill and the steps."""

    def __init__(self, model: BitDance):
        super().__init__()
        self.model = model

    def forward(self, x, start, *rest):
        cfg = self.model.cfg
        names = st.step_context_names(cfg)  # text-to-image: pad
        context, cache = dict(zip(names, rest[: len(names)])), rest[len(names) :]
        layers = [(cache[2 * i], cache[2 * i + 1]) for i in range(cfg.n_layer)]  # kv[i][0|1] as the model reads it
        return self.model.transformer(x, start, kv=layers, **context)


class HeadStepStage(nn.Module):
    def __init__(self, model: BitDance):
        super().__init__()
        self.model = model

    def forward(self, x, t, cond):
        return self.model.head_net(x, t, cond)


class HeadSamplerStage(nn.Module):
    """The whole sampler of one AR step via sampling.sample_tokens_rows (per-row guidance), S fixed
    by noise's length."""

    def __init__(self, model: BitDance):
        super().__init__()
        self.model = model

    def forward(self, cond, noise, cfg, cond_row, uncond_row):
        return sample_tokens_rows(
            self.model.head_net, cond, noise, cfg, cond_row, uncond_row, self.model.cfg.time_shift
        )


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
    classes = {
        st.PREFIX_EMBED: PrefixEmbedStage,
        st.TOKEN_EMBED: TokenEmbedStage,
        st.BACKBONE: BackboneStage,
        st.HEAD_STEP: HeadStepStage,
        st.HEAD_SAMPLER: HeadSamplerStage,
        st.DECODER: DecoderStage,
        st.ENCODER: EncoderStage,
    }
    return classes[name](model).eval()


def example_inputs(
    spec: st.StageSpec, model: BitDance, batch: int = 3, seed: int = 0, meta: bool = False
) -> tuple[torch.Tensor, ...]:
    """Valid inputs of a stage (labels in range, +/-1 tokens, a real cache position, ...).

    Used to trace the export and to compare backends. `batch` sets "batch" and rows = 2*batch
    (so that no dynamic size equals a static one by accident). `meta`: tensors of the same shapes
    and types on the meta device, no values (the memory plan's trace: a 14B KV cache is GBs).
    """
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    values = {"batch": batch, "rows": 2 * batch}
    if spec.phases:  # the phase of the most calls (the backbone: a step)
        values.update(spec.phases["step"])
    # the sampler's per-row guidance: the first half of the rows guided pairs, the rest unguided
    rows = values["rows"]
    scale, c, u = guidance_rows(2 * (rows // 4), 2.5, True)
    guidance = {
        "cfg": torch.cat([scale, torch.ones(rows - scale.shape[0])]),
        "cond_row": torch.cat([c, torch.arange(c.shape[0], rows)]),
        "uncond_row": torch.cat([u, torch.arange(u.shape[0], rows)]),
    }
    out = []
    for t in spec.inputs:
        shape = spec.shape(t.name, **values)
        if meta:
            out.append(torch.empty(shape, dtype=torch.int64 if t.dtype == "int64" else torch.float32, device="meta"))
        elif t.name == "labels":
            x = torch.randint(0, cfg.num_classes + 1, shape, generator=gen)
        elif t.name == "ids":
            x = torch.randint(0, cfg.llm.vocab_size, shape, generator=gen)
        elif t.name == "pad":
            x = torch.randint(0, cfg.max_text_tokens, shape, generator=gen)
        elif t.name == "x":  # embeddings
            x = torch.randn(shape, generator=gen)
        elif t.name == "start":  # rows at different AR steps
            steps = torch.randint(1, cfg.ar_steps, shape, generator=gen)
            x = cfg.prefix_len + (steps - 1) * cfg.parallel_num
        elif t.name == "tokens":
            x = torch.where(torch.rand(shape, generator=gen) > 0.5, 1.0, -1.0)
        elif t.name == "latent":
            x = torch.where(torch.rand(shape, generator=gen) > 0.5, 1.0, -1.0)
        elif t.name == "image":
            x = torch.rand(shape, generator=gen) * 2 - 1
        elif t.name == "t":
            x = torch.rand(shape, generator=gen)
        elif t.name in guidance:
            x = guidance[t.name]
        else:
            x = torch.randn(shape, generator=gen)
        if not meta:
            out.append(x.to(torch.int64 if t.dtype == "int64" else torch.float32))
    return tuple(out)

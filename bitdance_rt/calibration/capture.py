"""Record the inputs each stage really sees during generation (calibration data).

`RecordingBackend` wraps the torch reference backend and is driven by the ordinary loop
(bitdance_rt.runtime.generate_batched, through the scheduler), so the trajectories are the real ones: the same labels,
CFG rows and schedule, noise and fed-back tokens as a normal run. It records, per stage of the
contract, the call's inputs (contract names) and the float32 outputs:

- prefill {labels}; backbone_step {tokens, start, cache (see dataset.COMPACT_CACHE)};
- head_step {x, t, cond}: every evaluation of the head net inside the sampler (the net callable
  handed to sample_tokens is wrapped), so x_t spans all sampler times of all AR steps;
- head_sampler {cond, noise, cfg, cond_row, uncond_row}; decoder {latent}.

What is kept follows a CapturePolicy (policy.py). Recording only copies tensors: the maths and
the noise draws are those of TorchBackend, and a recorded run gives the same tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .. import stages as st
from ..errors import BitDanceError
from ..models import BitDance
from ..runtime import GenerationResult, generate_batched
from ..runtime.loop import check_request
from ..runtime.torch_backend import TorchBackend
from ..sampling import SeededNoise, schedule_for
from .dataset import CAPTURED_STAGES, COMPACT_CACHE, FORMAT, CalibrationSet, Sample
from .policy import CapturePolicy, Reservoir


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


class RecordingBackend:
    """TorchBackend plus recording of every stage call chosen by the policy. It wraps the row-level
    calls the scheduler makes (runtime/core.py), so the recorded rows are the request's own rows,
    never the padding rows the core adds."""

    name = "torch (recording)"

    def __init__(self, inner: TorchBackend, policy: CapturePolicy = CapturePolicy()):
        self.inner = inner
        self.config = inner.config
        self.policy = policy
        self._rng = random.Random(policy.seed)
        self.reservoirs = {stage: Reservoir(policy.max_samples, self._rng) for stage in CAPTURED_STAGES}
        self.head_evaluations = 0
        self._real_rows = None  # rows of the sampler call in progress (the rest is padding)
        inner.head_net = self._recording_net(inner.head_net)  # sees every evaluation inside the sampler

    @property
    def max_batch(self):
        return self.inner.max_batch

    @property
    def max_rows(self):
        return self.inner.max_rows

    def _offer(self, stage: str) -> bool:
        return self.reservoirs[stage].offer()

    def prefill_rows(self, inputs, slots):
        cond = self.inner.prefill_rows(inputs, slots)
        if self._offer(st.PREFILL):
            kv_new = self.inner.kv_rows(slots)[:, :, :, :, : self.config.prefix_len]
            named = dict(inputs) if isinstance(inputs, dict) else {"labels": inputs}  # (text-to-image: ids, pad)
            self.reservoirs[st.PREFILL].put(Sample({k: _keep(torch.as_tensor(v)) for k, v in named.items()},
                                                   {"cond": _keep(cond), "kv_new": _keep(kv_new)}))
        return cond

    def step_rows(self, tokens, starts, write):
        step = (int(max(starts)) - self.config.prefix_len) // self.config.parallel_num + 1
        if not self.policy.keeps_step(step) or not self._offer(st.BACKBONE_STEP):
            return self.inner.step_rows(tokens, starts, write)
        rows, end = int(tokens.shape[0]), int(max(starts))
        inputs = {"tokens": _keep(tokens).float(), "start": torch.tensor(list(starts), dtype=torch.int64),
                  COMPACT_CACHE: _keep(self.inner.kv_rows(range(rows))[:, :, :, :, :end])}
        for name in st.step_context_names(self.config):  # text-to-image: each row's prompt padding
            inputs[name] = _keep(self.inner.step_context(name, rows))
        cond = self.inner.step_rows(tokens, starts, write)
        p = self.config.parallel_num
        kv_new = torch.stack([self.inner.kv_rows([r])[:, :, 0, :, int(s) : int(s) + p] for r, s in enumerate(starts)],
                             dim=2)
        self.reservoirs[st.BACKBONE_STEP].put(Sample(inputs, {"cond": _keep(cond), "kv_new": _keep(kv_new)}))
        return cond

    def _recording_net(self, net):
        def recorded(x, t, cond):
            out = net(x, t, cond)
            self.head_evaluations += 1
            m = self._real_rows or x.shape[0]
            # The first evaluation is always a candidate, so a short run never leaves head_step empty.
            chosen = self._rng.random() < self.policy.head_fraction or self.head_evaluations == 1
            if chosen and self._offer(st.HEAD_STEP):
                self.reservoirs[st.HEAD_STEP].put(Sample({"x": _keep(x[:m]), "t": _keep(t[:m]), "cond": _keep(cond[:m])},
                                                         {"x_pred": _keep(out[:m])}))
            return out

        return recorded

    @torch.inference_mode()
    def sample_rows(self, cond, noise, cfg, cond_row, uncond_row):
        self._real_rows = int(cond.shape[0])
        try:
            tokens = self.inner.sample_rows(cond, noise, cfg, cond_row, uncond_row)  # its head net records
        finally:
            self._real_rows = None
        if self._offer(st.HEAD_SAMPLER):
            inputs = {"cond": _keep(cond), "noise": _keep(noise), "cfg": _keep(torch.as_tensor(cfg, dtype=torch.float32)),
                      "cond_row": _keep(torch.as_tensor(cond_row)), "uncond_row": _keep(torch.as_tensor(uncond_row))}
            self.reservoirs[st.HEAD_SAMPLER].put(Sample(inputs, {"tokens": _keep(tokens)}))
        return tokens

    def decode(self, latent):
        image = self.inner.decode(latent)
        if self._offer(st.DECODER):
            self.reservoirs[st.DECODER].put(Sample({"latent": _keep(latent).float()}, {"image": _keep(image)}))
        return image

    def samples(self) -> dict[str, list[Sample]]:
        return {stage: r.items() for stage, r in self.reservoirs.items()}

    def candidates(self) -> dict[str, int]:
        return {stage: r.seen for stage, r in self.reservoirs.items()}


@dataclass
class Capture:
    dataset: CalibrationSet
    results: list[GenerationResult]  # one per seed, as an unrecorded run would return them


def capture(model: BitDance, weights: str, labels, seeds, steps: int, cfg_scale: float,
            cfg_schedule: str | None = None, policy: CapturePolicy = CapturePolicy(),
            batch_size: int | None = 4, device: str = "cpu", progress: bool = False, prompts=None) -> Capture:
    """Generate `labels` (text-to-image: `prompts`, a PromptCondition) once per seed with the torch
    backend and record the stage inputs.

    `weights` names the weights (bitdance_rt.export.checkpoint_source / random_source), so a set
    is never used with another checkpoint. `batch_size` bounds the rows per recorded call (and
    so the size of a backbone sample, which holds the KV cache of all its rows).
    """
    seeds = [int(s) for s in seeds]
    cfg = model.cfg
    cfg_schedule = schedule_for(cfg_schedule, cfg)
    if prompts is not None:
        condition, what = prompts, {"prompts": list(prompts.prompts)}
    else:
        labels = [int(l) for l in labels]
        check_request(cfg.num_classes, labels, steps)
        condition, what = labels, {"labels": labels}
    if not seeds:
        raise BitDanceError("no seeds given: pass at least one seed")
    backend = RecordingBackend(TorchBackend(model, device), policy)
    results = [generate_batched(backend, condition, steps, cfg_scale, cfg_schedule, SeededNoise(seed), progress,
                                batch_size) for seed in seeds]
    key = {"format": FORMAT, "config": cfg.to_json_dict(), "weights": weights, **what, "seeds": seeds,
           "steps": int(steps), "cfg_scale": float(cfg_scale), "cfg_schedule": cfg_schedule,
           "batch_size": batch_size, "policy": policy.to_json(), "head_evaluations": backend.head_evaluations}
    cset = CalibrationSet(key, backend.samples(), backend.candidates())
    return Capture(cset, results)

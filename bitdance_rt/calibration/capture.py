"""Record the inputs each stage really sees during generation (calibration data).

`RecordingBackend` wraps the torch reference backend and is driven by the ordinary loop
(bitdance_rt.runtime.generate_batched, through the scheduler), so the trajectories are the real ones: the same labels,
CFG rows and schedule, noise and fed-back tokens as a normal run. It records, per calibrated stage
of the contract, the call's inputs (contract names) and the float32 outputs:

- token_embed {tokens} of every AR step;
- backbone {x, start (, pad), cache (see dataset.COMPACT_CACHE)} of BOTH phases: the prefill (x from
  prefix_embed, start 0) and every AR step (x from token_embed), since one graph serves both;
- head_step {x, t, cond}: every evaluation of the head net inside the sampler (the net callable
  handed to sample_tokens is wrapped), so x_t spans all sampler times of all AR steps;
- head_sampler {cond, noise, cfg, cond_row, uncond_row}; decoder {latent}.

The embeddings and the backbone are recorded where the runtime core calls them (`_run` of the
inner backend), so a backbone sample holds the very `x` it got, and only the rows of the call's
requests (not the padding rows of its row bucket, nor rows a step does not advance).
What is kept follows a CapturePolicy (policy.py), with one reservoir per backbone phase so that
the few prefill calls are never crowded out by the many steps. Recording only copies tensors:
the maths and the noise draws are those of TorchBackend, and a recorded run gives the same tokens.
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
    calls the scheduler makes (runtime/core.py) and, inside them, the stage calls of the core, so
    the recorded rows are the request's own rows, never the padding rows the core adds."""

    name = "torch (recording)"

    def __init__(self, inner: TorchBackend, policy: CapturePolicy = CapturePolicy()):
        self.inner = inner
        self.config = inner.config
        self.policy = policy
        self._rng = random.Random(policy.seed)
        # one reservoir per (stage, phase); phase None for a stage without phases
        self.reservoirs = {(stage, phase): Reservoir(policy.max_samples, self._rng) for stage in CAPTURED_STAGES
                           for phase in (st.stage_spec(stage, self.config, steps=1).phases or [None])}
        self.head_evaluations = 0
        self._real_rows = None  # rows of the sampler call in progress (the rest is padding)
        self._rows = None  # rows of the prefill / step call in progress to record (None: record nothing)
        inner.head_net = self._recording_net(inner.head_net)  # sees every evaluation inside the sampler
        inner._run = self._recording_run(inner._run)  # sees the embeddings and the backbone

    @property
    def max_batch(self):
        return self.inner.max_batch

    @property
    def max_rows(self):
        return self.inner.max_rows

    def _offer(self, stage: str, phase: str | None = None) -> bool:
        return self.reservoirs[(stage, phase)].offer()

    def _put(self, stage: str, sample: Sample, phase: str | None = None) -> None:
        self.reservoirs[(stage, phase)].put(sample)

    def prefill_rows(self, inputs, slots):
        self._rows = list(range(len(slots)))  # the call's first rows; the rest pads its bucket
        try:
            return self.inner.prefill_rows(inputs, slots)
        finally:
            self._rows = None

    def step_rows(self, tokens, starts, write):
        rows = [i for i, w in enumerate(write) if w]  # rows not written are padding (or were just prefilled)
        if rows:
            step = (max(int(starts[i]) for i in rows) - self.config.prefix_len) // self.config.parallel_num + 1
            self._rows = rows if self.policy.keeps_step(step) else None
        try:
            return self.inner.step_rows(tokens, starts, write)
        finally:
            self._rows = None

    def _recording_run(self, run):
        def recorded(stage, feeds, phase=None):
            out = run(stage, feeds, phase)
            if self._rows is None or stage not in (st.TOKEN_EMBED, st.BACKBONE) or not self._offer(stage, phase):
                return out
            index = torch.tensor(self._rows, dtype=torch.int64)
            take = lambda t: _keep(t.index_select(0, index.to(t.device)))  # noqa: E731
            inputs = {name: take(t) for name, t in feeds.items() if not name.startswith("cache.")}
            outputs = {name: take(t) for name, t in out.items() if name != "kv_new"}
            if stage == st.BACKBONE:
                end = int(inputs["start"].max())  # positions a row of the call reads unmasked: [0, start)
                names = st.cache_input_names(self.config)
                inputs[COMPACT_CACHE] = torch.stack([torch.stack([take(feeds[names[2 * i + part]][:, :, :end])
                                                                  for part in (0, 1)])
                                                     for i in range(self.config.n_layer)])  # kv[..., rows, :, :end]
                outputs["kv_new"] = _keep(out["kv_new"].index_select(2, index.to(out["kv_new"].device)))
            self._put(stage, Sample(inputs, {k: v.float() for k, v in outputs.items()}), phase)
            return out

        return recorded

    def _recording_net(self, net):
        def recorded(x, t, cond):
            out = net(x, t, cond)
            self.head_evaluations += 1
            m = self._real_rows or x.shape[0]
            # The first evaluation is always a candidate, so a short run never leaves head_step empty.
            chosen = self._rng.random() < self.policy.head_fraction or self.head_evaluations == 1
            if chosen and self._offer(st.HEAD_STEP):
                self._put(st.HEAD_STEP, Sample({"x": _keep(x[:m]), "t": _keep(t[:m]), "cond": _keep(cond[:m])},
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
            self._put(st.HEAD_SAMPLER, Sample(inputs, {"tokens": _keep(tokens)}))
        return tokens

    def decode(self, latent):
        image = self.inner.decode(latent)
        if self._offer(st.DECODER):
            self._put(st.DECODER, Sample({"latent": _keep(latent).float()}, {"image": _keep(image)}))
        return image

    def samples(self) -> dict[str, list[Sample]]:
        """{stage: samples}; the backbone's prefill samples first, then its steps'."""
        out: dict[str, list[Sample]] = {}
        for (stage, _), r in self.reservoirs.items():
            out.setdefault(stage, []).extend(r.items())
        return out

    def candidates(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (stage, _), r in self.reservoirs.items():
            out[stage] = out.get(stage, 0) + r.seen
        return out

    def phase_candidates(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (stage, phase), r in self.reservoirs.items():
            if phase is not None:
                out.setdefault(stage, {})[phase] = r.seen
        return out


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
    so the size of a backbone step sample, which holds the KV cache of all its rows).
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
    cset = CalibrationSet(key, backend.samples(), backend.candidates(), phase_candidates=backend.phase_candidates())
    return Capture(cset, results)

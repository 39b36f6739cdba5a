"""Record the inputs each stage really sees during generation (calibration data).

`RecordingBackend` wraps a stage backend (runtime/core.StageBackend: the float32 torch reference,
ONNX Runtime on the FP32 or FP16 export, ...; producer.py says which is the default) and is driven by
the ordinary loop (bitdance_rt.runtime.generate_batched, through the scheduler), so the trajectories
are the real ones: the same labels, CFG rows and schedule, noise and fed-back tokens as a normal run.
It records, per calibrated stage of the contract, the call's inputs and outputs where the runtime
core makes the call (its stage observers), so a sample holds exactly what the graph got, for the
requests' own rows (RecordingBackend lists what each stage records). Recording only copies
tensors: the maths and the noise draws are the backend's, and a recorded run gives its tokens.
The same seeds give the same samples from torch and from ONNX Runtime on the FP32 export, to
float32 rounding (tests/test_calibration_backends.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .. import stages as st
from ..errors import BitDanceError
from ..runtime import GenerationResult, generate_batched
from ..runtime.core import StageBackend, StageCall
from ..runtime.loop import check_request
from ..sampling import SeededNoise, schedule_for
from .dataset import CAPTURED_STAGES, COMPACT_CACHE, FORMAT, CalibrationSet, Sample
from .policy import CapturePolicy, Reservoir
from .producer import producer_of, torch_capture_backend


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


class RecordingBackend:
    """A stage backend plus recording of every stage call chosen by the policy. It wraps the row-level
    calls the scheduler makes (runtime/core.py: prefill_rows, step_rows, sample_rows, decode), which
    say which rows of a call are the requests' own, and observes the stage calls the core makes
    inside them (a stage observer, `run_stage`), so a backbone sample holds the very `x` it got, and
    the recorded rows are the request's own rows, never the padding rows of the call's row bucket,
    nor rows a step does not advance.

    Recorded per calibrated stage: the inputs (contract names) and the outputs (float32; those of the
    backend that ran, so an FP16 capture's outputs are the FP16 graphs'):
    - token_embed {tokens} of every AR step;
    - backbone {x, start (, pad), cache (see dataset.COMPACT_CACHE)} of BOTH phases: the prefill (x from
      prefix_embed, start 0) and every AR step (x from token_embed), since one graph serves both;
    - head_step {x, t, cond}: every evaluation of the head net inside the step-by-step sampler, so x_t
      spans all sampler times of all AR steps;
    - head_sampler {cond, noise, cfg, cond_row, uncond_row}; decoder {latent}.
    What is kept follows a CapturePolicy (policy.py).

    `inner`: any runtime/core.StageBackend (see producer.torch_capture_backend /
    ort_capture_backend) that has a head_step stage. Its sampler
    is set to "step", so every head-net evaluation is a head_step stage call (the maths of the fused
    sampler, and of torch's, is the same step-by-step sampler: the tokens do not change)."""

    def __init__(self, inner, policy: CapturePolicy = CapturePolicy()):
        if not isinstance(inner, StageBackend):
            raise BitDanceError(
                f"RecordingBackend: backend {getattr(inner, 'name', inner)!r} is not a stage backend "
                "(runtime/core.StageBackend): it has no stage observers to record from"
            )
        if not inner.has_stage(st.HEAD_STEP):
            raise BitDanceError(
                f"{inner._where()} has no head_step graph, which a capture samples with (every "
                "head-net evaluation is recorded); re-export with all stages"
            )
        self.inner = inner
        self.config = inner.config
        self.name = f"{inner.name} (recording)"
        self.producer = producer_of(inner)
        self.policy = policy
        self._rng = random.Random(policy.seed)
        # one reservoir per (stage, phase), so that the backbone's few prefill calls are never crowded out
        # by its many steps; phase None for a stage without phases
        self.reservoirs = {
            (stage, phase): Reservoir(policy.max_samples, self._rng)
            for stage in CAPTURED_STAGES
            for phase in (st.stage_spec(stage, self.config, steps=1).phases or [None])
        }
        self.head_evaluations = 0
        self._real_rows = None  # rows of the sampler call in progress (the rest is padding)
        self._rows = None  # rows of the prefill / step call in progress to record (None: record nothing)
        self._decoding = False
        self._sampler = inner.sampler
        inner.sampler = "step"  # head_step calls: every evaluation inside the sampler (runtime/core.py)
        inner.add_observer(self._observe)

    def detach(self) -> None:
        """Stop recording: the inner backend's observer and sampler mode as they were."""
        self.inner.remove_observer(self._observe)
        self.inner.sampler = self._sampler

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

    def _observe(self, call: StageCall) -> None:
        """The stage observer: what the policy keeps of each stage call inside a recorded row-level call."""
        stage, feeds, phase, out = call.stage, call.feeds, call.phase, call.outputs
        if stage in (st.TOKEN_EMBED, st.BACKBONE):
            if self._rows is not None and self._offer(stage, phase):
                self._record_rows(stage, feeds, phase, out)
        elif stage == st.HEAD_STEP:
            if self._real_rows is not None:
                self._record_head(feeds, out["x_pred"])
        elif stage == st.DECODER:
            if self._decoding and self._offer(st.DECODER):
                self._put(
                    st.DECODER,
                    Sample({"latent": _keep(feeds["latent"]).float()}, {"image": _keep(out["image"]).float()}),
                )

    def _record_rows(self, stage, feeds, phase, out) -> None:
        index = torch.tensor(self._rows, dtype=torch.int64)
        take = lambda t: _keep(t.index_select(0, index.to(t.device)))  # noqa: E731
        inputs = {name: take(t) for name, t in feeds.items() if not name.startswith("cache.")}
        outputs = {name: take(t) for name, t in out.items() if name != "kv_new"}
        if stage == st.BACKBONE:
            end = int(inputs["start"].max())  # positions a row of the call reads unmasked: [0, start)
            names = st.cache_input_names(self.config)
            inputs[COMPACT_CACHE] = torch.stack(
                [
                    torch.stack([take(feeds[names[2 * i + part]][:, :, :end]) for part in (0, 1)])
                    for i in range(self.config.n_layer)
                ]
            )  # kv[..., rows, :, :end]
            outputs["kv_new"] = _keep(out["kv_new"].index_select(2, index.to(out["kv_new"].device)))
        self._put(stage, Sample(inputs, {k: v.float() for k, v in outputs.items()}), phase)

    def _record_head(self, feeds, x_pred) -> None:
        """One head-net evaluation inside the sampler (its first `_real_rows` rows: the rest pads the bucket)."""
        self.head_evaluations += 1
        m = self._real_rows
        # The first evaluation is always a candidate, so a short run never leaves head_step empty.
        chosen = self._rng.random() < self.policy.head_fraction or self.head_evaluations == 1
        if chosen and self._offer(st.HEAD_STEP):
            x, t, cond = feeds["x"], feeds["t"], feeds["cond"]
            self._put(
                st.HEAD_STEP,
                Sample(
                    {"x": _keep(x[:m]), "t": _keep(t[:m]), "cond": _keep(cond[:m])},
                    {"x_pred": _keep(x_pred[:m]).float()},
                ),
            )

    @torch.inference_mode()
    def sample_rows(self, cond, noise, cfg, cond_row, uncond_row):
        self._real_rows = int(cond.shape[0])
        try:
            tokens = self.inner.sample_rows(cond, noise, cfg, cond_row, uncond_row)  # its head net records
        finally:
            self._real_rows = None
        if self._offer(st.HEAD_SAMPLER):
            inputs = {
                "cond": _keep(cond),
                "noise": _keep(noise),
                "cfg": _keep(torch.as_tensor(cfg, dtype=torch.float32)),
                "cond_row": _keep(torch.as_tensor(cond_row)),
                "uncond_row": _keep(torch.as_tensor(uncond_row)),
            }
            self._put(st.HEAD_SAMPLER, Sample(inputs, {"tokens": _keep(tokens)}))
        return tokens

    def decode(self, latent):
        self._decoding = True  # (decoder calls are recorded by the stage observer)
        try:
            return self.inner.decode(latent)
        finally:
            self._decoding = False

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


def capture(
    model,
    weights: str,
    labels,
    seeds,
    steps: int,
    cfg_scale: float,
    cfg_schedule: str | None = None,
    policy: CapturePolicy = CapturePolicy(),
    batch_size: int | None = 4,
    device: str = "cpu",
    progress: bool = False,
    prompts=None,
    backend=None,
    origin: dict | None = None,
) -> Capture:
    """Generate `labels` (text-to-image: `prompts`, a PromptCondition) once per seed and record the
    stage inputs.

    The run is on `backend`, a stage backend (producer.ort_capture_backend for ONNX
    Runtime on an export; then `model` may be None: no torch model is needed), else on the torch
    reference of `model` on `device`. `weights` names the weights (bitdance_rt.export.checkpoint_source
    / random_source), so a set is never used with another checkpoint; an export must be of them.
    The set's key records the producer (producer.py). `batch_size` bounds the rows per recorded
    call (and so the size of a backbone step sample, which holds the KV cache of all its rows).
    `origin`: what else to note in the set's manifest about the run (not part of its key), such as
    the export directory.
    """
    seeds = [int(s) for s in seeds]
    if backend is None and model is None:
        raise BitDanceError("capture: give the torch model or a capture backend")
    cfg = model.cfg if model is not None else backend.config
    cfg_schedule = schedule_for(cfg_schedule, cfg)
    if prompts is not None:
        condition, what = prompts, {"prompts": list(prompts.prompts)}
    else:
        labels = [int(l) for l in labels]
        check_request(cfg.num_classes, labels, steps)
        condition, what = labels, {"labels": labels}
    if not seeds:
        raise BitDanceError("no seeds given: pass at least one seed")
    manifest = getattr(backend, "manifest", None)
    if manifest is not None and manifest["key"].get("checkpoint") != weights:
        raise BitDanceError(
            f"capture: {backend._where()} was exported from {manifest['key'].get('checkpoint')}, "
            f"not {weights}; capture from an export of these weights"
        )
    inner = backend if backend is not None else torch_capture_backend(model, device)
    recording = RecordingBackend(inner, policy)
    try:
        results = [
            generate_batched(
                recording, condition, steps, cfg_scale, cfg_schedule, SeededNoise(seed), progress, batch_size
            )
            for seed in seeds
        ]
    finally:
        recording.detach()
        if backend is None:
            inner.close()
    key = {
        "format": FORMAT,
        "config": cfg.to_json_dict(),
        "weights": weights,
        **what,
        "seeds": seeds,
        "steps": int(steps),
        "cfg_scale": float(cfg_scale),
        "cfg_schedule": cfg_schedule,
        "batch_size": batch_size,
        "policy": policy.to_json(),
        "head_evaluations": recording.head_evaluations,
        "producer": recording.producer,
    }
    cset = CalibrationSet(
        key,
        recording.samples(),
        recording.candidates(),
        phase_candidates=recording.phase_candidates(),
        origin=dict(origin or {}),
    )
    return Capture(cset, results)

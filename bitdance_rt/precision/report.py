"""Fidelity of a reduced-precision backend against the FP32 one, measured on real trajectories.

`compare` drives two backends (any two: FP32 ONNX Runtime vs INT8 ONNX Runtime, torch vs
TensorRT FP16, ...) through the same generations in lockstep, under teacher forcing: at every AR
step both get the reference's history (tokens) and the same noise, so each number isolates one
stage instead of compounding earlier disagreements:

- prefill / backbone_step: error of the head conditions (max, mean abs), and the token bit
  agreement when the test backbone's conditions go through the reference head sampler;
- head: token bit agreement of the test head sampler on the reference's conditions;
- end to end, teacher forced: the test backbone and test head on the reference history;
- decoder: PSNR (and max error) of the test decoder's image of the reference latent;
- free running: two ordinary generations with the same seed (token agreement, image PSNR):
  what a user sees, where one early flip changes everything after it.

`Lockstep` is a backend over the two, so the generation loop itself (runtime/loop.py) drives the
comparison: rows, CFG per step and noise order are exactly those of a generation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..runtime import generate_batched
from ..sampling import SeededNoise


@dataclass
class Agreement:
    same: int = 0
    total: int = 0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.same += int((a == b).sum())
        self.total += a.numel()

    @property
    def value(self) -> float:
        return self.same / self.total if self.total else float("nan")


@dataclass
class Error:
    max: float = 0.0
    abs_sum: float = 0.0
    count: int = 0

    def add(self, ref: torch.Tensor, test: torch.Tensor) -> None:
        d = (test.float() - ref.float()).abs()
        self.max = max(self.max, float(d.max()))
        self.abs_sum += float(d.sum())
        self.count += d.numel()

    @property
    def mean(self) -> float:
        return self.abs_sum / self.count if self.count else float("nan")


def psnr(ref: torch.Tensor, test: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), both clamped to that range."""
    mse = float(((test.clamp(-1, 1) - ref.clamp(-1, 1)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


@dataclass
class Comparison:
    cond: dict[str, Error] = field(default_factory=lambda: {"prefill": Error(), "backbone_step": Error()})
    bits: dict[str, Agreement] = field(default_factory=lambda: {
        k: Agreement() for k in ("prefill", "backbone_step", "head", "end_to_end_teacher_forced")})
    decoder_psnr: list[float] = field(default_factory=list)
    decoder: Error = field(default_factory=Error)
    free_bits: Agreement = field(default_factory=Agreement)
    free_psnr: list[float] = field(default_factory=list)

    def to_json(self) -> dict:
        def db(values):
            finite = [v for v in values if math.isfinite(v)]
            return min(values) if values and not finite else (min(finite) if finite else None)

        return {
            "teacher_forced": {
                "prefill": {"bit_agreement": self.bits["prefill"].value, "cond_max_abs_err": self.cond["prefill"].max,
                            "cond_mean_abs_err": self.cond["prefill"].mean},
                "backbone_step": {"bit_agreement": self.bits["backbone_step"].value,
                                  "cond_max_abs_err": self.cond["backbone_step"].max,
                                  "cond_mean_abs_err": self.cond["backbone_step"].mean},
                "head": {"bit_agreement": self.bits["head"].value, "bits": self.bits["head"].total},
                "end_to_end": {"bit_agreement": self.bits["end_to_end_teacher_forced"].value},
                "decoder": {"psnr_db_min": db(self.decoder_psnr),
                            "psnr_db_mean": (sum(self.decoder_psnr) / len(self.decoder_psnr)
                                             if self.decoder_psnr and all(map(math.isfinite, self.decoder_psnr))
                                             else db(self.decoder_psnr)),
                            "max_abs_err": self.decoder.max, "mean_abs_err": self.decoder.mean},
            },
            "free_running": {"bit_agreement": self.free_bits.value, "image_psnr_db_min": db(self.free_psnr)},
        }


class Lockstep:
    """A Backend that runs `ref` and `test` side by side and records how `test` departs from `ref`.

    Driven by the ordinary loop (runtime/loop.py, one request alone through the scheduler's row-level
    calls), it returns the reference's values, so the loop feeds both backends the reference
    history (teacher forcing) and the same noise."""

    def __init__(self, ref, test, out: "Comparison"):
        self.ref, self.test, self.out = ref, test, out
        self.config = ref.config
        self.name = f"{ref.name} vs {test.name}"
        sizes = [b for b in (ref.max_rows, test.max_rows) if b]
        self.max_rows = min(sizes) if sizes else None
        self.max_batch = None if self.max_rows is None else self.max_rows // 2
        self._stage, self._cond_test = "prefill", None

    def _conds(self, stage: str, cond_ref, cond_test):
        self.out.cond[stage].add(cond_ref, cond_test)
        self._stage, self._cond_test = stage, cond_test
        return cond_ref

    def prefill_rows(self, rows, slots):
        return self._conds("prefill", self.ref.prefill_rows(rows, slots), self.test.prefill_rows(rows, slots))

    def step_rows(self, tokens, starts, write):
        return self._conds("backbone_step", self.ref.step_rows(tokens, starts, write),
                           self.test.step_rows(tokens, starts, write))

    def sample_rows(self, cond, noise, cfg, cond_row, uncond_row):
        ref, test, bits = self.ref, self.test, self.out.bits
        guidance = (cfg, cond_row, uncond_row)
        tokens = ref.sample_rows(cond, noise, *guidance)
        bits[self._stage].add(tokens, ref.sample_rows(self._cond_test, noise, *guidance))
        bits["head"].add(tokens, test.sample_rows(cond, noise, *guidance))
        bits["end_to_end_teacher_forced"].add(tokens, test.sample_rows(self._cond_test, noise, *guidance))
        return tokens

    def decode(self, latent):
        image_ref, image_test = self.ref.decode(latent).float().cpu(), self.test.decode(latent).float().cpu()
        self.out.decoder.add(image_ref, image_test)
        self.out.decoder_psnr.extend(psnr(a, b) for a, b in zip(image_ref, image_test))
        return image_ref


def compare(ref, test, labels, seeds, steps: int, scale: float, schedule: str = "linear",
            batch_size: int = 8, free_running: bool = True) -> Comparison:
    """Lockstep comparison of backend `test` against `ref` over labels x seeds (see the module doc)."""
    out = Comparison()
    labels = list(labels)
    for seed in seeds:
        generate_batched(Lockstep(ref, test, out), labels, steps, scale, schedule, SeededNoise(seed),
                         batch_size=batch_size)
        if free_running:
            a = generate_batched(ref, labels, steps, scale, schedule, SeededNoise(seed), batch_size=batch_size)
            b = generate_batched(test, labels, steps, scale, schedule, SeededNoise(seed), batch_size=batch_size)
            out.free_bits.add(a.tokens, b.tokens)
            out.free_psnr += [psnr(x, y) for x, y in zip(a.image, b.image)]
    return out

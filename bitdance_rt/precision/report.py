"""Fidelity of a reduced-precision backend against the FP32 one, measured on real trajectories.

`compare` drives two backends (any two stage backends: FP32 ONNX Runtime vs INT8 ONNX Runtime,
torch vs TensorRT FP16, ...) through the same generations in lockstep, under teacher forcing: at
every AR step both get the reference's history (tokens) and the same noise, and within a call the
stages are swapped one at a time (runtime/core.py's `_run`, see `_replaced`), so each number
isolates one stage instead of compounding earlier disagreements (`Comparison` lists the numbers).
`Lockstep` is a backend over the two, so the generation loop itself (runtime/loop.py) drives the
comparison: rows, CFG per step and noise order are exactly those of a generation.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from .. import stages as st
from ..errors import BitDanceError
from ..runtime import generate_batched
from ..sampling import SeededNoise

PHASES = ("prefill", "step")  # the backbone's (stages.backbone_phases)
# measured per row-level call: the embedding, the backbone (per phase) and everything of the test backend
MEASURED = ("prefix_embed", "token_embed", "backbone.prefill", "backbone.step", "end_to_end")


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
    """What `compare` measures. For each stage, the error of the head conditions (max, mean abs) and
    the token bit agreement when those conditions go through the reference head sampler:

    - prefix_embed / token_embed: the test embedding of the prefill / of the fed-back tokens, through
      the reference backbone;
    - backbone: the test backbone on the reference embeddings, over a cache of its own keys of them,
      per phase (prefill, step) and over both: one graph serves both phases;
    - head: token bit agreement of the test head sampler on the reference's conditions;
    - end to end, teacher forced: the test embeddings, backbone and head on the reference history;
    - decoder: PSNR (and max error) of the test decoder's image of the reference latent;
    - free running: two ordinary generations with the same seed (token agreement, image PSNR):
      what a user sees, where one early flip changes everything after it."""

    cond: dict[str, Error] = field(default_factory=lambda: {k: Error() for k in MEASURED})
    bits: dict[str, Agreement] = field(default_factory=lambda: {k: Agreement() for k in (*MEASURED, "head")})
    decoder_psnr: list[float] = field(default_factory=list)
    decoder: Error = field(default_factory=Error)
    free_bits: Agreement = field(default_factory=Agreement)
    free_psnr: list[float] = field(default_factory=list)

    def _stage(self, *keys: str) -> dict:
        """Bit agreement and condition error of the measurements `keys`, pooled."""
        bits = Agreement(sum(self.bits[k].same for k in keys), sum(self.bits[k].total for k in keys))
        err = Error(
            max(self.cond[k].max for k in keys),
            sum(self.cond[k].abs_sum for k in keys),
            sum(self.cond[k].count for k in keys),
        )
        return {
            "bit_agreement": bits.value,
            "bits": bits.total,
            "cond_max_abs_err": err.max,
            "cond_mean_abs_err": err.mean,
        }

    def to_json(self) -> dict:
        def db(values):
            finite = [v for v in values if math.isfinite(v)]
            return min(values) if values and not finite else (min(finite) if finite else None)

        backbone = [f"backbone.{p}" for p in PHASES]
        return {
            "teacher_forced": {
                "prefix_embed": self._stage("prefix_embed"),
                "token_embed": self._stage("token_embed"),
                "backbone": {**self._stage(*backbone), "phases": {p: self._stage(f"backbone.{p}") for p in PHASES}},
                "head": {"bit_agreement": self.bits["head"].value, "bits": self.bits["head"].total},
                "end_to_end": self._stage("end_to_end"),
                "decoder": {
                    "psnr_db_min": db(self.decoder_psnr),
                    "psnr_db_mean": (
                        sum(self.decoder_psnr) / len(self.decoder_psnr)
                        if self.decoder_psnr and all(map(math.isfinite, self.decoder_psnr))
                        else db(self.decoder_psnr)
                    ),
                    "max_abs_err": self.decoder.max,
                    "mean_abs_err": self.decoder.mean,
                },
            },
            "free_running": {"bit_agreement": self.free_bits.value, "image_psnr_db_min": db(self.free_psnr)},
        }


def _padded(feeds: dict, rows: int) -> dict:
    """Feeds with their first dim padded to `rows` by repeating row 0 (any valid input; dropped)."""
    return {k: torch.cat([v, v[:1].expand(rows - v.shape[0], *v.shape[1:])]) for k, v in feeds.items()}


def _embed(backend, stage: str, feeds: dict, rows: int) -> torch.Tensor:
    """`backend`'s embedding stage on the call's inputs (padded to its row bucket, as the core
    runs it) -> x of the `rows` real rows, a CPU copy."""
    names = st.stage_spec(stage, backend.config).input_names
    run = _padded({k: feeds[k] for k in names}, backend.bucket(rows))
    return backend.run_stage(stage, run)["x"][:rows].detach().float().cpu().clone()


@contextlib.contextmanager
def _replaced(backend, stage: str, x: torch.Tensor):
    """Within the block, `backend`'s stage `stage` returns `x` (padded to the rows asked).

    This one replaces the backend's `_run` instead of using a stage observer (runtime/core.py's
    `add_observer`), on purpose: observers only see a stage run, while the lockstep comparison
    must change what the stage returns (the other backend's embedding goes into this backend's
    backbone). The block is short and puts the class's method (or the instance's own) back."""
    run, own = backend._run, backend.__dict__.get("_run")

    def replaced(name, feeds, phase=None):
        if name != stage:
            return run(name, feeds, phase)
        return {"x": _padded({"x": x}, next(iter(feeds.values())).shape[0])["x"]}

    backend._run = replaced
    try:
        yield
    finally:
        if own is None:
            del backend._run
        else:
            backend._run = own


def _copy(cond: torch.Tensor) -> torch.Tensor:
    return cond.detach().float().cpu().clone()  # (a backend may hand out a buffer it reuses)


class Lockstep:
    """A Backend that runs `ref` and `test` side by side and records how `test` departs from `ref`.

    Driven by the ordinary loop (runtime/loop.py, one request alone through the scheduler's row-level
    calls), it returns the reference's values, so the loop feeds both backends the reference
    history (teacher forcing) and the same noise. Per row-level call:
    - the reference runs on the test embedding without keeping its keys (no cache write at a step,
      rewritten at the prefill), then as it is;
    - the test runs ONE call over twice the rows: the request's rows as they are (end to end), and a
      twin of each row, in the cache slots after the request's, on the reference embedding. So
      each twin's cache holds the test backbone's keys of reference embeddings: the backbone is
      measured without the test embedding's errors in its history. (Hence half the rows per call.)"""

    def __init__(self, ref, test, out: "Comparison"):
        for b in (ref, test):
            if not (hasattr(b, "run_stage") and hasattr(b, "bucket")):
                raise BitDanceError(
                    f"compare: {getattr(b, 'name', b)!r} is not a stage backend (runtime/core.py): "
                    "its stages cannot be compared one by one"
                )
        self.ref, self.test, self.out = ref, test, out
        self.config = ref.config
        self.name = f"{ref.name} vs {test.name}"
        sizes = [b for b in (ref.max_rows, test.max_rows) if b]
        self.max_rows = min(sizes) // 2 if sizes else None  # the test's twins take the other half
        self.max_batch = None if self.max_rows is None else self.max_rows // 2
        self._conds: dict[str, torch.Tensor] = {}
        self._twin = 0  # slot of row 0's twin: the rows of the request prefilled last

    def _record(self, cond_ref, conds: dict):
        for key, cond in conds.items():
            self.out.cond[key].add(cond_ref, cond)
        self._conds = conds
        return cond_ref

    def prefill_rows(self, rows, slots):
        ref, test, m = self.ref, self.test, len(slots)
        feeds = dict(rows) if isinstance(rows, dict) else {"labels": rows}
        feeds = {k: torch.as_tensor(v).to(torch.int64).cpu() for k, v in feeds.items()}
        x_ref, x_test = _embed(ref, st.PREFIX_EMBED, feeds, m), _embed(test, st.PREFIX_EMBED, feeds, m)
        with _replaced(ref, st.PREFIX_EMBED, x_test):
            embed = _copy(ref.prefill_rows(feeds, slots))
        cond_ref = _copy(ref.prefill_rows(feeds, slots))  # (after: it leaves the reference cache right)
        self._twin = max(slots) + 1
        twins = {k: torch.cat([v, v]) for k, v in feeds.items()}
        with _replaced(test, st.PREFIX_EMBED, torch.cat([x_test, x_ref])):
            both = _copy(test.prefill_rows(twins, [*slots, *(s + self._twin for s in slots)]))
        return self._record(cond_ref, {"prefix_embed": embed, "backbone.prefill": both[m:], "end_to_end": both[:m]})

    def step_rows(self, tokens, starts, write):
        ref, test, n = self.ref, self.test, int(tokens.shape[0])
        if n > self._twin:
            raise BitDanceError("compare: rows stepped that were not prefilled last (one request at a time)")
        starts, write = [int(s) for s in starts], [bool(w) for w in write]
        feeds = {"tokens": tokens.float().cpu(), "start": torch.tensor(starts, dtype=torch.int64)}
        x_ref, x_test = _embed(ref, st.TOKEN_EMBED, feeds, n), _embed(test, st.TOKEN_EMBED, feeds, n)
        with _replaced(ref, st.TOKEN_EMBED, x_test):
            embed = _copy(ref.step_rows(tokens, starts, [False] * n))
        cond_ref = _copy(ref.step_rows(tokens, starts, write))
        # rows [0, n) as they are, their twins at [twin, twin + n) on the reference embedding
        gap, lo = self._twin - n, self.config.prefix_len
        twins = torch.cat([tokens, tokens.new_zeros(gap, *tokens.shape[1:]), tokens])
        x = torch.cat([x_test, x_test[:1].expand(gap, *x_test.shape[1:]), x_ref])
        with _replaced(test, st.TOKEN_EMBED, x):
            both = _copy(test.step_rows(twins, starts + [lo] * gap + starts, write + [False] * gap + write))
        return self._record(
            cond_ref, {"token_embed": embed, "backbone.step": both[self._twin :], "end_to_end": both[:n]}
        )

    def sample_rows(self, cond, noise, cfg, cond_row, uncond_row):
        ref, test, bits = self.ref, self.test, self.out.bits
        guidance = (cfg, cond_row, uncond_row)
        tokens = ref.sample_rows(cond, noise, *guidance)
        for key, measured in self._conds.items():  # the stage's conditions through the reference head
            sampler = test if key == "end_to_end" else ref
            bits[key].add(tokens, sampler.sample_rows(measured, noise, *guidance))
        bits["head"].add(tokens, test.sample_rows(cond, noise, *guidance))
        return tokens

    def decode(self, latent):
        image_ref, image_test = self.ref.decode(latent).float().cpu(), self.test.decode(latent).float().cpu()
        self.out.decoder.add(image_ref, image_test)
        self.out.decoder_psnr.extend(psnr(a, b) for a, b in zip(image_ref, image_test))
        return image_ref


def compare(
    ref,
    test,
    labels,
    seeds,
    steps: int,
    scale: float,
    schedule: str = "linear",
    batch_size: int = 8,
    free_running: bool = True,
    ref_runs: dict | None = None,
) -> Comparison:
    """Lockstep comparison of backend `test` against `ref` over labels (or a text-to-image model's
    encoded prompts, runtime/conditions.py) x seeds (see the module doc and `Comparison`). `ref_runs`:
    a dict that keeps `ref`'s free-running generations by seed, for comparing several backends with it."""
    ref_runs = {} if ref_runs is None else ref_runs
    out = Comparison()
    labels = labels if hasattr(labels, "rows") else list(labels)
    for seed in seeds:
        lock = Lockstep(ref, test, out)
        size = batch_size if lock.max_batch is None else min(batch_size, lock.max_batch)  # (the twins' rows)
        generate_batched(lock, labels, steps, scale, schedule, SeededNoise(seed), batch_size=size)
        if free_running:
            if seed not in ref_runs:  # (the same for every backend compared with `ref`)
                ref_runs[seed] = generate_batched(
                    ref, labels, steps, scale, schedule, SeededNoise(seed), batch_size=batch_size
                )
            a = ref_runs[seed]
            b = generate_batched(test, labels, steps, scale, schedule, SeededNoise(seed), batch_size=batch_size)
            out.free_bits.add(a.tokens, b.tokens)
            out.free_psnr += [psnr(x, y) for x, y in zip(a.image, b.image)]
    return out

"""The core every backend shares: stage checks, the KV cache as row slots, cache writes, sampler
choice, row padding and batch limits. Backends (torch, onnxruntime, tensorrt) differ only in how
they run one stage (`_run`) and where the cache lives (`_alloc_cache`), so the scheduler, and
calibration and the accuracy report, which wrap its row-level calls, work on every backend alike
(StageBackend lists the calls: row level and batch level). (Over 400 lines: StageBackend is one
class, the core under every backend; its row- and batch-level calls share one cache and its checks.)

Every stage run goes through `run_stage`, which hands it to the backend's stage observers
(timing, calibration capture) after it ran. Every call runs at least MIN_ROWS rows, and the
scheduler pads its calls to `row_bucket` sizes, so that a row's result never depends on how many
rows share its call (see MIN_ROWS) and TensorRT runs a few fixed shapes (captured CUDA graphs stay
valid).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .. import stages as st
from ..errors import BitDanceError
from ..models.kv_cache import write_rows
from ..sampling import batch_layout, sample_tokens_rows
from .conditions import row_count

# PyTorch's CPU GEMM (MKL) rounds the rows of some small products differently from the same rows in
# a larger product (measured, Linear 256->768: M = 1-3 on AVX-512; M = 1-3 and 5-7 with AVX2
# kernels, under an emulated EPYC-Milan; ONNX Runtime's MLAS gives every M the same bits). Padding
# every call to a bucket size (all multiples of 4 that both kinds agree on) makes a request's tokens
# independent of what shares its batch on every backend.
MIN_ROWS = 4
SAMPLER_MODES = ("auto", "fused", "step")


def check_generation_stages(specs: dict, where) -> None:
    """An export (or engine set) can generate: the embeddings, the backbone, the decoder, and a head sampler
    (the fused graph, or head_step for the step-by-step sampler)."""
    missing = [s for s in st.REQUIRED_STAGES if s not in specs]
    if missing or not (st.HEAD_STEP in specs or st.HEAD_SAMPLER in specs):
        raise BitDanceError(
            f"{where} lacks stage(s) {', '.join(missing) or 'head_sampler (or head_step)'} needed "
            "for generation; re-export with all stages"
        )


BUCKETS = (4, 8, 12, 16, 24, 32)  # then multiples of 16


def row_bucket(rows: int, max_rows: int | None) -> int:
    """The padded row count of a call with `rows` rows: 4, 8, 12, 16, 24, 32, 48, 64, ... capped at
    max_rows. Few sizes (TensorRT captures one CUDA graph per size) that waste at most a third of a
    call on padding rows; without a cap (torch) calls past the table keep multiples of 16."""
    if max_rows is not None and rows > max_rows:
        raise BitDanceError(
            f"{rows} rows are outside the exported range [1, {max_rows}] (2 rows per image, max "
            f"batch {max_rows // 2}); re-export with a larger max batch"
        )
    size = next((b for b in BUCKETS if b >= rows), -(-rows // 16) * 16)
    return size if max_rows is None else min(size, max_rows)


def _pad_rows(x: torch.Tensor, rows: int, fill=0) -> torch.Tensor:
    """x with its first dim padded to `rows` (dummy rows of `fill`)."""
    if x.shape[0] >= rows:
        return x
    pad = torch.full((rows - x.shape[0], *x.shape[1:]), fill, dtype=x.dtype, device=x.device)
    return torch.cat([x, pad])


@dataclass(frozen=True)
class StageCall:
    """One stage run, as a stage observer gets it (after the run). `feeds`: the contract-named
    inputs exactly as the core built them (the padding rows of the call's row bucket included; the
    cache inputs are views of the live cache); `phase`: the backbone's ("prefill" / "step"), None
    for other stages; `outputs`: by contract name (a backend may hand out a buffer it reuses, such
    as ONNX Runtime's `kv_new`: copy what you keep); `seconds`: wall-clock time of the run.
    Observers must change neither feeds nor outputs."""

    stage: str
    phase: str | None
    feeds: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    seconds: float

    @property
    def graph(self) -> str:
        """The report name of the run: the stage, and the phase of a stage that has phases."""
        return self.stage if self.phase is None else f"{self.stage}.{self.phase}"


StageObserver = Callable[[StageCall], None]


class StageBackend:
    """Shared core; subclasses set name, config, specs (or None: any stage), sampler_steps and
    max_rows, and implement `_run` and `_alloc_cache`.

    Two levels of calls:
    - row level, for the continuous-batching scheduler: `prefill_rows` (new rows into free cache
      slots), `step_rows` (one backbone call over cache rows [0, n), each row at its own position),
      `sample_rows` (one head call, each row with its own guidance), `decode`;
    - batch level, one generation in the official row layout (conditional rows, then unconditional):
      `prefill`, `step`, `sample_tokens`; tests and benchmarks drive these (calibration and the
      teacher-forced accuracy report wrap the row-level calls instead, under the scheduler).
    Stage observers (`add_observer` / `observe`: timing, calibration capture) see each run's stage,
    phase, inputs, outputs and duration (StageCall) without replacing any method."""

    name = "backend"
    sampler = "auto"
    sampler_steps: int | None = None  # S of the fused head_sampler graph; None: any S (torch)
    # replaced, never mutated: a thread running a stage iterates the tuple it read
    _observers: tuple[StageObserver, ...] = ()

    def _init_core(self, max_rows: int | None) -> None:
        self.max_rows = None if max_rows is None else int(max_rows)
        self._kv: torch.Tensor | None = None
        self._context: dict[str, torch.Tensor] = {}  # per-slot inputs fixed at prefill (T2I: pad)
        self._batch_rows = 0  # rows of the running batch-level generation
        self._prefix_names = st.stage_spec(st.PREFIX_EMBED, self.config).input_names

    # ---- what a backend implements ------------------------------------------------------
    def _run(self, stage: str, feeds: dict[str, torch.Tensor], phase: str | None = None) -> dict[str, torch.Tensor]:
        """Run one stage on contract-named inputs; outputs by contract name (on the CPU or device).
        `phase`: the backbone's call ("prefill" or "step", stages.backbone_phases); None otherwise."""
        raise NotImplementedError

    def _alloc_cache(self, rows: int) -> torch.Tensor:
        return torch.zeros(st.kv_shape(self.config, rows), dtype=torch.float32)

    def has_stage(self, stage: str) -> bool:
        return self.specs is None or stage in self.specs

    # ---- stage observers ------------------------------------------------------------------
    def run_stage(
        self, stage: str, feeds: dict[str, torch.Tensor], phase: str | None = None
    ) -> dict[str, torch.Tensor]:
        """Run one stage (`_run`), then hand a StageCall to every observer, in the calling thread.
        Every stage run of the core goes through here."""
        observers = self._observers
        if not observers:
            return self._run(stage, feeds, phase)
        start = time.perf_counter()
        outputs = self._run(stage, feeds, phase)
        call = StageCall(stage, phase, feeds, outputs, time.perf_counter() - start)
        for observer in observers:
            observer(call)
        return outputs

    @property
    def observers(self) -> tuple[StageObserver, ...]:
        return self._observers

    def add_observer(self, observer: StageObserver) -> None:
        """Call `observer(call: StageCall)` after every stage run of this backend (until removed)."""
        self._observers = (*self._observers, observer)

    def remove_observer(self, observer: StageObserver) -> None:
        """Stop calling `observer` (ValueError when it was not added)."""
        observers = list(self._observers)
        observers.remove(observer)
        self._observers = tuple(observers)

    @contextlib.contextmanager
    def observe(self, observer: StageObserver):
        """`observer` added for the duration of the block."""
        self.add_observer(observer)
        try:
            yield self
        finally:
            self.remove_observer(observer)

    def close(self) -> None:
        """Release what the backend holds (cache; subclasses: sessions, engines) before the
        interpreter exits: runtimes torn down by their static destructors while their thread
        pools still run abort the process ("terminate called without an active exception")."""
        self._kv = None
        self._context = {}

    # ---- limits -------------------------------------------------------------------------
    @property
    def max_batch(self) -> int | None:
        """Most images one generation may hold (every image has 2 rows with CFG); None: no limit."""
        return None if self.max_rows is None else self.max_rows // 2

    def bucket(self, rows: int) -> int:
        return row_bucket(rows, self.max_rows)

    # ---- the cache as slots ---------------------------------------------------------------
    def ensure_cache(self, rows: int) -> torch.Tensor:
        """A cache of at least `rows` slots (grown by copying; TensorRT allocates all at once)."""
        if self._kv is None or self._kv.shape[2] < rows:
            floor = MIN_ROWS if self.max_rows is None else min(MIN_ROWS, self.max_rows)  # (a max batch of 1: 2 rows)
            kv = self._alloc_cache(self.bucket(max(rows, floor)))
            if self._kv is not None:
                kv[:, :, : self._kv.shape[2]] = self._kv
            self._kv = kv
            for name, values in self._context.items():
                self._context[name] = _pad_rows(values, kv.shape[2])
        return self._kv

    @property
    def kv_cache(self) -> torch.Tensor | None:
        """The cache the graphs read (for inspection and tests): the running batch's rows."""
        return None if self._kv is None else self._kv[:, :, : self._batch_rows or self._kv.shape[2]]

    def kv_rows(self, slots) -> torch.Tensor:
        """The cache rows of `slots` [n_layer, 2, len(slots), heads, L, head_dim] (a copy, for inspection)."""
        return self._kv[:, :, torch.as_tensor(list(slots), dtype=torch.int64, device=self._kv.device)]

    def clear_rows(self, slots) -> None:
        """Zero the cache rows of `slots` (a request's rows at admission)."""
        index = torch.as_tensor(list(slots), dtype=torch.int64, device=self._kv.device)
        self._kv.index_fill_(2, index, 0.0)

    def _cache_feeds(self, rows: int) -> dict[str, torch.Tensor]:
        kv = self._kv
        return {name: kv[i // 2, i % 2, :rows] for i, name in enumerate(st.cache_input_names(self.config))}

    # ---- row level (the scheduler) --------------------------------------------------------
    def prefill_rows(self, inputs, slots) -> torch.Tensor:
        """Prefill inputs of m new rows (labels [m], or a dict of named inputs) into cache `slots`
        -> head conditions of their AR step 0 [m, P, dim]."""
        slots = [int(s) for s in slots]
        feeds = dict(inputs) if isinstance(inputs, dict) else {"labels": inputs}
        feeds = {k: torch.as_tensor(v).to(torch.int64).cpu() for k, v in feeds.items()}
        m = row_count(feeds)
        if m != len(slots):
            raise BitDanceError(f"prefill_rows: {m} rows of inputs for {len(slots)} cache slots")
        missing = [k for k in self._prefix_names + st.step_context_names(self.config) if k not in feeds]
        if missing:
            raise BitDanceError(f"prefill_rows: inputs {', '.join(missing)} missing (got {', '.join(feeds) or 'none'})")
        self._check_prefill(feeds)
        self.ensure_cache(max(slots) + 1)
        padded = self.bucket(m)
        # dummy rows repeat row 0 (any valid input; their results are dropped)
        run = {k: torch.cat([v, v[:1].expand(padded - m, *v.shape[1:])]) for k, v in feeds.items()}
        embed = {k: run[k] for k in self._prefix_names}
        x = self.run_stage(st.PREFIX_EMBED, embed)["x"]
        context = {name: run[name] for name in st.step_context_names(self.config)}  # text-to-image: pad
        # the cache rows the call reads are any `padded` slots: with start 0 every cached key is hidden
        out = self.run_stage(
            st.BACKBONE,
            {"x": x, "start": torch.zeros(padded, dtype=torch.int64), **context, **self._cache_feeds(padded)},
            phase="prefill",
        )
        self.clear_rows(slots)  # the rows start clean, whatever their last owner left there
        write_rows(self._kv, out["kv_new"][:, :, :m].to(self._kv.device), slots, 0)
        for name in context:  # inputs the backbone steps need again
            ctx = self._context.setdefault(name, torch.zeros(self._kv.shape[2], dtype=torch.int64))
            ctx[torch.tensor(slots)] = feeds[name]
        return out["cond"][:m].float().cpu()

    def _check_prefill(self, feeds: dict[str, torch.Tensor]) -> None:
        for name, top, why in (
            ("labels", "num_classes", "the last is the null class"),
            ("pad", "max_text_tokens", "max_text_tokens"),
        ):
            x = feeds.get(name)
            if x is not None and x.numel() and not (0 <= int(x.min()) and int(x.max()) <= getattr(self.config, top)):
                raise BitDanceError(f"{name} must lie in [0, {getattr(self.config, top)}] ({why})")

    def step_context(self, name: str, rows: int) -> torch.Tensor:
        """The per-slot input `name` fixed at prefill (text-to-image: pad) of slots [0, rows)."""
        return self._context[name][:rows]

    def step_rows(self, tokens: torch.Tensor, starts, write) -> torch.Tensor:
        """One backbone call over cache rows [0, n): tokens [n, P, C] of each row's previous AR step,
        `starts` [n] each row's cache position, `write` [n] which rows' keys/values to store (the
        others are padding or rows prefilled this very iteration) -> conditions [n, P, dim]."""
        n = int(tokens.shape[0])
        starts = [int(s) for s in starts]
        write = [bool(w) for w in write]
        if self._kv is None or self._kv.shape[2] < n:
            raise BitDanceError(f"step_rows over {n} rows before those cache slots were prefilled")
        lo, hi = self.config.prefix_len, self.config.max_seq_len - self.config.parallel_num
        bad = [s for s in starts if not lo <= s <= hi]
        if bad:
            raise BitDanceError(f"step_rows: start(s) {bad} outside the fed positions [{lo}, {hi}] of this model")
        padded = self.bucket(n)
        self.ensure_cache(padded)
        start = _pad_rows(torch.tensor(starts, dtype=torch.int64), padded, lo)
        feeds = {
            "x": self.run_stage(st.TOKEN_EMBED, {"tokens": _pad_rows(tokens.float().cpu(), padded)})["x"],
            "start": start,
        }
        for name, values in self._context.items():
            feeds[name] = values[:padded]
        feeds.update(self._cache_feeds(padded))
        out = self.run_stage(st.BACKBONE, feeds, phase="step")
        keep = [i for i, w in enumerate(write) if w]
        if keep:
            new = out["kv_new"].to(self._kv.device)
            write_rows(self._kv, new[:, :, keep] if len(keep) < padded else new, keep, [starts[i] for i in keep])
        return out["cond"][:n].float().cpu()

    def sample_rows(self, cond: torch.Tensor, noise: torch.Tensor, cfg, cond_row, uncond_row) -> torch.Tensor:
        """One head call: cond [m, P, dim], noise [S+1, m, P, C], per-row guidance (sampling.sample_rows)
        -> +/-1 tokens [m, P, C]."""
        m = int(cond.shape[0])
        steps = int(noise.shape[0]) - 1
        p, c = self.config.parallel_num, self.config.token_dim
        if steps < 1 or tuple(noise.shape[1:]) != (m, p, c):
            raise BitDanceError(
                f"sample_rows: noise {list(noise.shape)} does not fit cond {list(cond.shape)}: "
                f"want [S+1, {m}, {p}, {c}]"
            )
        cfg = torch.as_tensor(cfg, dtype=torch.float32).reshape(-1)
        cond_row = torch.as_tensor(cond_row, dtype=torch.int64).reshape(-1)
        uncond_row = torch.as_tensor(uncond_row, dtype=torch.int64).reshape(-1)
        if not (cfg.shape[0] == cond_row.shape[0] == uncond_row.shape[0] == m):
            raise BitDanceError(f"sample_rows: cfg / cond_row / uncond_row need {m} values each")
        rows = torch.cat([cond_row, uncond_row])
        if m and (int(rows.min()) < 0 or int(rows.max()) >= m):
            raise BitDanceError(f"sample_rows: cond_row / uncond_row must index rows 0..{m - 1}")
        padded = self.bucket(m)
        own = torch.arange(m, padded)
        feeds = {
            "cond": _pad_rows(cond.float().cpu(), padded),
            "noise": torch.cat([noise.float().cpu(), noise.new_zeros(steps + 1, padded - m, p, c)], dim=1),
            "cfg": _pad_rows(cfg, padded, 1.0),
            "cond_row": torch.cat([cond_row, own]),
            "uncond_row": torch.cat([uncond_row, own]),
        }
        if self._use_fused(steps):
            return self.run_stage(st.HEAD_SAMPLER, feeds)["tokens"][:m].float().cpu()
        net = self._head_net(padded)
        with torch.no_grad():
            tokens = sample_tokens_rows(
                net,
                feeds["cond"],
                feeds["noise"],
                feeds["cfg"],
                feeds["cond_row"],
                feeds["uncond_row"],
                self.config.time_shift,
            )
        return tokens[:m].float().cpu()

    def _use_fused(self, steps: int) -> bool:
        have = self.has_stage(st.HEAD_SAMPLER) and self.sampler_steps in (None, steps)
        if self.sampler == "fused" or (self.sampler == "auto" and have):
            if not have:
                raise BitDanceError(
                    f"{self._where()}: no fused head sampler for S={steps} (exported "
                    f"S={self.sampler_steps}); re-export with sampler steps {steps}"
                )
            return True
        if not self.has_stage(st.HEAD_STEP):
            raise BitDanceError(
                f"{self._where()}: the fused head sampler has S={self.sampler_steps}, this generation "
                f"asks S={steps}, and there is no head_step graph; re-export with sampler steps {steps}"
            )
        return False

    def _head_net(self, rows: int):
        """The head net as a callable (x, t, cond) for the step-by-step sampler."""

        def net(x, t, cond):
            return self.run_stage(st.HEAD_STEP, {"x": x, "t": t, "cond": cond})["x_pred"].float().cpu()

        return net

    def _where(self) -> str:
        return str(getattr(self, "dir", self.name))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """+/-1 latent [B, C, h, w] -> image [B, 3, H, W] in about [-1, 1]."""
        return self._simple(st.DECODER, "latent", "image", latent)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image [B, 3, H, W] in [-1, 1] -> +/-1 latent [B, C, h, w] (needs the encoder stage)."""
        return self._simple(st.ENCODER, "image", "latent", image)

    def _simple(self, stage: str, in_name: str, out_name: str, x: torch.Tensor) -> torch.Tensor:
        if not self.has_stage(stage):
            raise BitDanceError(f"{self._where()} has no {stage} stage; re-export with it")
        return self.run_stage(stage, {in_name: x.float().cpu()})[out_name].float().cpu()

    # ---- batch level (one generation, official row layout) -----------------------------------
    def prefill(self, rows) -> torch.Tensor:
        """Start a generation of R rows: labels [R] (or named prefill inputs) -> conditions [R, P, dim]."""
        n = row_count(rows)
        self.ensure_cache(n).zero_()
        self._batch_rows = n
        return self.prefill_rows(rows, range(n))

    def step(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """Feed the tokens [R, P, C] of AR step `step`-1 of the running generation."""
        if not self._batch_rows:
            raise BitDanceError("step() before prefill(): start every generation with prefill")
        if int(tokens.shape[0]) != self._batch_rows:
            raise BitDanceError(
                f"step(): {tokens.shape[0]} token rows, but the cache was prefilled with {self._batch_rows}"
            )
        start = st.step_start(self.config, int(step))
        return self.step_rows(tokens, [start] * self._batch_rows, [True] * self._batch_rows)

    def sample_tokens(self, cond: torch.Tensor, noise: torch.Tensor, cfg: float, guided: bool) -> torch.Tensor:
        """Head sampling of one AR step of the batch: noise [S+1, draw rows, P, C] -> tokens [R, P, C]."""
        rows = int(cond.shape[0])
        want = (rows // 2 if guided else rows, self.config.parallel_num, self.config.token_dim)
        if int(noise.shape[0]) < 2 or tuple(noise.shape[1:]) != want or (guided and rows % 2):
            raise BitDanceError(
                f"sample_tokens: noise {list(noise.shape)} does not fit cond {list(cond.shape)} "
                f"({'guided' if guided else 'unguided'}): want [S+1, {', '.join(map(str, want))}]"
            )
        return self.sample_rows(cond, *batch_layout(rows, noise, cfg, guided))

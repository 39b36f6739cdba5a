"""Continuous batching: one loop that runs every active request's AR step in one backbone call
and one head call, whatever step each is at, admitting and retiring requests between steps.

Per iteration (an AR-step boundary):
1. admit waiting requests, first come first served, while their rows fit in free cache slots:
   one prefill call for all of them gives the conditions of their AR step 0;
2. one `step_rows` backbone call over cache rows [0, n) for the requests past step 0, each row at
   its own position (free slots and just-admitted rows ride along as padding, never written);
3. one `sample_rows` head call over all active rows (one per sampler step count S in use), each
   row with its own guidance; each request draws its noise from its own source;
4. requests that finished their last AR step are decoded alone, answered, and their slots freed.

The backend computes each row independently of the others (runtime/core.py pads every call to
>= MIN_ROWS rows), so a request's tokens are the same alone or mixed, and one request alone gives
the official sampler's tokens. The loop is backend-agnostic: it only calls the row-level methods
of runtime/core.StageBackend. It runs in a background thread (`start`) or is driven by the caller
(`run_until_idle`); backend calls happen on that one thread, except the decoding of finished
requests, which a backend that allows it (`concurrent_decode`) runs on one decode thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import CancelledError, ThreadPoolExecutor

import torch

from .. import stages as st
from ..errors import BitDanceError
from ..models.layout import tokens_to_latent
from ..sampling import guidance_rows
from .request import Event, GenerationResult, Request


def _concat_rows(parts):
    """Prefill inputs of several requests as one call's inputs (tensors, or dicts of tensors)."""
    if isinstance(parts[0], dict):
        return {k: torch.cat([torch.as_tensor(p[k]) for p in parts]) for k in parts[0]}
    return torch.cat([torch.as_tensor(p) for p in parts])


class Scheduler:
    def __init__(self, backend, max_rows: int | None = None, clock=time.perf_counter, decode_thread: bool = True):
        """`max_rows`: cache slots to use (default: the backend's 2 x max batch, or 32 on torch).
        `decode_thread`: decode finished requests beside the AR steps (where the backend allows)."""
        self.backend = backend
        self.config = backend.config
        limit = backend.max_rows
        self.max_rows = int(max_rows or limit or 32)
        if limit is not None and self.max_rows > limit:
            raise BitDanceError(f"{self.max_rows} rows exceed the {limit} this backend holds")
        self.clock = clock
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._free = list(range(self.max_rows))
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.iterations = 0
        self.rows_per_iteration: deque[int] = deque(maxlen=100_000)  # active rows of recent iterations (benchmarks)
        # Finished requests are decoded on one worker thread where the backend can run its decoder
        # beside the AR steps (ONNX Runtime and torch on a GPU); on the CPU the decoder would take the
        # AR steps' cores, and TensorRT keeps one stream: both decode inline. The worker is FIFO.
        self.observers: list = []  # callables(seconds, rows) after each AR-step iteration (metrics)
        self._decoder = (
            ThreadPoolExecutor(1, thread_name_prefix="bitdance-decode")
            if (decode_thread and getattr(backend, "concurrent_decode", False))
            else None
        )

    # ---- submitting ---------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        """Queue a request. Its values were checked once at its front door (runtime/params.py:
        GenerationParams) and are trusted here; only what this scheduler could never admit is
        refused (cheap, and otherwise silent: an empty part, or a part larger than the cache,
        would wait at the head of the queue forever and hold up every request behind it)."""
        if not request.parts or not all(len(p) for p in request.parts):
            raise BitDanceError("nothing to generate: give at least one label or prompt")
        too_big = [len(p) for p in request.parts if len(p) * (2 if request.guided_rows else 1) > self.max_rows]
        if too_big:
            raise BitDanceError(f"a part of {too_big[0]} images needs more rows than the {self.max_rows} cache slots")
        with self._cv:
            if self._closed:
                raise BitDanceError("the scheduler is closed")
            request.submitted = self.clock()
            self._waiting.append(request)
            self._cv.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request at the next AR-step boundary (its slots are freed, its future cancelled)."""
        with self._cv:
            request.cancelled = True
            self._cv.notify_all()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def rows_in_flight(self) -> int:
        return sum(r.rows for r in self._running)

    @property
    def backlog(self) -> int:
        """Waiting requests that the free cache slots cannot take at the next AR-step boundary
        (first come, first served): the queue a server should limit, not the requests that merely
        wait for the next boundary."""
        with self._cv:
            free = len(self._free)
            waiting = list(self._waiting)
        for i, r in enumerate(waiting):
            if r.rows > free:
                return len(waiting) - i
            free -= r.rows
        return 0

    # ---- driving --------------------------------------------------------------------------
    def start(self) -> None:
        """Run the loop in a background thread (idempotent)."""
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="bitdance-scheduler", daemon=True)
                self._thread.start()

    def close(self, wait: bool = True) -> None:
        """Stop admitting; the thread finishes what is in flight and exits."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if wait and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self._decoder is not None:
            self._decoder.shutdown(wait=wait)

    def run_until_idle(self) -> None:
        """Drive the loop in the calling thread until nothing is waiting or running (and every
        finished request is decoded)."""
        while self._waiting or self._running:
            self.iteration()
        self.drain()

    def drain(self) -> None:
        """Wait until the decode thread has answered every finished request."""
        if self._decoder is not None:
            self._decoder.submit(lambda: None).result()

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not (self._waiting or self._running):
                    if self._closed:
                        return
                    self._cv.wait()
            self.iteration()

    # ---- one AR-step boundary --------------------------------------------------------------
    def iteration(self) -> None:
        try:
            self._retire_cancelled()
            began = self.clock()
            admitted = self._admit()
            if self._running:
                self._advance(admitted)
                seconds, rows = self.clock() - began, self.rows_per_iteration[-1]
                for observe in self.observers:
                    observe(seconds, rows)
        except BaseException as exc:  # a failing call fails every request it served, not the loop
            for r in list(self._running):
                self._fail(r, exc)
            if not isinstance(exc, Exception):
                raise

    def _retire_cancelled(self) -> None:
        with self._cv:
            for r in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(r)
                r.future.cancel()
        for r in [r for r in self._running if r.cancelled]:
            self._release(r)
            if not r.future.done():  # a running future cannot be cancel()ed: it ends with CancelledError
                r.future.set_exception(CancelledError(f"cancelled at AR step {r.step}"))

    def _admit(self) -> list[Request]:
        admitted = []
        with self._cv:
            while self._waiting and self._waiting[0].rows <= len(self._free):
                r = self._waiting.popleft()
                if r.part == 0 and not r.future.set_running_or_notify_cancel():
                    continue  # cancelled while it waited
                self._free.sort()
                r.slots, self._free = self._free[: r.rows], self._free[r.rows :]
                admitted.append(r)
        if not admitted:
            return admitted
        try:
            inputs = _concat_rows([r.condition.rows(r.guided_rows) for r in admitted])
            cond = self.backend.prefill_rows(inputs, [s for r in admitted for s in r.slots])
        except BaseException as exc:
            for r in admitted:
                self._fail(r, exc)
            if not isinstance(exc, Exception):
                raise
            return []
        offset = 0
        for r in admitted:
            r.cond, offset = cond[offset : offset + r.rows], offset + r.rows
            r.step, r.tokens, r.last = 0, [], None
            self._running.append(r)
        return admitted

    def _advance(self, admitted: list[Request]) -> None:
        cfg = self.config
        p, c = cfg.parallel_num, cfg.token_dim
        stepping = [r for r in self._running if r.step > 0]
        if stepping:
            n = max(max(r.slots) for r in stepping) + 1
            tokens = torch.zeros(n, p, c)
            starts, write = [cfg.prefix_len] * n, [False] * n
            for r in stepping:
                index = torch.tensor(r.slots)
                tokens[index] = r.last
                for s in r.slots:
                    starts[s], write[s] = st.step_start(cfg, r.step), True
            cond = self.backend.step_rows(tokens, starts, write)
            for r in stepping:
                r.cond = cond[torch.tensor(r.slots)]
        self.rows_per_iteration.append(sum(r.rows for r in self._running))
        by_steps: dict[int, list[Request]] = {}
        for r in self._running:
            by_steps.setdefault(r.steps, []).append(r)
        for group in by_steps.values():
            self._sample(group, p, c)
        self.iterations += 1
        for r in list(self._running):
            r.tokens.append(r.last[: r.images])
            r.step += 1
            if r.first_step is None:
                r.first_step = self.clock()
            if r.step == cfg.ar_steps:
                self._finish_part(r)
            else:
                preview = r.step in r.preview_steps
                image = self.backend.decode(self._partial_latent(r)).float().cpu() if preview else None
                r.emit(Event("step", r.step, cfg.ar_steps, image=image))

    def _sample(self, group: list[Request], p: int, c: int) -> None:
        conds, noises, scales, cond_rows, uncond_rows = [], [], [], [], []
        drawn = []
        for r in group:  # a request whose noise source fails (a replay file too short) fails alone
            try:
                drawn.append((r, r.draw_noise(p, c)))
            except Exception as exc:
                self._fail(r, exc)
        offset = 0
        for r, noise in drawn:
            scale, c, u = guidance_rows(r.rows, *r.guidance())  # its rows in the official layout
            scales.append(scale)
            cond_rows.append(c + offset)
            uncond_rows.append(u + offset)
            conds.append(r.cond)
            noises.append(noise)
            offset += r.rows
        if not drawn:
            return
        tokens = self.backend.sample_rows(
            torch.cat(conds), torch.cat(noises, dim=1), torch.cat(scales), torch.cat(cond_rows), torch.cat(uncond_rows)
        )
        offset = 0
        for r, _ in drawn:
            r.last, offset = tokens[offset : offset + r.rows], offset + r.rows
            if not bool(torch.isfinite(r.last).all()):  # never a silent black image
                self._fail(
                    r,
                    BitDanceError(
                        f"the model computed non-finite values at AR step {r.step} of this "
                        "request (its guidance, noise or the graphs' precision); it was stopped"
                    ),
                )

    def _partial_latent(self, r: Request) -> torch.Tensor:
        """The latent so far: generated tokens in place, 0 where nothing was generated yet."""
        cfg = self.config
        done = torch.cat(r.tokens, dim=1)
        rest = torch.zeros(done.shape[0], cfg.num_tokens - done.shape[1], done.shape[2])
        return tokens_to_latent(torch.cat([done, rest], dim=1), cfg)

    def _finish_part(self, r: Request) -> None:
        """Free the request's slots at once; decode its part (on the decode thread when the backend
        allows, so the other requests' AR steps go on meanwhile), and answer after its last part."""
        tokens = torch.cat(r.tokens, dim=1)
        latent = tokens_to_latent(tokens, self.config)
        self._release(r)
        last = r.part + 1 == len(r.parts)
        if not last:  # the next part, first in line, with the same noise source
            r.part += 1
            with self._cv:
                self._waiting.appendleft(r)
        else:
            try:
                r.noise.finish()  # a replayed noise file must be used up exactly
            except Exception as exc:
                self._fail(r, exc)
                return
        job = lambda: self._decode_part(r, tokens, latent, last)  # noqa: E731
        if self._decoder is None:
            job()
        else:
            self._decoder.submit(job)

    def _decode_part(self, r: Request, tokens, latent, last: bool) -> None:
        try:
            image = self.backend.decode(latent).float().cpu()
        except Exception as exc:
            self._fail(r, exc)
            return
        r.done_parts.append((tokens, latent, image))
        if not last or r.future.done():
            return
        parts = r.done_parts
        result = GenerationResult(
            *(torch.cat([part[i] for part in parts]) for i in range(3)),
            seconds=self.clock() - r.submitted,
            first_step_seconds=(r.first_step - r.submitted) if r.first_step else None,
        )
        r.emit(Event("done", self.config.ar_steps, self.config.ar_steps, result=result))
        if not r.future.done():  # (a failing callback has already answered it)
            r.future.set_result(result)

    def _release(self, r: Request) -> None:
        if r in self._running:
            self._running.remove(r)
        with self._cv:
            self._free.extend(r.slots)
        r.slots = []

    def _fail(self, r: Request, exc: BaseException) -> None:
        self._release(r)
        r.emit(Event("error", r.step, self.config.ar_steps, error=exc))
        if not r.future.done():
            r.future.set_exception(exc)

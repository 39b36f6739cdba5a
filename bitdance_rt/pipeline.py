"""The public API: load a model once, keep it warm, generate from many callers at once.

    from bitdance_rt import Pipeline
    pipe = Pipeline.from_pretrained()                 # the embedded digits model
    out = pipe.generate(labels=[3, 7], seed=0)        # out.images: PIL images
    future = pipe.submit(labels=5, num_images=4)      # many threads may submit at once
    for event in pipe.stream(labels=1, preview_every=4): ...

The Pipeline holds what is shared (config, backend: weights, sessions or engines, the KV cache as
slots); each call is checked once as a GenerationParams (runtime/params.py: `pipe.params(...)`, or
what submit / generate / stream make of their keywords; `params=` hands one in, as the HTTP
server, the Triton model and the CLI do) and runs as a Request with its own rows, AR step,
guidance and noise source; one continuous-batching Scheduler (runtime/scheduler.py), on one
background thread, runs every request's AR step together. So `generate` is `submit(...).result()`,
and a request's images are the same whether it runs alone or with others.
(Over 400 lines: the one public class; its front doors each spell out every request keyword.)
"""

from __future__ import annotations

import queue
import threading
import weakref
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .backends import BackendOptions, ModelSource, make_backend, resolve_model
from .errors import BitDanceError
from .runtime.loop import request_for
from .runtime.params import GenerationParams, ModelLimits, ParamError, check_previews, check_steps
from .runtime.request import Event, GenerationResult
from .runtime.scheduler import Scheduler
from .sampling import NoiseSource


@dataclass
class Output:
    """One request's images: `images` (PIL), `image` [B, 3, H, W] in about [-1, 1], `tokens`
    [B, N, C] (+/-1, generation order), `latent` [B, C, h, w], `labels` or `prompts` per image,
    `seconds` from submission to result, `first_step_seconds` to its first AR step."""

    image: torch.Tensor
    tokens: torch.Tensor
    latent: torch.Tensor
    seconds: float
    first_step_seconds: float | None
    labels: list | None = None
    prompts: list | None = None

    def __repr__(self) -> str:
        b, _, h, w = self.image.shape
        what = f"labels={self.labels}" if self.labels is not None else f"prompts={self.prompts}"
        return f"Output({b} image(s) of {h}x{w}, {what}, {self.seconds:.3f} s)"

    @property
    def images(self) -> list:
        from PIL import Image

        from .images import to_uint8

        return [Image.fromarray(a) for a in to_uint8(self.image)]


@dataclass
class Progress:
    """A `stream` event after each AR step; `preview` (PIL) is the partial image when asked for."""

    step: int
    total: int
    preview: object = None


# the request values of submit / generate / stream when left out (GenerationParams.create's defaults)
_DEFAULTS = dict(labels=None, prompt=None, num_images=1, steps=None, cfg=None, cfg_schedule=None, seed=0, noise=None)


def _values(labels, prompt, num_images, steps, cfg, cfg_schedule, seed, noise) -> dict:
    """The request values of a submit / generate / stream call, by name."""
    return dict(
        labels=labels,
        prompt=prompt,
        num_images=num_images,
        steps=steps,
        cfg=cfg,
        cfg_schedule=cfg_schedule,
        seed=seed,
        noise=noise,
    )


@dataclass
class _Call:
    request: object
    labels: list | None = None
    prompts: list | None = None
    events: object = field(default=None, repr=False)


class Pipeline:
    def __init__(
        self,
        backend,
        model: ModelSource,
        steps: int,
        description: str = "",
        max_batch: int | None = None,
        decode_thread: bool = True,
    ):
        """Usually made by `from_pretrained`. `backend`: a runtime backend (runtime/core.py).
        `decode_thread`: decode finished requests beside the AR steps (runtime/scheduler.py)."""
        self.backend = backend
        self.model = model
        self.config = model.config
        self.steps = int(steps)
        self.description = description or f"{self.config.name} on {backend.name}"
        rows = None if max_batch is None else 2 * max_batch
        self.scheduler = Scheduler(backend, max_rows=rows, decode_thread=decode_thread)
        self.max_batch = self.scheduler.max_rows // 2
        self._prompts = None
        self._kind = ModelLimits.of(self.config, model.t2i).kind  # what the GenerationParams it takes were checked for
        self._lock = threading.Lock()
        # close() runs at interpreter exit (or when the Pipeline is collected) if the caller did not
        # call it: the scheduler thread stops and the runtimes are released in order (a script
        # that just ends used to abort in the runtime's static destructors)
        self._finalizer = weakref.finalize(self, _shut_down, self.scheduler, backend)

    # ---- loading ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model=None,
        checkpoint=None,
        vae=None,
        *,
        backend: str | None = None,
        precision: str | None = None,
        steps: int | None = None,
        max_batch: int = 16,
        height: int | None = None,
        width: int | None = None,
        max_text_tokens: int | None = None,
        cache_dir=None,
        device: str = "cpu",
        threads: int | None = None,
        export_dir=None,
        progress: bool = True,
        decode_thread: bool = True,
        **options,
    ) -> "Pipeline":
        """Load a model and make its backend warm (export, precision variant, engines: cached).

        `model`: None (the embedded trained digits model), a preset name or a config .json;
        `checkpoint` / `vae`: the weights (official .pt or .safetensors), or `checkpoint` a
        text-to-image directory (BitDance-14B-16x / -64x; then `height` / `width`). `backend`:
        onnxruntime (default when installed), torch or tensorrt. `steps`: the sampler steps S the
        fused sampler is built for (default: the model's); requests may ask for others.
        `cache_dir`: the cache root (default $BITDANCE_RT_CACHE or ~/.cache/bitdance-rt) of this load:
        the export, precision variants, calibration set, engines and ONNX Runtime's optimised graphs
        are found or made there (the process's environment is left as it is).
        Other keywords are BackendOptions fields (ort_provider, engine_dir, calibration, ...).
        What loading does (exports reused or made, variants derived) is logged to the `bitdance_rt`
        logger at INFO (the CLI prints it)."""
        from .paths import using_cache_root

        source = resolve_model(model, checkpoint, vae, height, width, max_text_tokens)
        cfg = source.config
        steps = check_steps(cfg.default_steps if steps is None else steps)
        opts = BackendOptions(
            backend=backend,
            precision=precision,
            device=device,
            threads=threads,
            max_batch=max_batch,
            export_dir=None if export_dir is None else str(export_dir),
            progress=progress,
            **options,
        )
        with using_cache_root(cache_dir):
            return cls.load(source, steps, opts, decode_thread=decode_thread)

    @classmethod
    def load(cls, source: ModelSource, steps: int, opts: BackendOptions, decode_thread: bool = True) -> "Pipeline":
        """`from_pretrained` with the model and options already resolved (the CLI's way in)."""
        encoder = None
        if source.t2i:  # a bad tokenizer fails now, before the weights are read
            from .t2i.prompt import PromptEncoder

            encoder = PromptEncoder(Path(source.checkpoint) / "tokenizer.json", source.config)
        made, description = make_backend(source, steps, opts)
        pipe = cls(made, source, steps, description, opts.max_batch, decode_thread)
        pipe._prompts = encoder
        return pipe

    def scheduler_schedule(self, cfg_schedule: str | None) -> str:
        """The CFG schedule a request with `cfg_schedule` gets (None: the model family's)."""
        from .sampling import schedule_for

        return schedule_for(cfg_schedule, self.config)

    @property
    def limits(self) -> ModelLimits:
        """What this Pipeline's requests are checked against (GenerationParams.create): its model's
        kind and classes and, for text-to-image, its prompt encoder (the graphs' token limit)."""
        t2i = bool(self.model.t2i)
        return ModelLimits.of(self.config, t2i, self._prompt_encoder if t2i else None)

    def params(
        self,
        labels=None,
        prompt=None,
        num_images: int = 1,
        steps: int | None = None,
        cfg: float | None = None,
        cfg_schedule: str | None = None,
        seed: int = 0,
        noise: NoiseSource | None = None,
    ) -> GenerationParams:
        """One request's values checked against this model, once: the GenerationParams that
        submit / generate / stream take as `params=` (and make themselves from these keywords).
        A ParamError names the first bad value."""
        return GenerationParams.create(
            self.limits,
            labels=labels,
            prompt=prompt,
            num_images=num_images,
            steps=steps,
            cfg=cfg,
            cfg_schedule=cfg_schedule,
            seed=seed,
            noise=noise,
        )

    def check_prompt(self, prompt: str) -> None:
        """Raise a ParamError (a BitDanceError) when a text-to-image prompt is empty or longer than the graphs hold."""
        self.params(prompt=prompt)

    def _prompt_encoder(self):
        if self._prompts is None:
            from .t2i.prompt import PromptEncoder

            self._prompts = PromptEncoder(Path(self.model.checkpoint) / "tokenizer.json", self.config)
        return self._prompts

    # ---- requests -------------------------------------------------------------------------------
    def _call(self, values: dict, params, preview_every=0, on_event=None) -> _Call:
        """The Request of one call: `params` (checked at another front door) or the call's `values`
        (keywords of submit / generate / stream), checked here, once. Nothing is re-checked behind."""
        if params is None:
            params = self.params(**values)
        else:
            given = [k for k, v in values.items() if not (v is _DEFAULTS[k] or (type(v) is int and v == _DEFAULTS[k]))]
            if given:
                raise ParamError(
                    "params", f"give params=... or the request's values, not both (also given: {', '.join(given)})"
                )
            self._trusted(params)
        if params.condition is not None:  # (made by the batch entry points: already in the loop's form)
            condition = params.condition
            labels_out = list(condition.labels) if hasattr(condition, "labels") else None
            prompts_out = list(getattr(condition, "prompts", ())) or None
        elif params.prompts is not None:
            prompts_out, labels_out = params.per_image, None
            condition = self._prompt_encoder().encode(prompts_out)
        else:
            condition = labels_out = params.per_image
            prompts_out = None
        request = request_for(
            params,
            self.config,
            condition,
            self.steps,
            self.max_batch,
            preview_steps=check_previews(preview_every, self.config.ar_steps),
            on_event=on_event,
        )
        return _Call(request, labels_out, prompts_out)

    def _trusted(self, params) -> None:
        """The one check behind the doors, cheap: `params` is a GenerationParams that create() checked
        for a model of this kind and classes. Without it, labels checked against another model's
        classes (or a hand-built, unchecked object) would reach the embedding table unnoticed: the
        null class or a row past it, a wrong image and no error."""
        if not isinstance(params, GenerationParams):
            raise ParamError(
                "params",
                f"params must be a GenerationParams (pipe.params(...) or GenerationParams.create), "
                f"got {type(params).__name__}",
            )
        if params.checked_for != self._kind:
            raise ParamError(
                "params",
                f"these GenerationParams were not checked for {self.config.name}: make them with "
                "pipe.params(...) or GenerationParams.create(pipe.limits, ...)",
            )

    def _output(self, call: _Call, result: GenerationResult) -> Output:
        return Output(
            result.image,
            result.tokens,
            result.latent,
            result.seconds,
            result.first_step_seconds,
            call.labels,
            call.prompts,
        )

    def submit(
        self,
        labels=None,
        prompt=None,
        num_images: int = 1,
        steps: int | None = None,
        cfg: float | None = None,
        cfg_schedule: str | None = None,
        seed: int = 0,
        noise: NoiseSource | None = None,
        preview_every: int = 0,
        on_progress=None,
        *,
        params: GenerationParams | None = None,
    ) -> Future:
        """Queue a request; a Future of its Output. Safe from any number of threads.

        The request: its values (defaults: one image, the Pipeline's sampler steps, the model's
        guidance and schedule, seed 0), or `params`, a GenerationParams already checked
        (`pipe.params(...)`), not both. `on_progress(Progress)` is called after each AR step but the
        last, on the scheduler's thread (keep it quick: hand the work to another thread), with a
        `preview` every `preview_every` steps (or at the AR steps listed)."""
        on_event = None
        if on_progress is not None:

            def on_event(event: Event) -> None:
                if event.kind == "step":
                    on_progress(Progress(event.step, event.total, None if event.image is None else _pil(event.image)))

        values = _values(labels, prompt, num_images, steps, cfg, cfg_schedule, seed, noise)
        return self._start(values, params, preview_every, on_event)

    def _start(self, values: dict, params, preview_every=0, on_event=None, prepare=None) -> Future:
        """What submit / generate / stream share: the call's Request, built and checked once (_call),
        `prepare(call)` if given (generate's progress bar), then queued on the scheduler (_submit)."""
        call = self._call(values, params, preview_every, on_event)
        if prepare is not None:
            prepare(call)
        return self._submit(call)

    def _submit(self, call: _Call) -> Future:
        outer: Future = Future()

        def done(inner: Future) -> None:
            if inner.cancelled():  # cancelled while it waited; `outer` is running, so it ends with the error
                outer.set_exception(CancelledError("the request was cancelled before it started"))
            elif inner.exception() is not None:
                outer.set_exception(inner.exception())
            else:
                outer.set_result(self._output(call, inner.result()))

        outer.set_running_or_notify_cancel()
        call.request.future.add_done_callback(done)
        with self._lock:
            self.scheduler.submit(call.request)
            self.scheduler.start()
        outer.request = call.request  # for cancel(): Pipeline.cancel(future)
        return outer

    def generate(
        self,
        labels=None,
        prompt=None,
        num_images: int = 1,
        steps: int | None = None,
        cfg: float | None = None,
        cfg_schedule: str | None = None,
        seed: int = 0,
        noise: NoiseSource | None = None,
        progress: bool = False,
        *,
        params: GenerationParams | None = None,
    ) -> Output:
        """Generate and wait: `submit(...).result()` (with a progress bar when `progress`)."""
        values = _values(labels, prompt, num_images, steps, cfg, cfg_schedule, seed, noise)
        if not progress:
            return self._start(values, params).result()
        bars = []

        def show_progress(call: _Call) -> None:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.config.ar_steps * len(call.request.parts), desc="AR steps", leave=False)
            bars.append(bar)
            call.request.on_event = lambda e: bar.update(1) if e.kind in ("step", "done") else None

        try:
            return self._start(values, params, prepare=show_progress).result()
        finally:
            for bar in bars:
                bar.close()

    def stream(
        self,
        labels=None,
        prompt=None,
        num_images: int = 1,
        steps: int | None = None,
        cfg: float | None = None,
        cfg_schedule: str | None = None,
        seed: int = 0,
        noise: NoiseSource | None = None,
        preview_every: int = 0,
        *,
        params: GenerationParams | None = None,
    ):
        """Iterate a request's progress: a Progress after each AR step (with a `preview` PIL image of
        the partial latent decoded every `preview_every` steps; each costs one decoder call), then
        its Output. Closing the iterator early cancels the request at the next AR step."""
        events: queue.Queue = queue.Queue()
        values = _values(labels, prompt, num_images, steps, cfg, cfg_schedule, seed, noise)
        future = self._start(values, params, preview_every, on_event=events.put)
        try:
            while True:
                event: Event = events.get()
                if event.kind == "step":
                    yield Progress(event.step, event.total, None if event.image is None else _pil(event.image))
                elif event.kind == "error":
                    raise event.error
                elif event.kind == "done":
                    yield future.result()
                    return
        finally:
            if not future.done():
                self.cancel(future)

    def cancel(self, future: Future) -> None:
        """Stop a submitted request at the next AR-step boundary (its cache rows are freed)."""
        request = getattr(future, "request", None)
        if request is None:
            raise BitDanceError("cancel() takes a Future returned by this Pipeline's submit()")
        self.scheduler.cancel(request)

    # ---- state ----------------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return self.scheduler.queued

    @property
    def backlog(self) -> int:
        """Queued requests that the free cache rows cannot take at the next AR step (what a server
        limits: requests that merely wait for the next step boundary are not a backlog)."""
        return self.scheduler.backlog

    @property
    def rows_in_flight(self) -> int:
        return self.scheduler.rows_in_flight

    def close(self) -> None:
        """Finish what is in flight, stop the scheduler thread and release the backend (sessions,
        engines, cache); the Pipeline takes no requests after this. Idempotent."""
        self._finalizer()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Pipeline({self.description}, max_batch={self.max_batch}, steps={self.steps})"


def _shut_down(scheduler: Scheduler, backend) -> None:
    scheduler.close(wait=True)
    close = getattr(backend, "close", None)
    if close is not None:
        close()


def _pil(image: torch.Tensor):
    from PIL import Image

    from .images import to_uint8

    arrays = to_uint8(image)
    return Image.fromarray(arrays[0]) if len(arrays) == 1 else [Image.fromarray(a) for a in arrays]

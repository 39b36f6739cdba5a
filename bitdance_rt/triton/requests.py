"""What the Triton model (model.py) does, without Triton: its tensor contract, the parameters it
loads from, the parsing of request inputs into the request's GenerationParams (runtime/params.py,
checked once there), the choice of preview steps,
and the streaming of one request's responses from the Pipeline's scheduler callbacks.

model.py adapts this to `triton_python_backend_utils` (numpy arrays in, `pb_utils.Tensor` /
`InferenceResponse` out); everything here is plain Python + numpy, unit-tested without a server.
(Over 400 lines: model.py, copied into every repository written, imports its names from here, so
moving any of them would break the repositories already written.)

The contract (the same in config.pbtxt, written by repository.py):

inputs (one request = one Pipeline request; every input but the condition is optional)
  labels          TYPE_INT32  [-1]  class-conditional models (required there): class indices
  prompt          TYPE_STRING [1]   text-to-image models (required there): one UTF-8 prompt
  num_images      TYPE_INT32  [1]   images per label / for the prompt (default 1)
  seed            TYPE_INT64  [1]   seed of the request's one noise generator (default 0)
  steps           TYPE_INT32  [1]   sampler steps S per AR step (default: the model's, set at load)
  guidance_scale  TYPE_FP32   [1]   classifier-free guidance G (default: the model's)
  cfg_schedule    TYPE_STRING [1]   linear | constant (default: the model family's)
  partial_images  TYPE_INT32  [1]   0..3 previews (partial images) streamed before the final one
outputs (each response carries all three)
  image   TYPE_UINT8 [-1, H, W, 3]  N = len(labels) x num_images images (label-major, like
                                    Pipeline.generate), or num_images for a prompt; H, W: the model's
  step    TYPE_INT32 [1]            AR steps done (the model's ar_steps in the final response)
  final   TYPE_BOOL  [1]            true only in the last response (sent with the FINAL flag)
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from ..errors import BitDanceError
from ..runtime.params import MAX_PARTIAL_IMAGES, GenerationParams, ModelLimits, ParamError
from ..runtime.request import preview_steps
from ..sampling import CFG_SCHEDULES

logger = logging.getLogger(__name__)

SERVE_BACKENDS = ("onnxruntime", "tensorrt")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # a Triton model-config type (TYPE_INT32, ...)
    dims: tuple
    optional: bool = True


def input_specs(t2i: bool) -> tuple[TensorSpec, ...]:
    """The model's inputs: `labels` (class-conditional) or `prompt` (text-to-image), required, then
    the optional ones."""
    condition = (
        TensorSpec("prompt", "TYPE_STRING", (1,), False) if t2i else TensorSpec("labels", "TYPE_INT32", (-1,), False)
    )
    return (
        condition,
        TensorSpec("num_images", "TYPE_INT32", (1,)),
        TensorSpec("seed", "TYPE_INT64", (1,)),
        TensorSpec("steps", "TYPE_INT32", (1,)),
        TensorSpec("guidance_scale", "TYPE_FP32", (1,)),
        TensorSpec("cfg_schedule", "TYPE_STRING", (1,)),
        TensorSpec("partial_images", "TYPE_INT32", (1,)),
    )


def output_specs(height: int, width: int) -> tuple[TensorSpec, ...]:
    return (
        TensorSpec("image", "TYPE_UINT8", (-1, int(height), int(width), 3), False),
        TensorSpec("step", "TYPE_INT32", (1,), False),
        TensorSpec("final", "TYPE_BOOL", (1,), False),
    )


class RequestError(BitDanceError):
    """A request input that is missing, malformed or out of range (the message names the input)."""


# ---- the model's parameters (config.pbtxt `parameters`) -----------------------------------------
@dataclass
class ServeParams:
    """What the Triton model loads: recorded by repository.write_repository as string parameters."""

    export_dir: str
    backend: str = "onnxruntime"
    precision: str | None = None  # None: the export's graph precision
    steps: int | None = None  # the fused sampler's S (None: the export's)
    max_batch: int | None = None  # images one scheduler batch holds (None: the export's max batch)
    max_images: int | None = None  # images one request may ask for (None: max_batch)
    device: str = "cpu"  # cpu | cuda (each KIND_GPU instance runs on its own GPU: cuda:<device id>)
    threads: int | None = None
    ort_provider: str | None = None  # cpu | cuda | tensorrt (onnxruntime; default: cuda on a GPU)
    engine_dir: str | None = None  # tensorrt engine cache (default: $BITDANCE_RT_CACHE/engines)
    cache_dir: str | None = None  # $BITDANCE_RT_CACHE of the model's process
    model: str | None = None  # a preset / config .json (None: the export manifest's config)
    checkpoint: str | None = None  # weights, or the text-to-image checkpoint directory (its tokenizer)
    vae: str | None = None

    INTS = ("steps", "max_batch", "max_images", "threads")

    def to_parameters(self) -> dict[str, str]:
        """The non-empty fields as strings (Triton parameters are string_value)."""
        return {k: str(v) for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, object]) -> "ServeParams":
        """From config.pbtxt's parameters: {key: "value"} or Triton's {key: {"string_value": "value"}}."""
        values = {}
        for key, value in parameters.items():
            if isinstance(value, Mapping):
                value = value.get("string_value")
            if key not in cls.__dataclass_fields__ or value in (None, ""):
                continue  # (other parameters, e.g. Triton's own, are not ours)
            if key in cls.INTS:
                try:
                    value = int(value)
                except ValueError:
                    raise BitDanceError(f"model parameter {key}: expected an integer, got {value!r}") from None
            values[key] = value
        if "export_dir" not in values:
            raise BitDanceError(
                "model parameter export_dir is missing: write the repository with "
                "`bitdance-rt triton-repo --export-dir DIR --out REPO`"
            )
        params = cls(**values)
        params.check()
        return params

    def check(self) -> None:
        if self.backend not in SERVE_BACKENDS:
            raise BitDanceError(f"backend {self.backend!r}: the Triton model runs one of {', '.join(SERVE_BACKENDS)}")
        for key in self.INTS:
            value = getattr(self, key)
            if value is not None and value < 1:
                raise BitDanceError(f"{key} must be a positive integer, got {value}")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise BitDanceError(f"device {self.device!r}: use cpu or cuda")


def instance_device(params: ServeParams, kind: str | None, device_id) -> str:
    """The torch-style device of one model instance: Triton gives each KIND_GPU instance its GPU
    (args model_instance_kind / model_instance_device_id); KIND_CPU instances run on the CPU."""
    if str(kind).upper() == "GPU":
        return f"cuda:{int(device_id or 0)}"
    return "cpu" if params.device == "cpu" else params.device


def load_pipeline(params: ServeParams, device: str | None = None):
    """One Pipeline on the export directory of `params`, on `device` (default params.device).

    The model's config is the export manifest's (no weights are read: the ONNX graphs / TensorRT
    engines hold them), unless `model` / `checkpoint` were recorded; a text-to-image export also
    needs its checkpoint directory, for the tokenizer."""
    from .. import paths
    from ..backends import BackendOptions, ModelSource, resolve_model
    from ..export.reader import open_export
    from ..pipeline import Pipeline
    from ..t2i_config import T2IConfig

    export_dir = Path(params.export_dir)
    export = open_export(export_dir)
    cfg = export.config
    t2i = isinstance(cfg, T2IConfig)
    if params.model or (params.checkpoint and not t2i):
        source = resolve_model(params.model, params.checkpoint, params.vae, None, None, None)
    elif t2i:
        if not params.checkpoint:
            raise BitDanceError(
                f"{export_dir} is a text-to-image export: give the checkpoint directory (its "
                "tokenizer.json encodes the prompts): triton-repo --checkpoint DIR"
            )
        source = ModelSource(cfg, str(params.checkpoint), None, t2i=True)
    else:
        source = ModelSource(cfg)
    steps = params.steps or export.sampler_steps or cfg.default_steps
    max_batch = params.max_batch or export.max_batch
    device = device or params.device
    opts = BackendOptions(
        backend=params.backend,
        precision=params.precision,
        device=device,
        threads=params.threads,
        max_batch=max_batch,
        export_dir=str(export_dir),
        ort_provider=params.ort_provider,
        engine_dir=params.engine_dir,
        progress=False,
    )
    with paths.using_cache_root(params.cache_dir or None):  # (the environment is left alone)
        return Pipeline.load(source, int(steps), opts)


# ---- requests ----------------------------------------------------------------------------------
@dataclass
class ModelInfo:
    """What request parsing needs to know of the loaded model: `limits` (what GenerationParams are
    checked against) and this model's own limit of images per request."""

    t2i: bool
    num_classes: int
    ar_steps: int
    max_images: int
    name: str = "this model"
    prompt_encoder: Callable | None = field(default=None, compare=False, repr=False)  # the Pipeline's (tokens)

    @classmethod
    def of(cls, pipe, max_images: int | None = None) -> "ModelInfo":
        cfg = pipe.config
        return cls(
            bool(pipe.model.t2i),
            int(getattr(cfg, "num_classes", 0) or 0),
            int(cfg.ar_steps),
            int(max_images or pipe.max_batch),
            str(cfg.name),
            pipe.limits.prompt_encoder,
        )

    @property
    def limits(self) -> ModelLimits:
        return ModelLimits(self.name, self.t2i, 0 if self.t2i else self.num_classes, self.prompt_encoder)


@dataclass
class GenerateArgs:
    """One request's inputs, decoded (`pipeline_kwargs`), and how many previews it wants; `params`
    gives them as the request's GenerationParams, checked once."""

    labels: list | None = None
    prompt: str | None = None
    num_images: int = 1
    seed: int = 0
    steps: int | None = None
    cfg: float | None = None
    cfg_schedule: str | None = None
    partial_images: int = 0
    _checked: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def pipeline_kwargs(self) -> dict:
        return {
            "labels": self.labels,
            "prompt": self.prompt,
            "num_images": self.num_images,
            "steps": self.steps,
            "cfg": self.cfg,
            "cfg_schedule": self.cfg_schedule,
            "seed": self.seed,
        }

    def params(self, limits: ModelLimits) -> GenerationParams:
        """The request's GenerationParams: made (and so checked) once, when parsed; made again only
        if a value was changed since (a ParamError, the Pipeline's words, then names it)."""
        values = self.pipeline_kwargs()
        values["labels"] = None if self.labels is None else list(self.labels)  # (a copy: changes show)
        if self._checked is None or self._checked[0] != values:
            self._checked = (values, GenerationParams.create(limits, **values))
        return self._checked[1]

    @property
    def images(self) -> int:
        return (len(self.labels) if self.labels is not None else 1) * self.num_images


def _scalar(inputs: Mapping, name: str, kind: str):
    """The single element of input `name` (None when absent), checked to be one element."""
    value = inputs.get(name)
    if value is None:
        return None
    array = np.asarray(value)
    if array.size != 1:
        raise RequestError(f"input '{name}': expected one {kind} (shape [1]), got shape {list(array.shape)}")
    return array.reshape(-1)[0]


def _integer(inputs, name: str, default, lo: int | None = None, hi: int | None = None):
    """An integer input (its range: GenerationParams.create's, or `lo`..`hi` for this model's own inputs)."""
    value = _scalar(inputs, name, "integer")
    if value is None:
        return default
    if not np.issubdtype(np.asarray(value).dtype, np.integer):
        raise RequestError(f"input '{name}': expected an integer, got {np.asarray(value).dtype} {value!r}")
    value = int(value)
    if lo is not None and (value < lo or (hi is not None and value > hi)):
        raise RequestError(_out_of_range(name, lo, hi, value))
    return value


def _out_of_range(name: str, lo: int, hi: int | None, value) -> str:
    return f"input '{name}': expected an integer in {lo}..{'' if hi is None else hi}, got {value}"


def _text(inputs, name: str):
    value = _scalar(inputs, name, "string")
    if value is None:
        return None
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"input '{name}': expected UTF-8 text") from None
    if isinstance(value, str):
        return value
    raise RequestError(f"input '{name}': expected a string (BYTES), got {np.asarray(value).dtype}")


_INPUTS = {"cfg": "guidance_scale"}  # Pipeline argument (ParamError.param) -> this model's input


def _input_error(exc: ParamError, info: ModelInfo) -> RequestError:
    """A refusal of GenerationParams.create, named by its input and worded as this model's contract."""
    name = _INPUTS.get(exc.param, exc.param)
    if exc.bounds is not None:
        return RequestError(_out_of_range(name, *exc.bounds, exc.value))
    if exc.param == "labels" and exc.value:
        return RequestError(
            f"input 'labels': {exc.value} out of range: expected class indices 0..{info.num_classes - 1}"
        )
    if exc.param == "cfg_schedule":
        return RequestError(f"input 'cfg_schedule': expected one of {', '.join(CFG_SCHEDULES)}, got {exc.value!r}")
    return RequestError(f"input '{name}': {exc}")


def parse_inputs(inputs: Mapping[str, object], info: ModelInfo) -> GenerateArgs:
    """Request inputs (name -> numpy array, or None / absent) -> GenerateArgs, its GenerationParams
    made (checked once, against `info.limits`), or a RequestError naming the input and what was
    expected. Decoding (which inputs, shapes, dtypes, UTF-8) and this model's own limits (images
    per request, partial images) are checked here; every value, by GenerationParams.create."""
    args = GenerateArgs()
    if info.t2i:
        if inputs.get("labels") is not None:
            raise RequestError("input 'labels': this model is text-to-image; give 'prompt' instead")
        args.prompt = _text(inputs, "prompt")
        if args.prompt is None:
            raise RequestError("input 'prompt': required (one non-empty UTF-8 string) for this text-to-image model")
    else:
        if inputs.get("prompt") is not None:
            raise RequestError("input 'prompt': this model is class-conditional; give 'labels' instead")
        labels = inputs.get("labels")
        if labels is None:
            raise RequestError(f"input 'labels': required (INT32 class indices 0..{info.num_classes - 1})")
        labels = np.asarray(labels)
        if labels.ndim > 1 and labels.shape[0] == 1:
            labels = labels[0]  # [1, n] as some clients send it
        if labels.ndim != 1 or labels.size == 0:
            raise RequestError(f"input 'labels': expected a non-empty 1-D INT32 tensor, got shape {list(labels.shape)}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise RequestError(f"input 'labels': expected integers (INT32), got {labels.dtype}")
        args.labels = [int(v) for v in labels]
    args.num_images = _integer(inputs, "num_images", 1)
    args.seed = _integer(inputs, "seed", 0)
    args.steps = _integer(inputs, "steps", None)
    scale = _scalar(inputs, "guidance_scale", "number")
    if scale is not None:
        try:
            args.cfg = float(scale)
        except (TypeError, ValueError):
            raise RequestError(f"input 'guidance_scale': expected a number (FP32), got {scale!r}") from None
    args.cfg_schedule = _text(inputs, "cfg_schedule")
    try:
        args.params(info.limits)
    except ParamError as exc:
        raise _input_error(exc, info) from None
    if args.images > info.max_images:
        raise RequestError(
            f"input 'num_images': {args.images} images in one request (labels x num_images); "
            f"this model allows at most {info.max_images}"
        )
    args.partial_images = _integer(inputs, "partial_images", 0, 0, MAX_PARTIAL_IMAGES)
    return args


def to_uint8(images) -> np.ndarray:
    """[B, 3, H, W] float in about [-1, 1] (torch) -> [B, H, W, 3] uint8, the Pipeline's conversion."""
    from ..images import to_uint8 as convert

    return np.ascontiguousarray(convert(images))


def outputs(image: np.ndarray, step: int, final: bool) -> dict[str, np.ndarray]:
    """One response's output arrays (the contract above)."""
    return {"image": image, "step": np.array([step], dtype=np.int32), "final": np.array([final], dtype=bool)}


# ---- streaming one request ----------------------------------------------------------------------
class Responder:
    """Sends responses on one thread of its own, in order, so that the scheduler's thread (where the
    Pipeline's callbacks run) never waits on Triton's IPC. `send(outputs | None, error | None,
    final)` is the model's: it builds and sends one response; its own failures are logged."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="bitdance-triton-responses", daemon=True)
        self._thread.start()

    def put(self, job: Callable[[], None]) -> None:
        self._queue.put(job)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                job()
            except Exception as exc:  # a response that cannot be sent (client gone) must not stop the others
                logger.warning("bitdance-rt: sending a response failed: %s", exc)

    def close(self) -> None:
        """Send what is queued, then stop."""
        self._queue.put(None)
        self._thread.join()


@dataclass(eq=False)
class Stream:
    """One request in flight: previews from the scheduler's step events, then the final image (or
    the error) from its future; `cancelled()` (the client went away) stops it at the next AR step."""

    pipe: object
    args: GenerateArgs
    send: Callable  # send(outputs: dict | None, error: str | None, final: bool)
    responder: Responder
    cancelled: Callable[[], bool] = lambda: False
    on_finish: Callable[["Stream"], None] = lambda s: None
    future: object = field(default=None, init=False)

    def start(self) -> "Stream":
        """Submit to the Pipeline's scheduler; raises (before anything is sent) on a bad request."""
        steps = preview_steps(self.pipe.config.ar_steps, self.args.partial_images)
        params = self.args.params(self.pipe.limits)  # (made when parsed; again only if changed since)
        self.future = self.pipe.submit(params=params, preview_every=steps, on_progress=self._event)
        self.future.add_done_callback(self._done)
        return self

    def _event(self, progress) -> None:  # the scheduler's thread: queue, never block on Triton
        image = None
        if progress.preview is not None:
            previews = progress.preview if isinstance(progress.preview, list) else [progress.preview]
            image = np.stack([np.asarray(p) for p in previews])
        step = progress.step
        self.responder.put(lambda: self._progress(step, image))

    def _progress(self, step: int, image) -> None:
        if self.cancelled():  # (asking Triton is a round trip: on the responder's thread)
            if self.future is not None:
                self.pipe.cancel(self.future)
        elif image is not None:
            self.send(outputs(image, step, False), None, False)

    def _done(self, future) -> None:
        def answer():
            try:
                if future.cancelled() or isinstance(future.exception(), CancelledError):
                    self.send(None, "the request was cancelled", True)
                elif future.exception() is not None:
                    self.send(None, f"generation failed: {future.exception()}", True)
                else:
                    self.send(outputs(to_uint8(future.result().image), self.pipe.config.ar_steps, True), None, True)
            finally:
                self.on_finish(self)

        self.responder.put(answer)

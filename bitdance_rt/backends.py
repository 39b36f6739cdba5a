"""Make a ready backend for a model: what the Pipeline does once at start-up.

torch: the model with its weights. onnxruntime: the cached FP32 export of the model (exported on
first use), and for fp16 / int8 its derived variant (the INT8 calibration set captured once and
cached), or a given export directory. tensorrt: engines built (and cached) from an export
directory, or from the cached export when none is given. ImageNet and text-to-image models take
the same paths; what a backend cannot do is one clear error, never a silent fallback.
(Over 400 lines: the graphs each backend runs are made here too, per precision and model family
(auto_export and its streamed and INT4 branches); those could move to a module of their own.)
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import BitDanceError
from .precision.policy import PRECISIONS, int4_format
from .stages import DEFAULT_MAX_BATCH

BACKENDS = ("onnxruntime", "torch", "tensorrt")
logger = logging.getLogger(__name__)


def default_backend() -> str:
    """onnxruntime when it is installed (the fast path), else the torch reference."""
    return "onnxruntime" if importlib.util.find_spec("onnxruntime") is not None else "torch"


@dataclass
class BackendOptions:
    """How to run a model. Defaults: the fast backend installed here, FP32, CPU, all cores."""

    backend: str | None = None  # onnxruntime | torch | tensorrt (None: default_backend())
    precision: str | None = None  # precision.policy.PRECISIONS (None: fp32, or a given export's)
    device: str = "cpu"  # cpu | cuda | cuda:N
    threads: int | None = None
    max_batch: int = DEFAULT_MAX_BATCH  # images one call holds (the exported graphs' and engines' range)
    export_dir: str | None = None  # an ONNX export to run (default: the cached automatic export)
    ort_provider: str | None = None  # cpu | cuda | tensorrt (default: cuda with a cuda device)
    ort_cache: bool = True  # keep ONNX Runtime's optimised graphs between processes
    engine_dir: str | None = None
    workspace_mb: int | None = None
    cuda_graphs: bool = True
    weight_streaming_budget: int | None = None  # tensorrt: bytes of the backbone's weights kept on the GPU
    calibration: str | None = None  # INT8 calibration set directory (default: cached set)
    calib_method: str = "max"
    keep_float: tuple = ()
    allow_pickle: bool = False
    cfg_scale: float | None = None  # guidance of the INT8 calibration run (default: the model's)
    cfg_schedule: str | None = None
    progress: bool = True

    def __post_init__(self):
        if self.backend is not None and self.backend not in BACKENDS:
            raise BitDanceError(f"backend {self.backend!r}: use one of {', '.join(BACKENDS)}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise BitDanceError(f"precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise BitDanceError(f"threads must be a positive integer, got {self.threads!r}")
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise BitDanceError(f"max batch must be a positive integer, got {self.max_batch!r}")
        if self.weight_streaming_budget is not None:
            if self.backend != "tensorrt":
                raise BitDanceError("a weight streaming budget is TensorRT's weight streaming: use backend tensorrt")
            if not isinstance(self.weight_streaming_budget, int) or self.weight_streaming_budget < 0:
                raise BitDanceError(f"weight streaming budget must be bytes >= 0, got {self.weight_streaming_budget!r}")


@dataclass
class ModelSource:
    """A model to run: its config and weights (ImageNet: checkpoint + vae files; T2I: a directory)."""

    config: object
    checkpoint: str | None = None
    vae: str | None = None
    t2i: bool = False

    def weights_source(self) -> str:
        """The string that names these weights in export and calibration keys."""
        from .export import checkpoint_source, random_source
        from .loading import EMBEDDED_SEED

        if self.t2i:
            from .t2i.loading import checkpoint_dir_source

            return checkpoint_dir_source(self.checkpoint)
        return checkpoint_source(self.checkpoint, self.vae) if self.checkpoint else random_source(EMBEDDED_SEED)

    def load(self, allow_pickle: bool = False):
        """The torch model with its weights (random seeded weights when no checkpoint is given)."""
        if self.t2i:
            from .t2i.loading import load_t2i

            cfg = self.config
            return load_t2i(self.checkpoint, cfg.height, cfg.width, config=cfg).model
        from .loading import load_model

        return load_model(self.config, self.checkpoint, self.vae, allow_pickle).model

    def describe(self) -> str:
        name = self.config.name
        if self.checkpoint:
            return f"{name} from {Path(self.checkpoint).name}" + (f" + {Path(self.vae).name}" if self.vae else "")
        return f"{name} with seeded random weights"


def resolve_model(model, checkpoint, vae, height, width, max_text_tokens) -> ModelSource:
    """`model` a preset, config file or config (default: the embedded model, with its shipped
    weights when no weight files are given); or `checkpoint` a text-to-image checkpoint: a directory
    (official or diffusers layout, or the ComfyUI files) or a ComfyUI main-model file (t2i/layouts.py)."""
    from .t2i.layouts import is_t2i_checkpoint

    if is_t2i_checkpoint(checkpoint):
        from .t2i.config import DEFAULT_MAX_TEXT_TOKENS, check_resolution, read_checkpoint_config

        if model is not None:
            raise BitDanceError(
                f"checkpoint {checkpoint} is a text-to-image checkpoint, which names its own model: "
                f"drop model={model!r}"
            )
        if vae is not None:
            raise BitDanceError("a text-to-image checkpoint holds its own autoencoder: drop vae")
        height, width = height or 1024, width or 1024
        check_resolution(height, width)
        cfg = read_checkpoint_config(checkpoint, height, width, max_text_tokens or DEFAULT_MAX_TEXT_TOKENS)
        return ModelSource(cfg, str(checkpoint), None, t2i=True)
    if height is not None or width is not None or max_text_tokens is not None:
        raise BitDanceError(
            "height / width / max_text_tokens are for text-to-image checkpoints (a directory); "
            "ImageNet models have one image size"
        )
    from .config import EMBEDDED_MODEL, ModelConfig, load_config
    from .loading import embedded_checkpoint

    cfg = model if isinstance(model, ModelConfig) else load_config(model or EMBEDDED_MODEL)
    checkpoint = embedded_checkpoint(cfg, checkpoint, vae)
    return ModelSource(cfg, None if checkpoint is None else str(checkpoint), None if vae is None else str(vae))


def make_backend(model: ModelSource, steps: int, opts: BackendOptions):
    """(backend, one line saying what runs) for `model` with the fused sampler of S = `steps`."""
    import torch

    name = opts.backend or default_backend()
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise BitDanceError(f"device {opts.device}: CUDA is not available on this machine")
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    if name == "torch":
        from .runtime.torch_backend import TorchBackend, check_torch_precision

        precision = check_torch_precision(opts.precision, opts.device)  # (before the weights are read)
        backend = TorchBackend(model.load(opts.allow_pickle), opts.device, opts.max_batch, precision)
        kind = "float32" if precision == "fp32" else "bf16 autocast"
        return backend, f"{model.describe()} on torch ({opts.device}, {kind})"
    if name == "onnxruntime":
        return _ort_backend(model, steps, opts)
    if not torch.cuda.is_available():  # before exporting anything for it
        raise BitDanceError("backend tensorrt needs a CUDA GPU, and torch sees none here")
    return _trt_backend(model, steps, opts)


# ---- exports ------------------------------------------------------------------------------
def _limits(opts: BackendOptions):
    from .stages import Limits

    return Limits(max_batch=opts.max_batch, opt_batch=min(4, opts.max_batch))


def export_for(model: ModelSource, out, steps: int, opts: BackendOptions, stages=None, **options):
    """Export (or reuse, without reading the weights) `out` for the model's weights."""
    from .export import export_stages
    from .export.manifest import DEFAULT_OPSET, manifest_key
    from .export.onnx_export import ExportResult, find_reusable
    from .stages import GENERATION_STAGES, SAMPLER_STAGES

    stages = list(stages or GENERATION_STAGES)
    limits = options.pop("limits", None) or _limits(opts)
    if model.t2i:
        return streamed_export(model, out, steps, opts, "fp32", stages, limits=limits, **options)
    source = model.weights_source()
    if model.vae and not model.checkpoint:
        raise BitDanceError("--vae needs --checkpoint: the random-weight default has no checkpoint to pair it with")
    key = manifest_key(
        model.config,
        source,
        stages,
        options.get("opset", DEFAULT_OPSET),
        steps if any(s in SAMPLER_STAGES for s in stages) else None,
        limits,
    )
    if not options.get("force") and (manifest := find_reusable(out, key)) is not None:
        return ExportResult(Path(out), manifest, True)  # weights not read at all
    options.setdefault("progress", opts.progress)
    return export_stages(
        model.load(opts.allow_pickle), out, source, stages=stages, sampler_steps=steps, limits=limits, **options
    )


def streamed_export(model: ModelSource, out, steps: int, opts: BackendOptions, precision: str, stages=None, **options):
    """A text-to-image export written straight from the weight files (precision/streamed.py): the
    weights are streamed tensor by tensor, never loaded as a float32 model."""
    from .precision.streamed import export_precision_streamed
    from .stages import GENERATION_STAGES
    from .t2i.loading import weightless_t2i

    options.setdefault("limits", _limits(opts))
    options.setdefault("progress", opts.progress)
    skeleton, weights = weightless_t2i(model.checkpoint, model.config)
    return export_precision_streamed(
        skeleton,
        weights,
        out,
        model.weights_source(),
        precision,
        stages=list(stages or GENERATION_STAGES),
        sampler_steps=steps,
        **options,
    )


def auto_export(model: ModelSource, steps: int, opts: BackendOptions, precision: str, out=None) -> Path:
    """The cached FP32 export of the model and, for fp16 / int8, its derived variant (into `out`
    when given); the INT8 calibration set is opts.calibration or the cached default set.
    Text-to-image FP16, BF16 and INT8 graphs are written straight from the weight files, with no FP32 export."""
    from . import paths
    from .precision.auto import precision_export

    fp32 = paths.export_dir(model.config, model.weights_source(), steps, opts.max_batch)
    runtime = opts.backend if opts.backend in ("onnxruntime", "tensorrt") else None  # (INT4's graph format)
    if opts.keep_float and precision not in ("int8", "int4"):  # (before anything is exported)
        raise BitDanceError("--keep-float is for --precision int8 or int4")
    if precision == "int4" and (model.t2i or int4_format(runtime) == "qdq"):
        return _trt_int4(model, steps, opts, runtime, out)
    if model.t2i and precision == "int8":
        return _streamed_int8(model, steps, opts, fp32, out)
    if model.t2i and precision in ("fp16", "bf16"):
        if opts.calibration:
            raise BitDanceError(f"a calibration set is for precision int8 ({precision} graphs need none)")
        out = Path(out) if out is not None else paths.variant_dir(fp32, precision)
        result = streamed_export(model, out, steps, opts, precision)
        how = "reused" if result.reused else "exported from the weight files"
        logger.info("%s graphs: %s (%s)", precision.upper(), out, how)
        return out
    result = export_for(model, fp32, steps, opts)
    logger.info("ONNX export: %s (%s)", fp32, "reused" if result.reused else "exported")
    if precision == "fp32":
        return fp32
    calibration = None
    if precision == "int8":
        calibration = _calibration(model, steps, opts, fp32_export=fp32)
    elif opts.calibration:
        raise BitDanceError(f"a calibration set is for precision int8 ({precision} graphs need none)")
    variant = precision_export(
        fp32,
        precision,
        calibration,
        opts.calib_method,
        out_dir=out,
        keep_float=opts.keep_float,
        runtime=runtime,
        progress=opts.progress,
    )
    logger.info("%s graphs: %s (%s)", precision.upper(), variant.directory, "reused" if variant.reused else "derived")
    return variant.directory


def _trt_int4(model: ModelSource, steps: int, opts: BackendOptions, runtime: str | None, out=None) -> Path:
    """TensorRT's INT4 graphs (FP16 graphs with INT4 weights, precision/int4.py), written from the model's
    FP16 graphs a weight at a time: the FP16 variant (reused when cached), or for a text-to-image model
    the FP16 graphs streamed from the weight files (no FP32 export on the way). ONNX Runtime's MatMulNBits
    graphs of a text-to-image model would come from FP32 graphs, which would hold the 14B in float32:
    refused. `runtime`: auto_export's (INT4's graph format)."""
    from .precision.auto import precision_export

    if int4_format(runtime) != "qdq":
        raise BitDanceError(
            "--precision int4 of a text-to-image model is TensorRT's (FP16 graphs with INT4 weights, written "
            "from the weight files): use --backend tensorrt; ONNX Runtime's INT4 graphs would need an FP32 "
            "export of the 14B (use fp16 or int8 there)"
        )
    fp16 = auto_export(model, steps, replace(opts, keep_float=(), calibration=None), "fp16")
    variant = precision_export(
        fp16, "int4", out_dir=out, keep_float=opts.keep_float, runtime="tensorrt", progress=opts.progress
    )
    logger.info("INT4 graphs: %s (%s)", variant.directory, "reused" if variant.reused else "written from FP16 graphs")
    return variant.directory


def _calibration(model: ModelSource, steps: int, opts: BackendOptions, **where):
    """The INT8 calibration set of `model` (opts.calibration, else the cached default set: captured
    once, on the graphs `where` names: fp32_export or ready_export, see calibration_for)."""
    from .precision.auto import calibration_for
    from .sampling import schedule_for

    cfg = model.config
    encoder = None
    if model.t2i:  # captured from text-to-image trajectories of DEFAULT_T2I_PROMPTS
        from .t2i.prompt import PromptEncoder

        encoder = PromptEncoder(Path(model.checkpoint) / "tokenizer.json", cfg)
    return calibration_for(
        cfg,
        model.weights_source(),
        steps,
        cfg.default_cfg if opts.cfg_scale is None else opts.cfg_scale,
        schedule_for(opts.cfg_schedule, cfg),
        lambda: model.load(opts.allow_pickle),
        opts.calibration,
        prompt_encoder=encoder,
        threads=opts.threads,
        providers=ort_providers(opts),
        **where,
    )


def _streamed_int8(model: ModelSource, steps: int, opts: BackendOptions, fp32: Path, out=None) -> Path:
    """Text-to-image INT8 graphs written from the weight files, with no FP32 export on the way: the
    streamed FP16 export runs the calibration capture and measures the activation ranges
    (precision/fp16_ranges.py), then the INT8 graphs are written from the weights with those ranges
    (precision/streamed_int8.py); the stages INT8 leaves alone are FP16. A --calibration set captured
    on FP16 graphs that are still there (calibrate --capture-export DIR) has its ranges measured on them."""
    from . import paths
    from .calibration.producer import captured_on
    from .precision.auto import keep_float_by_stage
    from .precision.fp16_ranges import ranges_for

    calibration = fp16 = None
    if opts.calibration:  # a set captured on FP16 graphs of these weights: its ranges are measured on them
        calibration = _calibration(model, steps, opts)
        fp16 = captured_on(calibration)
    if fp16 is None:
        fp16 = auto_export(model, steps, replace(opts, keep_float=(), calibration=None), "fp16")
    if calibration is None:
        calibration = _calibration(model, steps, opts, ready_export=fp16)
    ranges = ranges_for(fp16, calibration, opts.calib_method, opts.threads, ort_providers(opts))
    keep = keep_float_by_stage(fp16, opts.keep_float) if opts.keep_float else {}
    if out is None:
        out = paths.variant_dir(fp32, "int8", calibration.key, opts.calib_method, opts.keep_float)
    result = streamed_export(model, out, steps, opts, "int8", ranges=ranges, keep_float=keep)
    logger.info("INT8 graphs: %s (%s)", out, "reused" if result.reused else "written from the weight files")
    return Path(out)


def ort_providers(opts: BackendOptions) -> list:
    """The provider list. The TensorRT EP sends only the subgraphs TensorRT supports to TensorRT and
    the rest to the next provider in the list, so CUDA follows it, as in ONNX Runtime's TensorRT EP
    usage (onnxruntime.ai/docs/execution-providers/TensorRT-ExecutionProvider.html). A device
    cuda:N puts both GPU providers on GPU N (their `device_id` option)."""
    provider = opts.ort_provider or ("cuda" if opts.device.startswith("cuda") else "cpu")
    names = ["tensorrt", "cuda"] if provider == "tensorrt" else [provider]
    _, _, index = opts.device.partition(":")
    if not opts.device.startswith("cuda") or not index:
        return names
    if not index.isdigit():
        raise BitDanceError(f"device {opts.device!r}: expected cuda or cuda:N with N a GPU index")
    return [(n, {"device_id": int(index)}) if n in ("cuda", "tensorrt") else n for n in names]


def _ort_backend(model: ModelSource, steps: int, opts: BackendOptions):
    from .export.manifest import read_manifest
    from .precision.derive import graph_precision
    from .runtime.int8_kernels import kernels_note
    from .runtime.ort_backend import OrtBackend

    providers = ort_providers(opts)
    cfg = model.config
    optimized = _ort_cache_dir(opts)
    if opts.export_dir:
        if opts.keep_float:
            raise BitDanceError(
                "keep-float applies when INT8 graphs are derived, not to an export directory; "
                "derive them with bitdance-rt export --precision int8 --keep-float ..."
            )
        held = graph_precision(read_manifest(opts.export_dir))
        if opts.precision not in (None, held):
            raise BitDanceError(
                f"export {opts.export_dir} holds {held} graphs, not {opts.precision}: drop the "
                f"precision, or make a {opts.precision} export (bitdance-rt export --precision "
                f"{opts.precision})"
            )
        _check_ort_precision(held, providers)
        backend = OrtBackend(
            opts.export_dir, threads=opts.threads, providers=providers, expect_config=cfg, session_cache=optimized
        )
        what = f"{cfg.name} from {held} ONNX export {opts.export_dir}"
    else:
        precision = opts.precision or "fp32"
        _check_ort_precision(precision, providers)  # (before deriving graphs that would not run)
        out = auto_export(model, steps, opts, precision)
        # the export was verified when it was made (and is re-verified by cached file hashes)
        backend = OrtBackend(out, threads=opts.threads, providers=providers, expect_config=cfg, session_cache=optimized)
        what = f"{model.describe()} on onnxruntime ({precision})"
    if backend.manifest.get("precision") == "int8":
        what += f"; {kernels_note(backend.int8_exact)}"
    return backend, what


def _check_ort_precision(precision: str, providers) -> None:
    """BF16 graphs do not run on ONNX Runtime's CPU provider, which has no BF16 MatMul kernel."""
    names = {p[0] if isinstance(p, tuple) else p for p in providers}
    if precision == "bf16" and names <= {"cpu"}:
        raise BitDanceError(
            "precision bf16 does not run on ONNX Runtime's CPU provider (no BF16 MatMul): run it on a GPU, "
            "with backend tensorrt or backend torch on a CUDA device (bitdance-rt export --precision bf16 "
            "writes the graphs on any machine)"
        )


def _ort_cache_dir(opts: BackendOptions):
    """Where ONNX Runtime's optimised graphs are kept between processes (None: not kept)."""
    from . import paths

    return paths.ort_optimized_root() if opts.ort_cache else None


def _trt_backend(model: ModelSource, steps: int, opts: BackendOptions):
    """Build before run: the engines are built (or found in the engine cache) by engines.build on the
    device, then handed to the backend, which only deserialises and binds them."""
    import torch

    from .engines.build import build_engines
    from .export.reader import open_export
    from .runtime.trt_backend import TrtBackend, cuda_device

    export_dir = opts.export_dir
    if export_dir is None:  # engines from the graphs of the precision asked, made as for onnxruntime (FP16
        # graphs: a strongly typed network on TensorRT 10 and 11 alike; INT8 calibrated on the default set;
        # INT4 in TensorRT's form)
        export_dir = auto_export(model, steps, opts, opts.precision or "fp32")
    device = cuda_device(opts.device if opts.device.startswith("cuda") else "cuda")
    # another model's export, or one that cannot generate, is refused before anything is built
    export = open_export(export_dir, model.config, generation=True)
    with torch.cuda.device(device):  # TensorRT builds on the current CUDA device
        engines = build_engines(
            export,
            opts.precision,
            opts.workspace_mb,
            stages=list(export.specs),
            root=opts.engine_dir,
            device=device.index,
            weight_streaming=opts.weight_streaming_budget is not None,
        )
    backend = TrtBackend(
        engines,
        device=device,
        cuda_graphs=opts.cuda_graphs,
        expect_config=model.config,
        weight_streaming_budget=opts.weight_streaming_budget,
    )
    return backend, f"{model.config.name} from TensorRT engines of {export_dir} ({backend.precision})"

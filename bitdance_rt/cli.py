"""`bitdance-rt` command line: generate images, convert checkpoints."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

from . import __version__
from .config import EMBEDDED_MODEL, PRESETS
from .errors import BitDanceError

from .backends import BACKENDS, default_backend  # noqa: F401  (default_backend: used by tests)
from .export.manifest import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET
from .precision.policy import CALIBRATION_METHODS, DEFAULT_PRECISION, PRECISIONS
from .stages import DEFAULT_MAX_BATCH


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help=f"{EMBEDDED_MODEL} (the embedded trained digits model), a preset ({', '.join(PRESETS)}) or "
                        f"a config .json in the official constructor-argument form; default: {EMBEDDED_MODEL}")
    p.add_argument("--checkpoint", default=None, help="model weights: official .pt ({'ema'|'model': ...}) or .safetensors")
    p.add_argument("--vae", default=None, help="autoencoder weights (ae_d16c32.pt); overrides vae.* keys of the checkpoint")
    p.add_argument("--unsafe-allow-pickle", action="store_true",
                   help="load .pt files with full unpickling (can execute code: only for files you trust)")


def _add_renamed(p, name: str, old: str, *, dest: str, required: bool = False, **kwargs) -> None:
    """Option `name`, also read under its former spelling `old`: that still works (giving both is an
    error) but --help shows only `name`."""
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument(name, dest=dest, **kwargs)
    group.add_argument(old, dest=dest, type=kwargs.get("type"), choices=kwargs.get("choices"),
                       default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _cuda_index(text: str) -> int:
    """A CUDA device for argparse: N, cuda or cuda:N (the spelling --device takes elsewhere) -> the index N."""
    value = text.strip().lower()
    value = "0" if value == "cuda" else value.removeprefix("cuda:")
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected cuda, cuda:N or a GPU index N, got {text!r}")
    return int(value)


def _checked(name: str, kind=int):
    """An argparse type running runtime/params.py's check_<name> (one cap per value everywhere);
    imported when parsing, so that `--help` stays light."""
    def parse(text: str):
        from .runtime import params

        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        try:
            return getattr(params, f"check_{name}")(value)
        except params.ParamError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = name
    return parse


SEED, STEPS, CFG = _checked("seed"), _checked("steps"), _checked("cfg", float)


MEMORY_CHECK_HELP = ("go on even if a step (loading the model, the export, a capture or an INT8 derivation) needs "
                     "more host memory than this machine has available (bitdance-rt plan shows each step's)")
SCHEDULE_HELP = ("guidance over AR steps (default: the model's, as the official code: linear for ImageNet models, "
                 "constant for text-to-image)")


def _model(args):
    """The model of --model / --checkpoint / --vae (and --height / --width for text-to-image): its
    config only, no weights read yet."""
    from .backends import resolve_model

    t2i = _t2i_checkpoint(args.checkpoint)
    size = (getattr(args, "height", None), getattr(args, "width", None), getattr(args, "max_text_tokens", None))
    return resolve_model(args.model, args.checkpoint, getattr(args, "vae", None), *(size if t2i else (None, None, None)))


def _options(args, **extra):
    """The run options of the command line, typed (backends.BackendOptions)."""
    from .backends import BackendOptions

    fields = {"backend": "backend", "precision": "precision", "device": "device", "threads": "threads",
              "max_batch": "batch_size", "export_dir": "export_dir", "ort_provider": "ort_provider",
              "engine_dir": "engine_dir", "workspace_mb": "workspace_mb", "calibration": "calibration",
              "calib_method": "calib_method", "keep_float": "keep_float", "cfg_scale": "cfg",
              "cfg_schedule": "cfg_schedule"}
    values = {k: getattr(args, a) for k, a in fields.items() if getattr(args, a, None) is not None}
    if "keep_float" in values:
        values["keep_float"] = tuple(values["keep_float"])
    values["cuda_graphs"] = not getattr(args, "no_cuda_graphs", False)
    values["allow_pickle"] = args.unsafe_allow_pickle
    values["progress"] = not getattr(args, "quiet", False)
    values.update(extra)
    return BackendOptions(**values)


def _add_t2i_args(p: argparse.ArgumentParser) -> None:
    """Text-to-image (--checkpoint DIR of BitDance-14B-16x/-64x): image size from the official list."""
    p.add_argument("--height", type=int, default=None, help="text-to-image: image height (default 1024)")
    p.add_argument("--width", type=int, default=None, help="text-to-image: image width (default 1024)")
    p.add_argument("--max-text-tokens", type=int, default=None,
                   help="text-to-image: longest chat prompt in tokens, the padded prompt length of the graphs (default 256)")


def _t2i_checkpoint(checkpoint) -> bool:
    """A text-to-image checkpoint: a directory (official, diffusers, ComfyUI files) or a ComfyUI main-model file."""
    from .t2i.layouts import is_t2i_checkpoint

    return is_t2i_checkpoint(checkpoint)


def _is_t2i(args) -> bool:
    return getattr(args, "prompt", None) is not None or _t2i_checkpoint(args.checkpoint)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """Sampling and backend options shared by generate and eval."""
    p.add_argument("--cfg", type=CFG, default=None, help="classifier-free guidance scale G (default: the model's)")
    p.add_argument("--cfg-schedule", choices=("linear", "constant"), default=None, help=SCHEDULE_HELP)
    p.add_argument("--seed", type=SEED, default=0, help="seed of the one noise generator")
    _add_backend_args(p)


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    """How the model runs (generate, eval, serve): sampler steps, backend, precision, batch."""
    p.add_argument("--steps", type=STEPS, default=None, help="sampler steps S per AR step (default: the model's)")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="onnxruntime (default when installed) or torch (the float32 reference)")
    p.add_argument("--export-dir", default=None,
                   help="ONNX export to run with --backend onnxruntime (default: an automatic, cached export "
                        "under $BITDANCE_RT_CACHE or ~/.cache/bitdance-rt)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (torch device / ONNX Runtime CUDA EP)")
    _add_renamed(p, "--max-batch", "--batch-size", dest="batch_size", type=int, metavar="N", default=DEFAULT_MAX_BATCH,
                 help=f"most images per batch (default {DEFAULT_MAX_BATCH}: the graphs' and the scheduler's "
                      "maximum); labels are generated in parts of this size, the same on every backend, so results "
                      "agree")
    _add_precision_args(p)
    _add_accelerator_args(p)


def _add_precision_args(p: argparse.ArgumentParser) -> None:
    """Graph precision and INT8 calibration (generate, eval, export)."""
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help=f"graph precision: {', '.join(PRECISIONS)} (default {DEFAULT_PRECISION}; int8: Q/DQ, "
                        "calibrated); onnxruntime derives and caches the graphs; tensorrt: the engine precision "
                        "(default: the export's)")
    p.add_argument("--calibration", default=None,
                   help="INT8 calibration set (bitdance-rt calibrate --out DIR); default: a set captured once from "
                        "the model and cached")
    p.add_argument("--calib-method", choices=CALIBRATION_METHODS, default=CALIBRATION_METHODS[0],
                   help=f"INT8 activation range method (default {CALIBRATION_METHODS[0]})")
    p.add_argument("--keep-float", nargs="+", default=(), metavar="LAYER",
                   help="INT8: also keep these layers float (names as `calibrate --report --sensitivity` ranks "
                        "them, e.g. /layers.0/attention/wo/MatMul)")


def _add_accelerator_args(p: argparse.ArgumentParser) -> None:
    """ONNX Runtime execution provider and TensorRT engine options (generate, eval, check)."""
    p.add_argument("--ort-provider", choices=("cpu", "cuda", "tensorrt"), default=None,
                   help="ONNX Runtime execution provider for --backend onnxruntime (default: cuda with "
                        "--device cuda, else cpu)")
    p.add_argument("--engine-dir", default=None,
                   help="TensorRT engine cache (default: $BITDANCE_RT_CACHE/engines or ~/.cache/bitdance-rt/engines)")
    p.add_argument("--workspace-mb", type=int, default=None, help="TensorRT builder workspace cap in MiB")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="--backend tensorrt: run every call with execute_async_v3 (no CUDA graph replay)")


def _pipeline(args, source, steps: int, **extra):
    """The Pipeline of the command's options (export, variant and engines cached)."""
    from .pipeline import Pipeline

    pipe = Pipeline.load(source, steps, _options(args, **extra))
    print(f"model: {pipe.description}")
    if source.checkpoint is None:
        print(f"note: no --checkpoint given for {source.config.name}, so it runs with RANDOM weights: the images are "
              "noise patterns, not pictures (omit --model for the embedded trained model)")
    return pipe


def default_labels(cfg) -> list[int]:
    """One image per class for small models (the embedded digits: 0..9), else classes 0..7."""
    return list(range(cfg.num_classes if cfg.num_classes <= 16 else 8))


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (the CLI's contract for every error), status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bitdance-rt", description="BitDance deployment runtime")
    parser.add_argument("--version", action="version", version=f"bitdance-rt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate class-conditional images")
    _add_model_args(g)
    g.add_argument("--labels", type=int, nargs="+", default=None,
                   help="class labels, one image each (default: one per class for models of up to 16 classes, "
                        "else 0..7)")
    g.add_argument("--prompt", nargs="+", default=None,
                   help="text-to-image: prompt(s), one image each; --checkpoint is then the BitDance-14B directory")
    _add_t2i_args(g)
    _add_run_args(g)
    g.add_argument("--out", default="out", help="output directory for PNGs (default: ./out)")
    g.add_argument("--noise-from", default=None, help="replay recorded noise (noise_000, noise_001, ... in a .safetensors)")
    g.add_argument("--save-tokens", default=None, help="write tokens, latent and image to this .safetensors")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--ignore-memory-check", action="store_true", help=MEMORY_CHECK_HELP)

    e = sub.add_parser("export", help="export every stage to ONNX (+ manifest); reused when up to date")
    _add_model_args(e)
    e.add_argument("--out", required=True, help="export directory")
    e.add_argument("--steps", type=STEPS, default=None, help="sampler steps S baked into the fused head samplers")
    e.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (TensorRT 10.3 parses <= 20; default {DEFAULT_OPSET})")
    e.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                   help=f"largest batch (images) the graphs accept (default {DEFAULT_MAX_BATCH})")
    e.add_argument("--stages", nargs="+", default=None, help="stages to export (default: all)")
    e.add_argument("--force", action="store_true", help="re-export even if the directory is up to date")
    e.add_argument("--ignore-memory-check", action="store_true", help=MEMORY_CHECK_HELP)
    _add_precision_args(e)
    _add_t2i_args(e)

    ev = sub.add_parser("eval", help="score generated digits: classifier accuracy and Frechet distance "
                                     "(digits models such as the embedded default)")
    _add_model_args(ev)
    ev.add_argument("--per-class", type=int, default=50, help="samples per class (default: 50)")
    _add_run_args(ev)

    cal = sub.add_parser("calibrate", help="record the inputs every stage sees while generating (INT8/FP8 calibration data)")
    _add_model_args(cal)
    cal.add_argument("--out", required=True, help="calibration set directory (calibration.json + one .safetensors per stage)")
    cal.add_argument("--labels", type=int, nargs="+", default=None, help="class labels (default: every class)")
    cal.add_argument("--prompt", nargs="+", default=None,
                     help="text-to-image (--checkpoint DIR): prompts to record (default: the built-in calibration "
                          "prompts, shortened to fit --max-text-tokens)")
    _add_t2i_args(cal)
    cal.add_argument("--seeds", type=SEED, nargs="+", default=[0], help="noise seeds; every label is generated once per seed")
    cal.add_argument("--steps", type=STEPS, default=None, help="sampler steps S (match the export's S; default: the model's)")
    cal.add_argument("--cfg", type=CFG, default=None, help="classifier-free guidance scale G (default: the model's)")
    cal.add_argument("--cfg-schedule", choices=("linear", "constant"), default=None, help=SCHEDULE_HELP)
    cal.add_argument("--batch-size", type=int, default=4, help="images per recorded call (bounds a backbone sample's size)")
    cal.add_argument("--backbone-every", type=int, default=1, help="keep backbone steps 1, 1+k, 1+2k, ... (default 1)")
    cal.add_argument("--head-fraction", type=float, default=0.25, help="share of head-net evaluations kept (default 0.25)")
    cal.add_argument("--max-samples", type=int, default=256, help="most samples per stage, a uniform reservoir sample")
    cal.add_argument("--sample-seed", type=int, default=0, help="seed of the subsampling choices (not of the noise)")
    cal.add_argument("--capture-backend", choices=("torch", "onnxruntime"), default=None,
                     help="backend the recorded generations run on: torch (the float32 reference; default for "
                          "ImageNet models) or onnxruntime on the model's export (default for text-to-image "
                          "models: no float32 torch model needed)")
    cal.add_argument("--capture-precision", choices=("fp32", "fp16"), default=None,
                     help="graphs of an onnxruntime capture: fp32 or fp16 (derived and cached; default fp16 for "
                          "text-to-image models, else fp32); torch is fp32")
    cal.add_argument("--capture-export", default=None, metavar="DIR",
                     help="capture with onnxruntime on this export directory (of this model and weights, with "
                          "head_step; its graphs' precision) instead of the automatic cached export")
    cal.add_argument("--device", default="cpu",
                     help="device of the recording run: torch device, or cuda for ONNX Runtime's CUDA provider")
    cal.add_argument("--force", action="store_true", help="replace an existing set in --out")
    cal.add_argument("--ignore-memory-check", action="store_true", help=MEMORY_CHECK_HELP)
    cal.add_argument("--samples", type=int, default=None,
                     help="images to record per seed, labels cycling over --labels (default: each label once)")
    _add_renamed(cal, "--calib-method", "--method", dest="method", choices=CALIBRATION_METHODS,
                 default=CALIBRATION_METHODS[0],
                 help=f"INT8 activation range method of the --report's INT8 graphs (default {CALIBRATION_METHODS[0]})")
    cal.add_argument("--report", action="store_true",
                     help="then derive FP16 and INT8 graphs and measure them against FP32 (teacher-forced bit "
                          "agreement per stage, end to end, decoder PSNR): report.json + report.md in --out")
    cal.add_argument("--report-images", type=int, default=10, help="images of the report (default 10)")
    cal.add_argument("--report-seed", type=SEED, default=1000, help="noise seed of the report (default 1000: held out)")
    cal.add_argument("--sensitivity", action="store_true",
                     help="with --report: per-layer INT8 sensitivity (one INT8 derivation per quantised layer: slow)")
    cal.add_argument("--threads", type=int, default=None,
                     help="CPU threads of the ONNX Runtime runs (an onnxruntime capture, the report)")

    b = sub.add_parser("build", help="build TensorRT engines of an export (one per stage, cached; needs a GPU)")
    _add_renamed(b, "--export-dir", "--export", dest="export", required=True, metavar="DIR",
                 help="export directory (bitdance-rt export --out DIR)")
    b.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="engine precision (default: the export's graph precision; fp16 from fp32 graphs uses the "
                        "TensorRT 10.x FP16 flag)")
    b.add_argument("--workspace-mb", type=int, default=None, help="workspace memory-pool cap in MiB (Jetson: e.g. 1024)")
    b.add_argument("--opt-level", type=int, default=3, help="builder optimisation level 0..5 (default 3)")
    b.add_argument("--stages", nargs="+", default=None, help="stages to build (default: every stage of the export)")
    b.add_argument("--engine-dir", default=None, help="engine cache (default: $BITDANCE_RT_CACHE/engines)")
    b.add_argument("--device", type=_cuda_index, default=0, help="CUDA device: cuda, cuda:N or N (default 0)")
    b.add_argument("--lock-timeout", type=float, default=None, help="give up waiting for another builder after S s")
    b.add_argument("--no-lint", action="store_true", help="skip the ONNX-TensorRT operator lint before building")

    ck = sub.add_parser("check", help="compare an accelerated backend with the torch reference: every stage "
                                      "(Polygraphy comparator) and end-to-end tokens")
    _add_model_args(ck)
    ck.add_argument("--backend", choices=("onnxruntime", "tensorrt"), default="onnxruntime")
    ck.add_argument("--export-dir", required=True, help="the ONNX export to check (exported from the same weights)")
    ck.add_argument("--stages", nargs="+", default=None, help="stages to compare (default: every stage of the export)")
    ck.add_argument("--batch", type=int, default=2, help="images per stage comparison (rows = 2 x batch)")
    ck.add_argument("--noise-from", default=None,
                    help="also generate end to end with this recorded noise and compare the tokens with torch")
    ck.add_argument("--labels", type=int, nargs="+", default=None,
                    help="labels of the end-to-end run (default: the noise file's `labels`)")
    ck.add_argument("--steps", type=STEPS, default=None, help="sampler steps S of the end-to-end run (default: the export's)")
    ck.add_argument("--cfg", type=CFG, default=None, help="guidance scale of the end-to-end run (default: the model's)")
    ck.add_argument("--cfg-schedule", choices=("linear", "constant"), default=None, help=SCHEDULE_HELP)
    ck.add_argument("--min-agreement", type=float, default=None,
                    help="token agreement needed to pass (default: 1.0 for fp32, 0.98 fp16, 0.95 int8)")
    ck.add_argument("--precision", choices=PRECISIONS, default=None,
                    help="TensorRT engine precision (default: the export's graph precision)")
    ck.add_argument("--device", default="cpu", help="device of the torch reference and ONNX Runtime (cpu or cuda)")
    ck.add_argument("--threads", type=int, default=None, help="CPU threads")
    _add_accelerator_args(ck)

    sv = sub.add_parser("serve", help="serve OpenAI's Images API (POST /v1/images/generations), /health and "
                                      "/metrics over one warm model (needs the [serve] extra)")
    _add_model_args(sv)
    _add_t2i_args(sv)
    _add_backend_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=_port, default=8000, help="port, 0..65535 (default 8000; 0: any free port)")
    sv.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' on every route but /health, /docs included (default: "
                         "$BITDANCE_RT_API_KEY; no auth when unset; an empty key is an error, not 'no auth')")
    sv.add_argument("--max-queue", type=int, default=64,
                    help="requests waiting for cache rows before new ones get 429 + Retry-After (default 64)")
    sv.add_argument("--request-timeout", type=float, default=600.0,
                    help="seconds a request may take; then 504 and its rows are freed (default 600)")
    sv.add_argument("--max-images", type=int, default=16, help="images per request, n x labels (default 16)")
    sv.add_argument("--shutdown-timeout", type=float, default=30.0,
                    help="seconds SIGTERM waits for requests in flight before cancelling them (default 30)")
    sv.add_argument("--body-timeout", type=float, default=10.0,
                    help="seconds a client may take to send a request's headers, and as long again for its body; "
                         "then 408 and the connection is closed (default 10)")
    sv.add_argument("--max-body-bytes", type=int, default=1 << 20,
                    help="largest request body; larger ones get 413 (default 1048576)")
    sv.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                    help="uvicorn's log level (default info)")

    tr = sub.add_parser("triton-repo", help="write a Triton Inference Server model repository: one decoupled "
                                             "Python-backend model running an export in-process (docs/triton.md)")
    tr.add_argument("--export-dir", required=True, help="export directory to serve (bitdance-rt export --out DIR)")
    tr.add_argument("--out", required=True, help="model repository directory to write")
    tr.add_argument("--name", default="bitdance", help="Triton model name, its directory (default bitdance)")
    tr.add_argument("--backend", choices=("onnxruntime", "tensorrt"), default="onnxruntime",
                    help="the engine inside the model (default onnxruntime)")
    tr.add_argument("--precision", choices=PRECISIONS, default=None,
                    help="onnxruntime: must be the export's (default); tensorrt: the engine precision")
    tr.add_argument("--steps", type=STEPS, default=None, help="sampler steps S of the fused sampler (default: the export's)")
    tr.add_argument("--max-batch", type=int, default=None,
                    help="images one scheduler batch holds (default and most: the export's)")
    tr.add_argument("--max-images", type=int, default=None, help="most images one request may ask for (default: max batch)")
    tr.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="default: cuda with --gpus or --backend tensorrt, else cpu")
    tr.add_argument("--gpus", type=int, nargs="+", default=None, help="GPU indices: one KIND_GPU instance group each")
    tr.add_argument("--count", type=int, default=1,
                    help="instances per group (each holds its own Pipeline; 1 per GPU is usual; default 1)")
    tr.add_argument("--threads", type=int, default=None, help="CPU threads per instance")
    tr.add_argument("--ort-provider", choices=("cpu", "cuda", "tensorrt"), default=None, help="ONNX Runtime provider")
    tr.add_argument("--engine-dir", default=None, help="TensorRT engine cache of the model's process")
    tr.add_argument("--cache-dir", default=None, help="$BITDANCE_RT_CACHE of the model's process")
    tr.add_argument("--export-path", default=None,
                    help="the export's path as the server sees it (a container mount; default: --export-dir, absolute)")
    tr.add_argument("--model", default=None, help="a preset or config .json (default: the export manifest's config)")
    tr.add_argument("--checkpoint", default=None, help="text-to-image: the checkpoint directory (its tokenizer)")
    tr.add_argument("--vae", default=None, help="autoencoder weights, with --model")
    tr.add_argument("--force", action="store_true", help="replace --out")

    pl = sub.add_parser("plan", help="the memory a model needs (weights per stage, KV cache, activations, TensorRT "
                                     "workspace) at a precision, and which GPUs / Jetsons it fits; reads no weights")
    pl.add_argument("--model", default=None,
                    help=f"{EMBEDDED_MODEL} (default), an ImageNet preset ({', '.join(PRESETS)}), a text-to-image "
                         "model (BitDance-14B-16x, BitDance-14B-64x) or a config .json")
    pl.add_argument("--checkpoint", default=None, help="a text-to-image checkpoint directory (its config files)")
    _add_t2i_args(pl)
    pl.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                    help=f"graph precision (default {DEFAULT_PRECISION})")
    pl.add_argument("--backend", choices=("onnxruntime", "tensorrt", "torch"), default="tensorrt",
                    help="tensorrt (default) and onnxruntime hold each stage's weights; torch one model")
    _add_renamed(pl, "--max-batch", "--batch-size", dest="batch_size", type=int, metavar="N", default=1,
                 help="images the cache holds at once (the Pipeline's max batch; default 1)")
    pl.add_argument("--no-cfg", action="store_true", help="unguided: one cache row per image instead of two")
    pl.add_argument("--workspace-mb", type=int, default=None, help="TensorRT workspace (default 1024 MiB)")
    pl.add_argument("--target", nargs="+", default=None, metavar="T",
                    help="targets to check (default all): gpu-16gb gpu-24gb gpu-40gb gpu-48gb gpu-80gb orin-nano-8gb "
                         "orin-nx-16gb agx-orin-32gb agx-orin-64gb")
    pl.add_argument("--host-memory", default=None, metavar="SIZE",
                    help="the road's machine: its host memory, e.g. 64GB (GB read as GiB; default: this machine's)")
    pl.add_argument("--gpu", default=None, metavar="SIZE", help="the road's machine: its GPU's memory, e.g. 24GB")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON (with the road)")

    c = sub.add_parser("convert", help="convert a checkpoint to .safetensors (safe to load, fast to map)")
    _add_model_args(c)
    c.add_argument("--out", required=True, help="output .safetensors path")
    return parser


def _check_output(path, flag: str, directory: bool) -> None:
    """Refuse, before any work, an output path that cannot be written: a directory where a file is
    wanted, a file where a directory is wanted, or a path under a file."""
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        want = "a directory" if directory else "a file path"
        raise BitDanceError(f"{flag} {path}: it is {'a directory' if path.is_dir() else 'a file'}; give {want}")
    for parent in (path, *path.parents) if directory else path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise BitDanceError(f"{flag} {path}: {parent} is a file, so nothing can be written under it")
            import os

            if not os.access(parent, os.W_OK | os.X_OK):
                raise BitDanceError(f"{flag} {path}: {parent} is not writable")
            return


def cmd_generate(args) -> int:
    from .images import save_images, save_png, to_uint8
    from .runtime.loop import check_request
    from .runtime.timing import process_seconds
    from .sampling import ReplayNoise

    t2i = _is_t2i(args)
    if t2i and (args.labels is not None or args.model is not None):
        raise BitDanceError("--prompt (text-to-image) takes neither --labels nor --model: the model is --checkpoint DIR")
    if t2i and not _t2i_checkpoint(args.checkpoint):
        raise BitDanceError("text-to-image needs --checkpoint DIR: the BitDance-14B-16x / -64x directory "
                            "(config.json, model*.safetensors, tokenizer.json, ae*, vision_head*, "
                            "projector.safetensors), its diffusers conversion, or the ComfyUI BitDance files "
                            "(or their main-model file)")
    if t2i and args.prompt is None:
        raise BitDanceError(f"--checkpoint {args.checkpoint} is a text-to-image directory: give --prompt")
    _check_output(args.out, "--out", directory=True)
    if args.save_tokens:
        _check_output(args.save_tokens, "--save-tokens", directory=False)
    source = _model(args)
    cfg = source.config
    steps = cfg.default_steps if args.steps is None else args.steps
    scale = cfg.default_cfg if args.cfg is None else args.cfg
    labels = None
    if not t2i:
        labels = args.labels if args.labels is not None else default_labels(cfg)
        check_request(cfg.num_classes, labels, steps)  # before loading possibly large weights
    from .plan.preflight import for_generate

    for_generate(args, source, steps)  # one line if loading or exporting needs more memory than there is
    noise = ReplayNoise(args.noise_from) if args.noise_from else None
    with _pipeline(args, source, steps) as pipe:
        submitted = process_seconds()
        out = pipe.generate(labels=labels, prompt=args.prompt, steps=steps, cfg=scale, cfg_schedule=args.cfg_schedule,
                            seed=args.seed, noise=noise, progress=not args.quiet)
    first_step = None if submitted is None or out.first_step_seconds is None else submitted + out.first_step_seconds
    schedule = pipe.scheduler_schedule(args.cfg_schedule)
    if t2i:
        paths = [save_png(px, Path(args.out) / f"{i:03d}.png") for i, px in enumerate(to_uint8(out.image))]
        what, size = {"prompts": json.dumps(list(args.prompt))}, f"{cfg.height}x{cfg.width}"
    else:
        paths = save_images(out.image, labels, args.out)
        what, size = {"labels": json.dumps(labels)}, f"{cfg.image_size}x{cfg.image_size}"
    if args.save_tokens:
        from .checkpoint import save_safetensors

        save_safetensors({"tokens": out.tokens.float(), "latent": out.latent.float(), "image": out.image},
                         args.save_tokens, metadata={**what, "steps": str(steps), "cfg": str(scale),
                                                     "cfg_schedule": schedule})
    n = out.image.shape[0]
    print(f"generated {n} image(s) of {size} with {pipe.backend.name}: {cfg.ar_steps} AR steps x {steps} sampler "
          f"steps, cfg {scale} ({schedule}), {out.seconds:.2f} s, {n / max(out.seconds, 1e-9):.2f} images/s")
    if first_step is not None:
        print(f"start-up: the first AR step ended {first_step:.1f} s after the process started")
    if t2i:
        print(f"wrote {', '.join(str(p) for p in paths)}" + (f"; tokens -> {args.save_tokens}" if args.save_tokens else ""))
    else:
        print(f"wrote {len(paths) - 1} PNG(s) and {paths[-1]}" + (f"; tokens -> {args.save_tokens}" if args.save_tokens else ""))
    return 0


def cmd_export(args) -> int:
    from .backends import auto_export, export_for
    from .stages import Limits

    source = _model(args)
    cfg = source.config
    if source.t2i:
        from .t2i.prompt import PromptEncoder

        PromptEncoder(Path(args.checkpoint) / "tokenizer.json", cfg).image_tokens()  # a bad tokenizer fails now
    steps = cfg.default_steps if args.steps is None else args.steps
    if args.max_batch < 1:
        raise BitDanceError(f"--max-batch must be >= 1, got {args.max_batch}")
    opts = _options(args, max_batch=args.max_batch, progress=True)
    from .plan.preflight import for_export

    for_export(args, source, steps)  # one line, before any work, if a step needs more memory than there is
    if args.precision not in (None, "fp32"):
        if args.stages or args.opset != DEFAULT_OPSET or args.force:
            raise BitDanceError(f"--precision {args.precision} derives from the cached FP32 export of the same "
                                "--max-batch: --stages/--opset/--force apply to FP32 exports only")
        out = auto_export(source, steps, opts, args.precision, out=args.out)
        print(f"{out}: {args.precision} export ready")
        return 0
    result = export_for(source, args.out, steps, opts, stages=args.stages, opset=args.opset, force=args.force,
                        limits=Limits(max_batch=args.max_batch, opt_batch=min(4, args.max_batch)))
    state = "up to date, reused" if result.reused else "exported"
    print(f"{result.directory}: {state} ({', '.join(result.manifest['stage_files'])})")
    return 0


def cmd_eval(args) -> int:
    from .quality import score_images

    source = _model(args)
    cfg = source.config
    if source.t2i or cfg.num_classes != 10:
        raise BitDanceError(f"eval scores digits models (10 classes); {cfg.name} is not one")
    if args.per_class < 2:
        raise BitDanceError(f"--per-class must be >= 2, got {args.per_class}")
    steps = cfg.default_steps if args.steps is None else args.steps
    scale = cfg.default_cfg if args.cfg is None else args.cfg
    with _pipeline(args, source, steps) as pipe:
        out = pipe.generate(labels=list(range(10)), num_images=args.per_class, steps=steps, cfg=scale,
                            cfg_schedule=args.cfg_schedule, seed=args.seed)
    report = score_images(out.image.clamp(-1, 1), out.labels)
    print(f"{pipe.backend.name} {args.precision or 'fp32'}, {steps} sampler steps, cfg {scale} "
          f"({pipe.scheduler_schedule(args.cfg_schedule)}), seed {args.seed}")
    print(report)
    return 0


def cmd_calibrate(args) -> int:
    from .calibration import CapturePolicy, capture, describe_producer, save_calibration
    from .runtime.loop import check_request
    from .sampling import schedule_for

    source = _model(args)
    cfg = source.config
    steps = cfg.default_steps if args.steps is None else args.steps
    scale = cfg.default_cfg if args.cfg is None else args.cfg
    schedule = schedule_for(args.cfg_schedule, cfg)
    prompts = None
    if source.t2i:
        from .precision.auto import fitting_prompts, default_prompts
        from .t2i.prompt import PromptEncoder

        if args.labels is not None:
            raise BitDanceError("--labels are for class-conditional models; a text-to-image model takes --prompt")
        encoder = PromptEncoder(Path(source.checkpoint) / "tokenizer.json", cfg)
        labels = list(args.prompt) if args.prompt else fitting_prompts(default_prompts(), encoder)
    else:
        if args.prompt is not None:
            raise BitDanceError(f"--prompt is for text-to-image models; {cfg.name} takes --labels")
        labels = args.labels if args.labels is not None else list(range(cfg.num_classes))
    if args.samples is not None:  # images per seed, cycling over the labels (or prompts)
        if args.samples < 1:
            raise BitDanceError(f"--samples must be >= 1, got {args.samples}")
        labels = [labels[i % len(labels)] for i in range(args.samples)] if labels else labels
    if source.t2i:
        prompts = encoder.encode(labels)
    else:
        check_request(cfg.num_classes, labels, steps)
    if args.sensitivity and not args.report:
        raise BitDanceError("--sensitivity is part of the report: add --report")
    if args.report_images < 1:
        raise BitDanceError(f"--report-images must be >= 1, got {args.report_images}")
    if args.batch_size < 1:
        raise BitDanceError(f"--batch-size must be >= 1, got {args.batch_size}")
    if Path(args.out).exists() and not args.force:
        raise BitDanceError(f"--out {args.out} exists: pass --force to replace it")
    policy = CapturePolicy(args.backbone_every, args.head_fraction, args.max_samples, args.sample_seed)
    from .plan.preflight import for_calibrate

    for_calibrate(args, source, steps, len(labels))  # one line if a step needs more memory than there is
    weights = source.weights_source()
    backend, origin = _capture_backend(args, source, steps)  # (checks the choice before exporting)
    try:
        result = capture(None if backend else source.load(args.unsafe_allow_pickle), weights,
                         None if prompts is not None else labels, args.seeds, steps, scale, schedule, policy,
                         args.batch_size, args.device, progress=True, prompts=prompts, backend=backend, origin=origin)
    finally:
        if backend is not None:
            backend.close()
    out = save_calibration(result.dataset, args.out, overwrite=args.force)
    counts = ", ".join(f"{stage} {len(s)}" for stage, s in result.dataset.samples.items())
    producer = describe_producer(result.dataset.producer, origin.get("export_dir"))
    print(f"model: {source.describe()}; captured with {producer}")
    print(f"wrote calibration set {out}: {len(labels)} {'prompt' if prompts is not None else 'label'}(s) x "
          f"{len(args.seeds)} seed(s), S={steps}, "
          f"cfg {scale} ({schedule}); samples: {counts}")
    if args.report:
        _calibration_report(args, source, out, steps, scale, schedule)
    return 0


def _capture_backend(args, source, steps: int):
    """`calibrate`'s ONNX Runtime capture backend and the notes for the set's manifest, or (None, {})
    for the torch reference (--capture-backend / --capture-precision / --capture-export)."""
    from .backends import BackendOptions, auto_export, ort_providers
    from .calibration import capture_choice, ort_capture_backend
    from .export.manifest import read_manifest
    from .precision.derive import graph_precision

    if args.capture_export is not None:
        if args.capture_backend == "torch":
            raise BitDanceError("--capture-export is an onnxruntime capture: drop --capture-backend torch")
        export = Path(args.capture_export)
        held = graph_precision(read_manifest(export))
        if args.capture_precision not in (None, held):
            raise BitDanceError(f"--capture-export {export} holds {held} graphs, not --capture-precision "
                                f"{args.capture_precision}")
    else:
        name, precision = capture_choice(source.t2i, args.capture_backend, args.capture_precision)
        if name == "torch":
            return None, {}
        opts = BackendOptions(allow_pickle=args.unsafe_allow_pickle, max_batch=max(16, args.batch_size))
        export = auto_export(source, steps, opts, precision)
    providers = ort_providers(BackendOptions(device=args.device))
    backend = ort_capture_backend(export, threads=args.threads, providers=providers, expect_config=source.config,
                                  expect_source=source.weights_source())
    return backend, {"export_dir": str(export)}


def _calibration_report(args, source, set_dir: Path, steps: int, scale: float, schedule: str) -> None:
    from .backends import BackendOptions, auto_export
    from .calibration import load_calibration
    from .precision.accuracy import accuracy_report
    from .precision.auto import default_labels as report_labels
    from .precision.report_files import markdown, write_report
    from .runtime.ort_backend import OrtBackend

    cfg, weights = source.config, source.weights_source()
    fp32 = auto_export(source, steps, BackendOptions(allow_pickle=args.unsafe_allow_pickle), "fp32")
    cset = load_calibration(set_dir, config=cfg, weights=weights)
    if source.t2i:  # held-out prompts (none is a calibration prompt), shortened to fit the graphs
        from .precision.auto import fitting_prompts, report_prompts
        from .t2i.prompt import PromptEncoder

        encoder = PromptEncoder(Path(source.checkpoint) / "tokenizer.json", cfg)
        condition = encoder.encode(fitting_prompts(report_prompts(args.report_images), encoder))
    else:
        condition = report_labels(cfg, args.report_images)
    report = accuracy_report(cfg, weights, fp32, cset, args.method, condition,
                             [args.report_seed], steps, scale, schedule,
                             lambda d: OrtBackend(d, threads=args.threads, verify_hashes=False),
                             sensitivity=args.sensitivity)
    js, md = write_report(report, set_dir)
    print(markdown(report))
    print(f"report: {js} and {md}")


def cmd_build(args) -> int:
    # No torch on this path: on Jetson the build runs in a lean process (docs/tensorrt.md).
    from .engines.build import TensorRT, build_engines

    toolkit = TensorRT(device=args.device)
    built = build_engines(args.export, precision=args.precision, workspace_mb=args.workspace_mb,
                          level=args.opt_level, stages=args.stages, root=args.engine_dir, toolkit=toolkit,
                          lint=not args.no_lint, lock_timeout=args.lock_timeout)
    counts = {s: sum(b.status == s for b in built.values()) for s in ("built", "rebuilt", "cached")}
    print(f"engines of {args.export}: {counts['built']} built, {counts['rebuilt']} rebuilt, {counts['cached']} cached "
          f"(TensorRT {toolkit.version}, {toolkit.gpu.name})")
    return 0


def cmd_check(args) -> int:
    from .check import CheckRequest, run_check

    request = CheckRequest(args.export_dir, args.stages, args.batch, args.noise_from, args.labels, args.steps,
                           args.cfg, args.cfg_schedule, args.min_agreement)
    report = run_check(_model(args), _options(args, max_batch=16), request)
    print(report.text())
    return 0 if report.passed else 1


def _port(text: str) -> int:
    """A TCP port for argparse (-1 or 70000 would fail deep inside the server, after the model started loading)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer 0..65535, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535, got {port}")
    return port


def _api_key(args) -> str | None:
    """--api-key, else $BITDANCE_RT_API_KEY; None (no auth) only when neither is given: an empty key is
    a mistake (an unset variable in a script), refused rather than served without auth."""
    import os

    given, where = (args.api_key, "--api-key") if args.api_key is not None else \
        (os.environ.get("BITDANCE_RT_API_KEY"), "$BITDANCE_RT_API_KEY")
    if given is not None and not given.strip():
        raise BitDanceError(f"{where} is empty: give a key, or leave both --api-key and $BITDANCE_RT_API_KEY "
                            "unset to serve without auth")
    return None if given is None else given.strip()


def cmd_serve(args) -> int:
    from .serve import ServerSettings, serve

    api_key = _api_key(args)
    for name in ("shutdown_timeout", "body_timeout", "max_body_bytes"):
        if not getattr(args, name) > 0:
            raise BitDanceError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    source = _model(args)
    steps = source.config.default_steps if args.steps is None else args.steps
    for name in ("max_queue", "max_images"):
        if getattr(args, name) < (0 if name == "max_queue" else 1):
            raise BitDanceError(f"--{name.replace('_', '-')} must be >= {0 if name == 'max_queue' else 1}, "
                                f"got {getattr(args, name)}")
    if args.request_timeout <= 0:
        raise BitDanceError(f"--request-timeout must be > 0 seconds, got {args.request_timeout}")
    settings = ServerSettings(max_queue=args.max_queue, request_timeout=args.request_timeout,
                              max_images=args.max_images, api_key=api_key, shutdown_timeout=args.shutdown_timeout,
                              body_timeout=args.body_timeout, max_body_bytes=args.max_body_bytes)
    print(f"bitdance-rt serve: {source.config.name} on http://{args.host}:{args.port} (GET /health says when it is "
          "loaded)", flush=True)
    return serve(lambda: _pipeline(args, source, steps), settings, args.host, args.port, args.log_level)


def cmd_triton_repo(args) -> int:
    from .triton import write_repository

    names = ("name", "backend", "precision", "steps", "max_batch", "max_images", "device", "gpus", "count", "threads",
             "ort_provider", "engine_dir", "cache_dir", "export_path", "model", "checkpoint", "vae", "force")
    out = write_repository(args.export_dir, args.out, **{k: getattr(args, k) for k in names})
    print(f"wrote Triton model repository {out} (model {args.name}); run it with "
          f"tritonserver --model-repository {out} (docs/triton.md)")
    return 0


def cmd_plan(args) -> int:
    from dataclasses import asdict

    from .plan import TARGETS, format_plan, plan
    from .t2i_config import T2I_PRESETS, t2i_preset

    size = {k: v for k, v in (("height", args.height), ("width", args.width), ("max_text_tokens",
                                                                              args.max_text_tokens)) if v is not None}
    if args.model in T2I_PRESETS:
        cfg = t2i_preset(args.model, **size)
    else:
        cfg = _model(args).config
    bad = [t for t in args.target or () if t not in TARGETS]
    if bad:
        raise BitDanceError(f"unknown target {bad[0]!r}: one of {', '.join(TARGETS)}")
    p = plan(cfg, args.precision, args.backend, args.batch_size, guided=not args.no_cfg,
             workspace_mb=args.workspace_mb)
    from .plan.machines import format_road, road_on

    r = road_on(cfg, args.precision, args.backend, args.batch_size, not args.no_cfg, args.workspace_mb,
                args.host_memory, args.gpu, args.target)  # each step of getting there, on the machines asked
    if args.json:
        targets = {t: dict(zip(("fits", "bytes_left"), p.fits(t))) for t in args.target or TARGETS}
        print(json.dumps({**asdict(p), "weight_bytes": p.weight_bytes, "total_bytes": p.total_bytes,
                          "total_if_once": p.total_if_once, "targets": targets, "road": r.to_json()}))
    else:
        print(format_plan(p, args.target))
        print(format_road(r))
    return 0


def cmd_convert(args) -> int:
    from .checkpoint import check_fit, file_sha256, fitting_presets, load_state_dict_file, save_safetensors
    from .config import load_config
    from .models import BitDance

    if args.checkpoint is None:
        raise BitDanceError("convert needs --checkpoint (the .pt file to convert)")
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise BitDanceError(f"--out {out}: the output must end in .safetensors")
    sd = load_state_dict_file(args.checkpoint, args.unsafe_allow_pickle)
    meta = {"source": Path(args.checkpoint).name, "source_sha256": file_sha256(args.checkpoint)}
    if args.model is not None:
        cfg = load_config(args.model)
        import torch

        with torch.device("meta"):
            check_fit(BitDance(cfg), sd, args.checkpoint, cfg.name)
        meta["config"] = json.dumps(cfg.to_json_dict())
    elif not any(k.startswith(("encoder.", "decoder.")) for k in sd):
        fits = fitting_presets({k: tuple(v.shape) for k, v in sd.items()})
        if fits:
            meta["preset"] = fits[0]
    save_safetensors(sd, out, meta)
    print(f"wrote {out} ({len(sd)} tensors" + (f", preset {meta['preset']}" if "preset" in meta else "") + ")")
    return 0


@contextlib.contextmanager
def _printed_logs():
    """While a command runs, what the library logs (logger `bitdance_rt`) is printed as bare lines, as
    the CLI prints its own: INFO (exports reused or made, variants, engines) to stdout, warnings and
    errors to stderr. Only this handler prints them (no propagation to the root logger, which a
    library such as ONNX Runtime's quantiser may have configured); put back as it was afterwards."""
    package = logging.getLogger("bitdance_rt")
    out, err = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err.setLevel(logging.WARNING)
    before = package.level, package.propagate
    for handler in (out, err):
        handler.setFormatter(logging.Formatter("%(message)s"))
        package.addHandler(handler)
    package.setLevel(logging.INFO)
    package.propagate = False
    try:
        yield
    finally:
        for handler in (out, err):
            package.removeHandler(handler)
        package.setLevel(before[0])
        package.propagate = before[1]


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # a usage error (one line, already printed) or --help / --version
        return exc.code if isinstance(exc.code, int) else 2
    try:
        with _printed_logs():
            return _run(args)
    except BitDanceError as exc:
        print(f"bitdance-rt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bitdance-rt: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # the file system said no (read-only, full, permission): one line, no traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"bitdance-rt: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    return {"generate": cmd_generate, "export": cmd_export, "eval": cmd_eval, "calibrate": cmd_calibrate,
            "convert": cmd_convert, "build": cmd_build, "check": cmd_check,
            "serve": cmd_serve, "triton-repo": cmd_triton_repo,
            "plan": cmd_plan}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

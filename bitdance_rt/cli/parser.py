"""The `bitdance-rt` command tree: every subcommand and its options, nothing run.
(Over 400 lines: it is one function, build_parser, that declares the whole command tree in one place.)

Usage errors are one line (status 2), the CLI's contract for every error. What a command does
is in its module (generate.py, export.py, calibrate.py, serve.py, diagnose.py); the option groups
several commands share are in arguments.py.
"""

from __future__ import annotations

import argparse

from .. import __version__
from ..config import EMBEDDED_MODEL, PRESETS
from ..export.manifest import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET
from ..precision.policy import CALIBRATION_METHODS, DEFAULT_PRECISION, PRECISIONS
from ..stages import DEFAULT_MAX_BATCH
from .arguments import (
    CFG,
    MEMORY_CHECK_HELP,
    SCHEDULE_HELP,
    STREAMING_HELP,
    SEED,
    STEPS,
    _add_accelerator_args,
    _add_backend_args,
    _add_model_args,
    _add_precision_args,
    _add_renamed,
    _add_run_args,
    _add_t2i_args,
    _cuda_index,
    _port,
)


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
    g.add_argument(
        "--labels",
        type=int,
        nargs="+",
        default=None,
        help="class labels, one image each (default: one per class for models of up to 16 classes, else 0..7)",
    )
    g.add_argument(
        "--prompt",
        nargs="+",
        default=None,
        help="text-to-image: prompt(s), one image each; --checkpoint is then the BitDance-14B directory",
    )
    _add_t2i_args(g)
    _add_run_args(g)
    g.add_argument("--out", default="out", help="output directory for PNGs (default: ./out)")
    g.add_argument(
        "--noise-from", default=None, help="replay recorded noise (noise_000, noise_001, ... in a .safetensors)"
    )
    g.add_argument("--save-tokens", default=None, help="write tokens, latent and image to this .safetensors")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--ignore-memory-check", action="store_true", help=MEMORY_CHECK_HELP)

    e = sub.add_parser("export", help="export every stage to ONNX (+ manifest); reused when up to date")
    _add_model_args(e)
    e.add_argument("--out", required=True, help="export directory")
    e.add_argument("--steps", type=STEPS, default=None, help="sampler steps S baked into the fused head samplers")
    e.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (TensorRT 10.3 parses <= 20; default {DEFAULT_OPSET})",
    )
    e.add_argument(
        "--max-batch",
        type=int,
        default=DEFAULT_MAX_BATCH,
        help=f"largest batch (images) the graphs accept (default {DEFAULT_MAX_BATCH})",
    )
    e.add_argument("--stages", nargs="+", default=None, help="stages to export (default: all)")
    e.add_argument("--force", action="store_true", help="re-export even if the directory is up to date")
    e.add_argument("--ignore-memory-check", action="store_true", help=MEMORY_CHECK_HELP)
    e.add_argument(
        "--backend",
        choices=("onnxruntime", "tensorrt"),
        default=None,
        help="the runtime the graphs are for: INT4 writes ONNX Runtime's MatMulNBits (default) or "
        "TensorRT's DequantizeLinear graphs",
    )
    _add_precision_args(e)
    _add_t2i_args(e)

    ev = sub.add_parser(
        "eval",
        help="score generated digits: classifier accuracy and Frechet distance "
        "(digits models such as the embedded default)",
    )
    _add_model_args(ev)
    ev.add_argument("--per-class", type=int, default=50, help="samples per class (default: 50)")
    _add_run_args(ev)

    cal = sub.add_parser(
        "calibrate", help="record the inputs every stage sees while generating (INT8/FP8 calibration data)"
    )
    _add_model_args(cal)
    cal.add_argument(
        "--out", required=True, help="calibration set directory (calibration.json + one .safetensors per stage)"
    )
    cal.add_argument("--labels", type=int, nargs="+", default=None, help="class labels (default: every class)")
    cal.add_argument(
        "--prompt",
        nargs="+",
        default=None,
        help="text-to-image (--checkpoint DIR): prompts to record (default: the built-in calibration "
        "prompts, shortened to fit --max-text-tokens)",
    )
    _add_t2i_args(cal)
    cal.add_argument(
        "--seeds", type=SEED, nargs="+", default=[0], help="noise seeds; every label is generated once per seed"
    )
    cal.add_argument(
        "--steps", type=STEPS, default=None, help="sampler steps S (match the export's S; default: the model's)"
    )
    cal.add_argument("--cfg", type=CFG, default=None, help="classifier-free guidance scale G (default: the model's)")
    cal.add_argument("--cfg-schedule", choices=("linear", "constant"), default=None, help=SCHEDULE_HELP)
    cal.add_argument(
        "--batch-size", type=int, default=4, help="images per recorded call (bounds a backbone sample's size)"
    )
    cal.add_argument("--backbone-every", type=int, default=1, help="keep backbone steps 1, 1+k, 1+2k, ... (default 1)")
    cal.add_argument(
        "--head-fraction", type=float, default=0.25, help="share of head-net evaluations kept (default 0.25)"
    )
    cal.add_argument("--max-samples", type=int, default=256, help="most samples per stage, a uniform reservoir sample")
    cal.add_argument("--sample-seed", type=int, default=0, help="seed of the subsampling choices (not of the noise)")
    cal.add_argument(
        "--capture-backend",
        choices=("torch", "onnxruntime"),
        default=None,
        help="backend the recorded generations run on: torch (the float32 reference; default for "
        "ImageNet models) or onnxruntime on the model's export (default for text-to-image "
        "models: no float32 torch model needed)",
    )
    cal.add_argument(
        "--capture-precision",
        choices=("fp32", "fp16"),
        default=None,
        help="graphs of an onnxruntime capture: fp32 or fp16 (derived and cached; default fp16 for "
        "text-to-image models, else fp32); torch is fp32",
    )
    cal.add_argument(
        "--capture-export",
        default=None,
        metavar="DIR",
        help="capture with onnxruntime on this export directory (of this model and weights, with "
        "head_step; its graphs' precision) instead of the automatic cached export",
    )
    cal.add_argument(
        "--device",
        default="cpu",
        help="device of the recording run: torch device, or cuda for ONNX Runtime's CUDA provider",
    )
    cal.add_argument("--force", action="store_true", help="replace an existing set in --out")
    cal.add_argument("--ignore-memory-check", action="store_true", help=MEMORY_CHECK_HELP)
    cal.add_argument(
        "--samples",
        type=int,
        default=None,
        help="images to record per seed, labels cycling over --labels (default: each label once)",
    )
    _add_renamed(
        cal,
        "--calib-method",
        "--method",
        dest="method",
        choices=CALIBRATION_METHODS,
        default=CALIBRATION_METHODS[0],
        help=f"INT8 activation range method of the --report's INT8 graphs (default {CALIBRATION_METHODS[0]})",
    )
    cal.add_argument(
        "--report",
        action="store_true",
        help="then derive FP16 and INT8 graphs and measure them against FP32 (teacher-forced bit "
        "agreement per stage, end to end, decoder PSNR): report.json + report.md in --out",
    )
    cal.add_argument("--report-images", type=int, default=10, help="images of the report (default 10)")
    cal.add_argument("--report-seed", type=SEED, default=1000, help="noise seed of the report (default 1000: held out)")
    cal.add_argument(
        "--sensitivity",
        action="store_true",
        help="with --report: per-layer INT8 sensitivity (one INT8 derivation per quantised layer: slow)",
    )
    cal.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of the ONNX Runtime runs (an onnxruntime capture, the report)",
    )

    b = sub.add_parser("build", help="build TensorRT engines of an export (one per stage, cached; needs a GPU)")
    _add_renamed(
        b,
        "--export-dir",
        "--export",
        dest="export",
        required=True,
        metavar="DIR",
        help="export directory (bitdance-rt export --out DIR)",
    )
    b.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="engine precision (default: the export's graph precision; fp16 from fp32 graphs uses the "
        "TensorRT 10.x FP16 flag)",
    )
    b.add_argument(
        "--workspace-mb", type=int, default=None, help="workspace memory-pool cap in MiB (Jetson: e.g. 1024)"
    )
    b.add_argument("--opt-level", type=int, default=3, help="builder optimisation level 0..5 (default 3)")
    b.add_argument(
        "--weight-streaming",
        action="store_true",
        help="build the backbone's engine streamable (run it with --weight-streaming-budget SIZE)",
    )
    b.add_argument("--stages", nargs="+", default=None, help="stages to build (default: every stage of the export)")
    b.add_argument("--engine-dir", default=None, help="engine cache (default: $BITDANCE_RT_CACHE/engines)")
    b.add_argument("--device", type=_cuda_index, default=0, help="CUDA device: cuda, cuda:N or N (default 0)")
    b.add_argument("--lock-timeout", type=float, default=None, help="give up waiting for another builder after S s")
    b.add_argument("--no-lint", action="store_true", help="skip the ONNX-TensorRT operator lint before building")

    ck = sub.add_parser(
        "check",
        help="compare an accelerated backend with the torch reference: every stage "
        "(Polygraphy comparator) and end-to-end tokens",
    )
    _add_model_args(ck)
    ck.add_argument("--backend", choices=("onnxruntime", "tensorrt"), default="onnxruntime")
    ck.add_argument("--export-dir", required=True, help="the ONNX export to check (exported from the same weights)")
    ck.add_argument("--stages", nargs="+", default=None, help="stages to compare (default: every stage of the export)")
    ck.add_argument("--batch", type=int, default=2, help="images per stage comparison (rows = 2 x batch)")
    ck.add_argument(
        "--noise-from",
        default=None,
        help="also generate end to end with this recorded noise and compare the tokens with torch",
    )
    ck.add_argument(
        "--labels",
        type=int,
        nargs="+",
        default=None,
        help="labels of the end-to-end run (default: the noise file's `labels`)",
    )
    ck.add_argument(
        "--steps", type=STEPS, default=None, help="sampler steps S of the end-to-end run (default: the export's)"
    )
    ck.add_argument("--cfg", type=CFG, default=None, help="guidance scale of the end-to-end run (default: the model's)")
    ck.add_argument("--cfg-schedule", choices=("linear", "constant"), default=None, help=SCHEDULE_HELP)
    ck.add_argument(
        "--min-agreement",
        type=float,
        default=None,
        help="token agreement needed to pass (default: 1.0 for fp32, 0.98 fp16, 0.95 bf16 and int8)",
    )
    ck.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="TensorRT engine precision (default: the export's graph precision)",
    )
    ck.add_argument("--device", default="cpu", help="device of the torch reference and ONNX Runtime (cpu or cuda)")
    ck.add_argument("--threads", type=int, default=None, help="CPU threads")
    _add_accelerator_args(ck)

    sv = sub.add_parser(
        "serve",
        help="serve OpenAI's Images API (POST /v1/images/generations), /health and "
        "/metrics over one warm model (needs the [serve] extra)",
    )
    _add_model_args(sv)
    _add_t2i_args(sv)
    _add_backend_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=_port, default=8000, help="port, 0..65535 (default 8000; 0: any free port)")
    sv.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but /health, /docs included (default: "
        "$BITDANCE_RT_API_KEY; no auth when unset; an empty key is an error, not 'no auth')",
    )
    sv.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="requests waiting for cache rows before new ones get 429 + Retry-After (default 64)",
    )
    sv.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds a request may take; then 504 and its rows are freed (default 600)",
    )
    sv.add_argument("--max-images", type=int, default=16, help="images per request, n x labels (default 16)")
    sv.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds SIGTERM waits for requests in flight before cancelling them (default 30)",
    )
    sv.add_argument(
        "--body-timeout",
        type=float,
        default=10.0,
        help="seconds a client may take to send a request's headers, and as long again for its body; "
        "then 408 and the connection is closed (default 10)",
    )
    sv.add_argument(
        "--max-body-bytes",
        type=int,
        default=1 << 20,
        help="largest request body; larger ones get 413 (default 1048576)",
    )
    sv.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="uvicorn's log level (default info)",
    )

    tr = sub.add_parser(
        "triton-repo",
        help="write a Triton Inference Server model repository: one decoupled "
        "Python-backend model running an export in-process (docs/triton.md)",
    )
    tr.add_argument("--export-dir", required=True, help="export directory to serve (bitdance-rt export --out DIR)")
    tr.add_argument("--out", required=True, help="model repository directory to write")
    tr.add_argument("--name", default="bitdance", help="Triton model name, its directory (default bitdance)")
    tr.add_argument(
        "--backend",
        choices=("onnxruntime", "tensorrt"),
        default="onnxruntime",
        help="the engine inside the model (default onnxruntime)",
    )
    tr.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="onnxruntime: must be the export's (default); tensorrt: the engine precision",
    )
    tr.add_argument(
        "--steps", type=STEPS, default=None, help="sampler steps S of the fused sampler (default: the export's)"
    )
    tr.add_argument(
        "--max-batch", type=int, default=None, help="images one scheduler batch holds (default and most: the export's)"
    )
    tr.add_argument(
        "--max-images", type=int, default=None, help="most images one request may ask for (default: max batch)"
    )
    tr.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="default: cuda with --gpus or --backend tensorrt, else cpu",
    )
    tr.add_argument("--gpus", type=int, nargs="+", default=None, help="GPU indices: one KIND_GPU instance group each")
    tr.add_argument(
        "--count",
        type=int,
        default=1,
        help="instances per group (each holds its own Pipeline; 1 per GPU is usual; default 1)",
    )
    tr.add_argument("--threads", type=int, default=None, help="CPU threads per instance")
    tr.add_argument("--ort-provider", choices=("cpu", "cuda", "tensorrt"), default=None, help="ONNX Runtime provider")
    tr.add_argument("--engine-dir", default=None, help="TensorRT engine cache of the model's process")
    tr.add_argument("--cache-dir", default=None, help="$BITDANCE_RT_CACHE of the model's process")
    tr.add_argument(
        "--export-path",
        default=None,
        help="the export's path as the server sees it (a container mount; default: --export-dir, absolute)",
    )
    tr.add_argument("--model", default=None, help="a preset or config .json (default: the export manifest's config)")
    tr.add_argument("--checkpoint", default=None, help="text-to-image: the checkpoint directory (its tokenizer)")
    tr.add_argument("--vae", default=None, help="autoencoder weights, with --model")
    tr.add_argument("--force", action="store_true", help="replace --out")

    pl = sub.add_parser(
        "plan",
        help="the memory a model needs (weights per stage, KV cache, activations, TensorRT "
        "workspace) at a precision, and which GPUs / Jetsons it fits; reads no weights",
    )
    pl.add_argument(
        "--model",
        default=None,
        help=f"{EMBEDDED_MODEL} (default), an ImageNet preset ({', '.join(PRESETS)}), a text-to-image "
        "model (BitDance-14B-16x, BitDance-14B-64x) or a config .json",
    )
    pl.add_argument("--checkpoint", default=None, help="a text-to-image checkpoint directory (its config files)")
    _add_t2i_args(pl)
    pl.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=DEFAULT_PRECISION,
        help=f"graph precision (default {DEFAULT_PRECISION})",
    )
    pl.add_argument(
        "--backend",
        choices=("onnxruntime", "tensorrt", "torch"),
        default="tensorrt",
        help="tensorrt (default) and onnxruntime hold each stage's weights; torch one model",
    )
    _add_renamed(
        pl,
        "--max-batch",
        "--batch-size",
        dest="batch_size",
        type=int,
        metavar="N",
        default=1,
        help="images the cache holds at once (the Pipeline's max batch; default 1)",
    )
    pl.add_argument("--no-cfg", action="store_true", help="unguided: one cache row per image instead of two")
    pl.add_argument("--workspace-mb", type=int, default=None, help="TensorRT workspace (default 1024 MiB)")
    pl.add_argument("--weight-streaming-budget", default=None, metavar="SIZE", help=STREAMING_HELP)
    pl.add_argument(
        "--target",
        nargs="+",
        default=None,
        metavar="T",
        help="targets to check (default all): gpu-16gb gpu-24gb gpu-40gb gpu-48gb gpu-80gb orin-nano-8gb "
        "orin-nx-16gb agx-orin-32gb agx-orin-64gb",
    )
    pl.add_argument(
        "--host-memory",
        default=None,
        metavar="SIZE",
        help="the road's machine: its host memory, e.g. 64GB (GB read as GiB; default: this machine's)",
    )
    pl.add_argument("--gpu", default=None, metavar="SIZE", help="the road's machine: its GPU's memory, e.g. 24GB")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON (with the road)")

    c = sub.add_parser("convert", help="convert a checkpoint to .safetensors (safe to load, fast to map)")
    _add_model_args(c)
    c.add_argument("--out", required=True, help="output .safetensors path")
    return parser

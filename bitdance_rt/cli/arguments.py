"""Argument types and the option groups several `bitdance-rt` commands share.

A value is checked where it is parsed (runtime/params.py's caps, ports, CUDA indices), so a bad
one is a usage error before any work starts. Only light modules are imported here: building the
parser, and so `--help`, must not import torch.
"""

from __future__ import annotations

import argparse

from ..backends import BACKENDS
from ..config import EMBEDDED_MODEL, PRESETS
from ..precision.policy import CALIBRATION_METHODS, DEFAULT_PRECISION, PRECISIONS
from ..stages import DEFAULT_MAX_BATCH


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help=f"{EMBEDDED_MODEL} (the embedded trained digits model), a preset ({', '.join(PRESETS)}) or "
        f"a config .json in the official constructor-argument form; default: {EMBEDDED_MODEL}",
    )
    p.add_argument(
        "--checkpoint", default=None, help="model weights: official .pt ({'ema'|'model': ...}) or .safetensors"
    )
    p.add_argument(
        "--vae", default=None, help="autoencoder weights (ae_d16c32.pt); overrides vae.* keys of the checkpoint"
    )
    p.add_argument(
        "--unsafe-allow-pickle",
        action="store_true",
        help="load .pt files with full unpickling (can execute code: only for files you trust)",
    )


def _add_renamed(p, name: str, old: str, *, dest: str, required: bool = False, **kwargs) -> None:
    """Option `name`, also read under its former spelling `old`: that still works (giving both is an
    error) but --help shows only `name`."""
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument(name, dest=dest, **kwargs)
    group.add_argument(
        old,
        dest=dest,
        type=kwargs.get("type"),
        choices=kwargs.get("choices"),
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
    )


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
        from ..runtime import params

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


MEMORY_CHECK_HELP = (
    "go on even if a step (loading the model, the export, a capture or an INT8 derivation) needs "
    "more host memory than this machine has available (bitdance-rt plan shows each step's)"
)
SCHEDULE_HELP = (
    "guidance over AR steps (default: the model's, as the official code: linear for ImageNet models, "
    "constant for text-to-image)"
)


def _add_t2i_args(p: argparse.ArgumentParser) -> None:
    """Text-to-image (--checkpoint DIR of BitDance-14B-16x/-64x): image size from the official list."""
    p.add_argument("--height", type=int, default=None, help="text-to-image: image height (default 1024)")
    p.add_argument("--width", type=int, default=None, help="text-to-image: image width (default 1024)")
    p.add_argument(
        "--max-text-tokens",
        type=int,
        default=None,
        help="text-to-image: longest chat prompt in tokens, the padded prompt length of the graphs (default 256)",
    )


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """Sampling and backend options shared by generate and eval."""
    p.add_argument("--cfg", type=CFG, default=None, help="classifier-free guidance scale G (default: the model's)")
    p.add_argument("--cfg-schedule", choices=("linear", "constant"), default=None, help=SCHEDULE_HELP)
    p.add_argument("--seed", type=SEED, default=0, help="seed of the one noise generator")
    _add_backend_args(p)


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    """How the model runs (generate, eval, serve): sampler steps, backend, precision, batch."""
    p.add_argument("--steps", type=STEPS, default=None, help="sampler steps S per AR step (default: the model's)")
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="onnxruntime (default when installed) or torch (the float32 reference)",
    )
    p.add_argument(
        "--export-dir",
        default=None,
        help="ONNX export to run with --backend onnxruntime (default: an automatic, cached export "
        "under $BITDANCE_RT_CACHE or ~/.cache/bitdance-rt)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (torch device / ONNX Runtime CUDA EP)")
    _add_renamed(
        p,
        "--max-batch",
        "--batch-size",
        dest="batch_size",
        type=int,
        metavar="N",
        default=DEFAULT_MAX_BATCH,
        help=f"most images per batch (default {DEFAULT_MAX_BATCH}: the graphs' and the scheduler's "
        "maximum); labels are generated in parts of this size, the same on every backend, so results "
        "agree",
    )
    _add_precision_args(p)
    _add_accelerator_args(p)


def _add_precision_args(p: argparse.ArgumentParser) -> None:
    """Graph precision and INT8 calibration (generate, eval, export)."""
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help=f"graph precision: {', '.join(PRECISIONS)} (default {DEFAULT_PRECISION}; int8: Q/DQ, "
        "calibrated); onnxruntime derives and caches the graphs; tensorrt: the engine precision "
        "(default: the export's)",
    )
    p.add_argument(
        "--calibration",
        default=None,
        help="INT8 calibration set (bitdance-rt calibrate --out DIR); default: a set captured once from "
        "the model and cached",
    )
    p.add_argument(
        "--calib-method",
        choices=CALIBRATION_METHODS,
        default=CALIBRATION_METHODS[0],
        help=f"INT8 activation range method (default {CALIBRATION_METHODS[0]})",
    )
    p.add_argument(
        "--keep-float",
        nargs="+",
        default=(),
        metavar="LAYER",
        help="INT8: also keep these layers float (names as `calibrate --report --sensitivity` ranks "
        "them, e.g. /layers.0/attention/wo/MatMul)",
    )


STREAMING_HELP = (
    "--backend tensorrt: keep this much of the backbone's weights on the GPU (e.g. 4GB) and stream the rest "
    "from host memory on each call (its engine is built streamable; `bitdance-rt plan` sizes it)"
)


def _add_accelerator_args(p: argparse.ArgumentParser) -> None:
    """ONNX Runtime execution provider and TensorRT engine options (generate, eval, check)."""
    p.add_argument(
        "--ort-provider",
        choices=("cpu", "cuda", "tensorrt"),
        default=None,
        help="ONNX Runtime execution provider for --backend onnxruntime (default: cuda with --device cuda, else cpu)",
    )
    p.add_argument(
        "--engine-dir",
        default=None,
        help="TensorRT engine cache (default: $BITDANCE_RT_CACHE/engines or ~/.cache/bitdance-rt/engines)",
    )
    p.add_argument("--workspace-mb", type=int, default=None, help="TensorRT builder workspace cap in MiB")
    p.add_argument("--weight-streaming-budget", default=None, metavar="SIZE", help=STREAMING_HELP)
    p.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="--backend tensorrt: run every call with execute_async_v3 (no CUDA graph replay)",
    )


def _port(text: str) -> int:
    """A TCP port for argparse (-1 or 70000 would fail deep inside the server, after the model started loading)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer 0..65535, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535, got {port}")
    return port

"""Where every automatic artifact of bitdance-rt lives: the one module that computes cache paths.

Torch-free and stdlib-only (the TensorRT build path on Jetson imports it; bitdance_rt.fileio may too).
Layout under the cache root ($BITDANCE_RT_CACHE, else ~/.cache/bitdance-rt):

    exports/<model>-<12 hex>-s<S>[-b<B>]        FP32 ONNX exports, one per (model, weights, S, max batch)
    exports/<fp32 export>-fp16                  precision variants: siblings of their FP32 export
    exports/<fp32 export>-int8-<method>-<8 hex> (one per calibration set, method and kept-float layers)
    calibration/<model>-<12 hex>-s<S>           the default INT8 calibration set of that model
    ranges/<fp16 export>-<method>-<8 hex>       activation ranges measured on streamed FP16 graphs
    engines/<stage>-<precision>-<16 hex>.engine TensorRT engines (+ .json sidecars, timing caches)
    ort-optimized/                              ONNX Runtime optimised graphs (runtime/ort_session.py)
    file-hashes.json                            the persistent sha256 cache

<model>-<12 hex>: `model_dir_name`. Directories a user names (--export-dir, --engine-dir, ...) bypass it.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
from pathlib import Path

CACHE_ENV = "BITDANCE_RT_CACHE"
# a cache root given in code (Pipeline.from_pretrained(cache_dir=...)), for the calls inside `using_cache_root`
_GIVEN_ROOT: contextvars.ContextVar[Path | None] = contextvars.ContextVar("bitdance_rt_cache_root", default=None)

EXPORTS = "exports"
CALIBRATION = "calibration"
RANGES = "ranges"
ENGINES = "engines"
ORT_OPTIMIZED = "ort-optimized"
HASH_CACHE_FILE = "file-hashes.json"


def cache_root() -> Path:
    """The root of every bitdance-rt cache: the one given to `using_cache_root` around this call,
    else $BITDANCE_RT_CACHE, else ~/.cache/bitdance-rt."""
    given = _GIVEN_ROOT.get()
    if given is not None:
        return given
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "bitdance-rt"


@contextlib.contextmanager
def using_cache_root(root):
    """Within the block (this thread's calls; a context variable, so the environment and other
    threads are left alone), the cache root is `root`; None: unchanged."""
    if root is None:
        yield
        return
    token = _GIVEN_ROOT.set(Path(root))
    try:
        yield
    finally:
        _GIVEN_ROOT.reset(token)


# ---- roots of each artifact kind -------------------------------------------------------------
def exports_root() -> Path:
    return cache_root() / EXPORTS


def calibration_root() -> Path:
    return cache_root() / CALIBRATION


def engines_root() -> Path:
    return cache_root() / ENGINES


def ort_optimized_root() -> Path:
    return cache_root() / ORT_OPTIMIZED


def hash_cache_file() -> Path:
    return cache_root() / HASH_CACHE_FILE


def variants_root(fp32_dir: str | Path) -> Path:
    """Precision variants sit beside their FP32 export (an automatic one, or one given by the user)."""
    return Path(fp32_dir).parent


# ---- per-model directories -------------------------------------------------------------------
def model_dir_name(cfg, source: str, steps: int) -> str:
    """<model>-<digest of architecture + weights>-s<S>; `cfg`: a ModelConfig or T2IConfig. The 12 hex
    digits name a (model architecture, weights) pair: the digest of the config's constructor
    arguments and the weights' source string."""
    ident = json.dumps([cfg.to_json_dict()["constructor_args"], source], sort_keys=True)
    digest = hashlib.sha256(ident.encode()).hexdigest()[:12]
    return f"{cfg.name}-{digest}-s{steps}"


def cache_dir_for(kind: str, cfg, source: str, steps: int) -> Path:
    """<cache root>/<kind>/<model>-<digest>-s<S>: one per (model, weights, S)."""
    return cache_root() / kind / model_dir_name(cfg, source, steps)


DEFAULT_MAX_BATCH = 16


def export_dir(cfg, source: str, steps: int, max_batch: int = DEFAULT_MAX_BATCH) -> Path:
    """The automatic FP32 export of (model, weights, S); another max batch (the graphs' row range)
    gets its own directory (suffix -b<max batch>) instead of rewriting the default one in use."""
    name = model_dir_name(cfg, source, steps)
    return exports_root() / (name if max_batch == DEFAULT_MAX_BATCH else f"{name}-b{max_batch}")


def calibration_dir(cfg, source: str, steps: int) -> Path:
    """The default INT8 calibration set of (model, weights, S)."""
    return calibration_root() / model_dir_name(cfg, source, steps)


def ranges_dir(fp16_dir: str | Path, method: str, identity) -> Path:
    """The activation ranges (precision/fp16_ranges.py) measured on FP16 export `fp16_dir` with `method`;
    the digest covers `identity` (JSON: what the ranges depend on, the graphs' and the data's keys)."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    return cache_root() / RANGES / f"{Path(fp16_dir).name}-{method}-{digest}"


def variant_dir(
    fp32_dir: str | Path, precision: str, calibration_key=None, method: str = "max", keep_float=(), int4_format=None
) -> Path:
    """The `precision` variant of an FP32 export: <fp32>-fp16, <fp32>-bf16, <fp32>-int4-<8 hex> (the
    layers kept in float; TensorRT's INT4 graphs: <fp32>-int4-trt-<8 hex>), or <fp32>-int8-<method>-<8 hex>
    where the digest covers the calibration set's key and the layers kept in float."""
    fp32_dir = Path(fp32_dir)
    root = variants_root(fp32_dir)
    if precision in ("fp16", "bf16"):
        return root / f"{fp32_dir.name}-{precision}"
    if precision == "int4":  # (weight-only: no calibration)
        digest = hashlib.sha256(json.dumps(sorted(keep_float)).encode()).hexdigest()[:8]
        return root / f"{fp32_dir.name}-int4-{'trt-' if int4_format == 'qdq' else ''}{digest}"
    what = [calibration_key] + ([sorted(keep_float)] if keep_float else [])
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:8]
    return root / f"{fp32_dir.name}-int8-{method}-{digest}"

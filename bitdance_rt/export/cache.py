"""Where `bitdance-rt generate --backend onnxruntime` keeps its automatic exports.

Paths come from bitdance_rt.paths (the one home of cache paths): root $BITDANCE_RT_CACHE, else
~/.cache/bitdance-rt. One directory per (model, weights, S): the fused head samplers bake in S, so
another step count gets its own export rather than overwriting one in use. Reuse and re-export
are decided by the manifest key (export_stages).
"""

from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig
from ..paths import cache_dir_for, cache_root, export_dir  # noqa: F401  (re-exported: paths is their home)
from ..stages import GENERATION_STAGES  # noqa: F401  (re-exported: what the cached exports hold)


def export_dir_for(cfg: ModelConfig, source: str, steps: int) -> Path:
    return export_dir(cfg, source, steps)

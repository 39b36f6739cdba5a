"""Where `bitdance-rt generate --backend onnxruntime` keeps its automatic exports.

Root: $BITDANCE_RT_CACHE, else ~/.cache/bitdance-rt. One directory per (model, weights, S): the
fused head samplers bake in S, so another step count gets its own export rather than
overwriting one in use. Reuse and re-export are decided by the manifest key (export_stages).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..config import ModelConfig
from ..stages import BACKBONE_STEP, DECODER, HEAD_SAMPLER_GUIDED, HEAD_SAMPLER_UNGUIDED, HEAD_STEP, PREFILL

# What generation needs (no encoder); head_step serves step counts other than the exported S.
GENERATION_STAGES = (PREFILL, BACKBONE_STEP, HEAD_STEP, HEAD_SAMPLER_UNGUIDED, HEAD_SAMPLER_GUIDED, DECODER)


def cache_root() -> Path:
    env = os.environ.get("BITDANCE_RT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "bitdance-rt"


def cache_dir_for(kind: str, cfg: ModelConfig, source: str, steps: int) -> Path:
    """<cache root>/<kind>/<model>-<digest of architecture + weights>-s<S>: one per (model, weights, S)."""
    ident = json.dumps([cfg.to_json_dict()["constructor_args"], source], sort_keys=True)
    digest = hashlib.sha256(ident.encode()).hexdigest()[:12]
    return cache_root() / kind / f"{cfg.name}-{digest}-s{steps}"


def export_dir_for(cfg: ModelConfig, source: str, steps: int) -> Path:
    return cache_dir_for("exports", cfg, source, steps)

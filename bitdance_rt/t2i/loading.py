"""Load a text-to-image checkpoint into a BitDanceT2I model + prompt encoder, whatever its layout.

The layout (official directory, diffusers conversion, ComfyUI FP8 files: t2i/layouts.py) is
detected from the path and gives the config, the tokenizer and, per weights file, which tensor
goes where. Everything is checked before any weight is read: a missing file or shard, a key set or
shape that does not fit the configs, each is one error naming the file and key. The LM head
(`lm_head.weight`) is not needed for images and is skipped. Weights are read with safetensors (no
pickle), FP8 ones dequantised with their scales, and converted to `dtype` (float32: the reference
precision).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import check_fit
from ..errors import CheckpointError
from ..models.t2i import BitDanceT2I
from ..t2i_config import T2IConfig
from .config import read_checkpoint_config
from .layouts import (
    LLM_INDEX,
    LLM_SINGLE,
    PART_FILES,
    PARTS,
    SKIPPED_PREFIXES,
    WeightFile,
    detect_layout,
    warn_unscaled,
)
from .prompt import PromptEncoder

__all__ = [
    "LLM_INDEX",
    "LLM_SINGLE",
    "PART_FILES",
    "SKIPPED_PREFIXES",
    "LoadedT2I",
    "checkpoint_dir_source",
    "load_t2i",
    "read_weights",
    "weightless_t2i",
]


@dataclass
class LoadedT2I:
    model: BitDanceT2I
    prompts: PromptEncoder
    source: str


def _open(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable .safetensors file ({exc})") from None


def checkpoint_dir_source(path: str | Path) -> str:
    """Identity of the weights for export manifests: sha256 over every file the model reads, in the
    layout the path has (each file's digest memoised by (path, size, mtime), fileio.cached_sha256)."""
    return detect_layout(path).identity()


def _dequantised(q: torch.Tensor, scale: torch.Tensor, key: str, wf: WeightFile) -> torch.Tensor:
    """q * scale in float32: one scale per tensor or per output channel (the ComfyUI node's rule)."""
    if scale.numel() == 1:
        s = scale.float().reshape(())
    elif q.dim() >= 1 and scale.numel() == q.shape[0]:
        s = scale.float().reshape(q.shape[0], *([1] * (q.dim() - 1)))
    else:
        raise CheckpointError(
            f"{wf.path}: scale {wf.scales[key]} {list(scale.shape)} fits neither the whole tensor "
            f"nor the output channels of {key} {list(q.shape)}"
        )
    return q.float() * s


def read_weights(files: list[WeightFile], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """BitDanceT2I's state dict from planned weight files (FP8 tensors dequantised), in `dtype`."""
    state = {}
    for wf in files:
        with _open(wf.path) as f:
            for dst, key in wf.keys.items():
                t = f.get_tensor(key)
                if key in wf.scales:
                    t = _dequantised(t, f.get_tensor(wf.scales[key]), key, wf)
                elif key in wf.unscaled:
                    t = t.float()
                state[wf.part + dst] = t.to(dtype)
    warn_unscaled(files)
    return state


def _checked_plan(layout, cfg: T2IConfig):
    """The weight files of `layout`, checked against the model `cfg` describes (built on meta)."""
    plan = layout.weight_files()
    with torch.device("meta"):
        model = BitDanceT2I(cfg)
    for prefix, what in PARTS.items():
        shapes = {k: torch.empty(s, device="meta") for wf in plan if wf.part == prefix for k, s in wf.shapes.items()}
        source = ", ".join(sorted({wf.name for wf in plan if wf.part == prefix}))
        check_fit(getattr(model, prefix[:-1]), shapes, source, f"{cfg.name} {what}", suggest_preset=False)
    return plan, model


_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class _Reader:
    """Tensors of the planned files by model key, read on demand with plain reads at the offsets of the
    safetensors header (rows as a byte range): no memory map, so what a streamed export has read does
    not stay in its resident memory (a mapped 28 GB checkpoint would count in full)."""

    def __init__(self, plan: list[WeightFile]):
        self.where = {wf.part + dst: (wf, key) for wf in plan for dst, key in wf.keys.items()}
        self._headers: dict = {}

    def _entry(self, wf: WeightFile, key: str) -> tuple[torch.dtype, tuple[int, ...], int]:
        """(dtype, shape, absolute offset) of `key` in wf's file."""
        import json
        import struct

        if wf.path not in self._headers:
            with open(wf.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                self._headers[wf.path] = (8 + n, json.loads(f.read(n)))
        base, header = self._headers[wf.path]
        entry = header[key]
        if entry["dtype"] not in _DTYPES:
            raise CheckpointError(f"{wf.path}: {key} is stored as {entry['dtype']}, which no BitDance weight is")
        return _DTYPES[entry["dtype"]], tuple(entry["shape"]), base + entry["data_offsets"][0]

    def _read(self, wf: WeightFile, key: str, rows=None) -> torch.Tensor:
        dtype, shape, offset = self._entry(wf, key)
        row = dtype.itemsize
        for d in shape[1:]:
            row *= d
        start, stop = (0, shape[0] if shape else 1) if rows is None else rows
        data = bytearray((stop - start) * row)
        with open(wf.path, "rb") as f:
            f.seek(offset + start * row)
            got = f.readinto(memoryview(data))
        if got != len(data):
            raise CheckpointError(f"{wf.path}: ends inside {key} (a truncated download?)")
        t = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        return t.reshape(shape if rows is None else (stop - start, *shape[1:]))

    def __call__(self, name: str, rows=None) -> torch.Tensor:
        wf, key = self.where[name]
        t = self._read(wf, key, rows)
        if key in wf.scales:
            scale = self._read(wf, wf.scales[key])
            if rows is not None and scale.numel() > 1:
                scale = scale.reshape(-1)[rows[0] : rows[1]]
                return t.float() * scale.float().reshape(-1, *([1] * (t.dim() - 1)))
            return _dequantised(t, scale, key, wf)
        return t.float()


def weightless_t2i(directory: str | Path, config: T2IConfig):
    """(weightless BitDanceT2I, WeightSource of its checkpoint) for a streamed export: the module's
    parameters take no memory, its buffers are computed, and each weight is read when written."""
    from ..export.weightless import WeightSource, weightless

    layout = detect_layout(directory)
    plan, model = _checked_plan(layout, config)
    weightless(model)
    model.reset_buffers()
    warn_unscaled(plan)
    reader = _Reader(plan)
    shapes = {name: tuple(wf.shapes[dst]) for wf in plan for dst in wf.keys for name in [wf.part + dst]}
    return model.eval(), WeightSource(shapes, reader, f"checkpoint {directory}", dict(model.named_buffers()))


def load_t2i(
    directory: str | Path,
    height: int,
    width: int,
    max_text_tokens: int | None = None,
    dtype: torch.dtype = torch.float32,
    config: T2IConfig | None = None,
) -> LoadedT2I:
    """The model and prompt encoder of a checkpoint path (any layout t2i/layouts.py detects)."""
    layout = detect_layout(directory)
    cfg = config or read_checkpoint_config(
        directory, height, width, **({} if max_text_tokens is None else {"max_text_tokens": max_text_tokens})
    )
    prompts = PromptEncoder(layout.tokenizer, cfg)
    prompts.image_tokens()  # a tokenizer without the BitDance tokens fails here, before the weights
    plan, model = _checked_plan(layout, cfg)
    model.load_state_dict(read_weights(plan, dtype), strict=True, assign=True)
    model.reset_buffers()
    return LoadedT2I(model.eval(), prompts, f"{cfg.name} ({cfg.height}x{cfg.width}) from {directory}")

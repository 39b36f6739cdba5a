"""Safetensors files read by their JSON header alone (no tensor read), and the WeightFile: one file's
tensors mapped onto a part of BitDanceT2I, with the FP8 scales the ComfyUI files carry.

Every layout lists its weights as WeightFiles; t2i/loading.py then reads them tensor by tensor.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError

FP8_DTYPES = ("F8_E4M3", "F8_E5M2")  # safetensors header names of float8_e4m3fn / float8_e5m2


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{key: (dtype, shape)} of a .safetensors file, from its JSON header alone (no tensor read)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) != 8:
                raise ValueError("shorter than a header")
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000 or n > path.stat().st_size - 8:
                raise ValueError(f"header length {n} does not fit the file")
            meta = json.loads(fh.read(n))
        if not isinstance(meta, dict):
            raise ValueError("header is not a JSON object")
        return {k: (str(v["dtype"]), tuple(int(s) for s in v["shape"])) for k, v in meta.items() if k != "__metadata__"}
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read it ({exc.strerror or exc})") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable .safetensors file ({exc})") from None


def scale_candidates(key: str) -> tuple[str, ...]:
    """Where the ComfyUI node looks for the dequantisation scale of FP8 tensor `key` (q * scale)."""
    base = key[: -len(".weight")] if key.endswith(".weight") else key
    return (f"{key}.scale", f"{base}.weight_scale", f"{base}.scale_weight", f"{base}.weight_scales", f"{key}_scale")


@dataclass
class WeightFile:
    """One weights file and the tensors it gives one part of BitDanceT2I."""

    path: Path
    name: str  # as messages and the weight identity name it
    part: str  # a PARTS key
    keys: dict[str, str] = field(default_factory=dict)  # key in the part's module -> key in the file
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # key in the part's module -> shape
    scales: dict[str, str] = field(default_factory=dict)  # FP8 key in the file -> its scale's key
    unscaled: list[str] = field(default_factory=list)  # FP8 keys in the file without a scale

    @classmethod
    def mapped(cls, path: Path, name: str, part: str, header: dict, rename, fp8: bool = False) -> "WeightFile":
        """`rename(key)` gives the key in the part's module, or None to skip the tensor."""
        wf = cls(path, name, part)
        for key, (dtype, shape) in header.items():
            dst = rename(key)
            if dst is None:
                continue
            wf.keys[dst], wf.shapes[dst] = key, shape
            if fp8 and dtype in FP8_DTYPES:
                scale = next((c for c in scale_candidates(key) if c in header), None)
                if scale is None:
                    wf.unscaled.append(key)
                else:
                    wf.scales[key] = scale
        return wf

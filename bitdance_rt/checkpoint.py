"""Safe, strict checkpoint loading, and conversion to .safetensors.

Reads the official files unchanged: `BitDance_*.pt` (`{"ema": ...}` or `{"model": ...}`, vae.*
keys included), `ae_d16c32.pt` (`{"state_dict": ...}`) and .safetensors. `.pt` files are opened
with `torch.load(weights_only=True)`, which cannot execute code; `allow_pickle=True` (the CLI's
`--unsafe-allow-pickle`) is the explicit opt-in for files that need full unpickling.
A state dict that does not fit the model is refused with the missing / unexpected keys, the
shape differences, and the preset that fits when one does.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Mapping

import torch

from .config import PRESETS, ModelConfig
from .errors import CheckpointError
from .fileio import atomic_write, file_sha256  # noqa: F401  (re-exported)

WRAPPER_KEYS = ("ema", "model", "state_dict")


PICKLE_PROTOCOLS = range(2, 6)  # torch.save's legacy format: pickles of protocol 2 and up (b"\x80" + version)


def require_file(path: str | Path, what: str = "checkpoint") -> Path:
    """`path` as a Path if it is an existing, readable file, else a CheckpointError saying which
    (an unreadable file would otherwise surface as a traceback from the hashing or loading code)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is not a file")
    try:
        open(path, "rb").close()
    except OSError as exc:
        raise CheckpointError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None
    return path


def _container(path: Path) -> str | None:
    """'zip' (torch.save's format: PK\x03\x04, or PK\x05\x06 when empty) or 'pickle' (its legacy
    format) by the file's first bytes, else None: such a file is no checkpoint, whatever the flags."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head[:2] == b"PK" and head[2:4] in (b"\x03\x04", b"\x05\x06"):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and head[1] in PICKLE_PROTOCOLS:
        return "pickle"
    return None


def read_tensor_file(path: str | Path, allow_pickle: bool = False) -> Mapping:
    """The raw object stored in a .pt/.pth/.safetensors file (a dict for every supported file)."""
    path = require_file(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path}: unreadable .safetensors file ({exc})") from None
    try:
        kind = _container(path)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read it ({exc.strerror or exc})") from None
    if kind is None:  # random bytes, a text file, a truncated header: no unpickling would help
        raise CheckpointError(
            f"checkpoint {path} is not a readable checkpoint: not a PyTorch file (neither a zip "
            "archive nor a pickle) nor .safetensors; check it or download it again"
        )
    try:
        return torch.load(str(path), map_location="cpu", weights_only=not allow_pickle)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read it ({exc.strerror or exc})") from None
    except pickle.UnpicklingError as exc:
        # only a well-formed pickle that names classes/functions (GLOBAL) needs full unpickling;
        # corrupt data fails the safe loader too ("Unsupported operand"), and unpickling would not help
        if not allow_pickle and ("GLOBAL" in str(exc) or "Unsupported class" in str(exc)):
            raise CheckpointError(
                f"checkpoint {path} holds objects other than tensors and refuses safe loading; "
                "if you trust its source, pass --unsafe-allow-pickle (or convert it once with "
                "`bitdance-rt convert --unsafe-allow-pickle`)"
            ) from None
        raise CheckpointError(
            f"checkpoint {path}: not a readable checkpoint (corrupt {kind}: {_unpickling_reason(exc)})"
        ) from None
    except Exception as exc:  # torch.load raises many types on foreign or truncated files
        raise CheckpointError(
            f"checkpoint {path}: unreadable (truncated or not a .pt/.safetensors file: {_first_line(exc)})"
        ) from None


def _unpickling_reason(exc: BaseException) -> str:
    """The line of torch's long weights_only message that says what failed (e.g. 'Unsupported operand 123')."""
    for line in str(exc).splitlines():
        if "Unsupported" in line:
            return line.split("error:")[-1].strip()
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def extract_state_dict(obj, path: str | Path = "<checkpoint>") -> dict[str, torch.Tensor]:
    """Unwrap `{"ema"|"model"|"state_dict": sd}` (official files) or take a flat tensor dict."""
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj)
    raise CheckpointError(
        f"checkpoint {path}: expected a state dict of tensors, or a dict with one of "
        f"{', '.join(repr(k) for k in WRAPPER_KEYS)} holding one"
    )


def load_state_dict_file(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    return extract_state_dict(read_tensor_file(path, allow_pickle), path)


def _shapes(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _preset_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    from .models import BitDance

    with torch.device("meta"):
        return _shapes(BitDance(cfg).state_dict())


def fitting_presets(sd_shapes: Mapping[str, tuple[int, ...]], ignore_prefix: str = "vae.") -> list[str]:
    """Presets whose non-VAE keys and shapes equal those of a checkpoint."""
    theirs = {k: s for k, s in sd_shapes.items() if not k.startswith(ignore_prefix)}
    fits = []
    for name, cfg in PRESETS.items():
        ours = {k: s for k, s in _preset_shapes(cfg).items() if not k.startswith(ignore_prefix)}
        if ours == theirs:
            fits.append(name)
    return fits


def _describe(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def check_fit(
    model: torch.nn.Module,
    sd: Mapping[str, torch.Tensor],
    source: str,
    model_name: str,
    optional_prefix: str | None = None,
    suggest_preset: bool = True,
) -> None:
    """Raise a CheckpointError naming keys and shapes unless `sd` fits `model` exactly.

    Keys under `optional_prefix` may be absent (e.g. `vae.` when a separate --vae file is given).
    """
    ours = _shapes(model.state_dict())
    theirs = _shapes(sd)
    missing = [k for k in ours if k not in theirs and not (optional_prefix and k.startswith(optional_prefix))]
    unexpected = [k for k in theirs if k not in ours]
    wrong = [f"{k} {list(theirs[k])} vs {list(ours[k])}" for k in ours if k in theirs and theirs[k] != ours[k]]
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_describe(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_describe(unexpected)}")
    if wrong:
        parts.append(f"{len(wrong)} shape mismatch(es) (checkpoint vs model): {_describe(wrong)}")
    hint = ""
    if suggest_preset:
        fits = fitting_presets(theirs)
        hint = (
            f"; it fits preset {' / '.join(fits)}: use --model {fits[0]}"
            if fits
            else ("; no built-in preset fits it: pass --model CONFIG.json with its constructor arguments")
        )
    raise CheckpointError(f"checkpoint {source} does not fit model {model_name}: " + "; ".join(parts) + hint)


# file_sha256 and atomic_write live in the torch-free fileio module (the TensorRT build path uses them).


def save_safetensors(sd: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata or {}))

"""The digits data the embedded tiny model was trained on, as images the model and classifier see.

The source is scikit-learn's copy of the UCI "Optical Recognition of Handwritten Digits" set
(1797 8x8 images, grey levels 0..16). `digits_to_images` turns them into RGB images in [-1, 1]
at the model resolution (bilinear upscaling, grey replicated to three channels). The held-out
split used for the quality metric ships as `assets/digits_heldout.safetensors` (uint8 8x8
images + labels), so scoring needs neither scikit-learn nor a download.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ASSETS_DIR as ASSETS

HELDOUT_FILE = ASSETS / "digits_heldout.safetensors"
MAX_LEVEL = 16.0


def digits_to_images(digits: torch.Tensor, resolution: int = 32) -> torch.Tensor:
    """8x8 grey levels [B, 8, 8] (0..16, any dtype) -> RGB images [B, 3, res, res] in [-1, 1]."""
    x = digits.float().reshape(-1, 1, 8, 8) / MAX_LEVEL
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return (x * 2.0 - 1.0).clamp(-1.0, 1.0).expand(-1, 3, -1, -1).contiguous()


def load_heldout(path: str | Path = HELDOUT_FILE) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out split: (digits [N, 8, 8] uint8 0..16, labels [N] int64)."""
    from safetensors.torch import load_file

    t = load_file(str(path))
    return t["digits"], t["labels"].long()


def split_digits(seed: int = 0, heldout_fraction: float = 0.2):
    """scikit-learn digits split per class into (train, held-out): ((x, y), (x, y)), x uint8 [N, 8, 8].

    Needs scikit-learn (training only); the split is the one stored in the held-out asset.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.as_tensor(data.images, dtype=torch.float32).round().to(torch.uint8)
    y = torch.as_tensor(data.target, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    train_idx, held_idx = [], []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_held = int(round(len(idx) * heldout_fraction))
        held_idx.append(idx[:n_held])
        train_idx.append(idx[n_held:])
    tr, he = torch.cat(train_idx).sort().values, torch.cat(held_idx).sort().values
    return (x[tr], y[tr]), (x[he], y[he])

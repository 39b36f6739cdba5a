"""Writing generated images: one PNG per image and a grid, each written atomically."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_write


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8, the official conversion (127.5 x + 128, clamp)."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()


CAPTION = 12  # pixels of caption strip under each tile


def make_grid(pixels: np.ndarray, labels=None, columns: int = 8, pad: int = 2) -> np.ndarray:
    """Tiles [B, H, W, 3] in rows of `columns`; with `labels`, each tile gets its class as a caption."""
    from PIL import Image, ImageDraw

    b, h, w, c = pixels.shape
    cols = min(columns, b)
    rows = math.ceil(b / cols)
    cap = CAPTION if labels is not None else 0
    grid = np.full((rows * (h + cap + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(b):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + cap + pad), pad + q * (w + pad)
        grid[y : y + h, x : x + w] = pixels[i]
    if labels is None:
        return grid
    image = Image.fromarray(grid)
    draw = ImageDraw.Draw(image)
    for i, label in enumerate(labels):
        r, q = divmod(i, cols)
        draw.text((pad + q * (w + pad) + 1, pad + r * (h + cap + pad) + h), str(int(label)), fill=(0, 0, 0))
    return np.asarray(image)


def save_png(array: np.ndarray, path: Path) -> Path:
    from PIL import Image

    return atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def save_images(images: torch.Tensor, labels, out_dir: str | Path) -> list[Path]:
    """Writes out_dir/NNN_classL.png per image and out_dir/grid.png; returns the paths."""
    out = Path(out_dir)
    pixels = to_uint8(images)
    paths = [save_png(px, out / f"{i:03d}_class{int(label)}.png") for i, (px, label) in enumerate(zip(pixels, labels))]
    paths.append(save_png(make_grid(pixels, labels), out / "grid.png"))
    return paths

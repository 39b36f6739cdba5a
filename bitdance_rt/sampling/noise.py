"""Where sampler noise comes from: one seeded generator, or a recorded file replayed.

Draw order (the official sampler's, see fixtures/official/README.md): for each AR step, first the
initial x [rows, P, C], then one tensor of the same shape per Euler-Maruyama step; `rows` is the
number of guided rows (B when the step is guided, all 2B CFG rows when it is not).

`SeededNoise(seed)` draws with a CPU `torch.Generator` seeded once, so a run with seed N draws
exactly what the official code draws after `torch.manual_seed(N)` on CPU, and every backend and
device sees the same numbers. `ReplayNoise` reads `noise_000, noise_001, ...` from a
.safetensors file (the format of the fixtures' sample.safetensors) and checks each shape.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import BitDanceError


class NoiseSource:
    """Hands out noise tensors in draw order."""

    def draw(self, shape: tuple[int, ...]) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def finish(self) -> None:
        """Called after a generation; replay sources check that every recorded draw was used."""


class SeededNoise(NoiseSource):
    def __init__(self, seed: int):
        self.seed = int(seed)
        self.generator = torch.Generator(device="cpu").manual_seed(self.seed)

    def draw(self, shape):
        return torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32)


class ReplayNoise(NoiseSource):
    def __init__(self, path: str | Path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        self.path = Path(path)
        if not self.path.is_file():
            raise BitDanceError(f"noise file not found: {self.path}")
        try:
            tensors = load_file(str(self.path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise BitDanceError(f"noise file {self.path}: not a readable .safetensors file ({exc})") from None
        names = sorted(k for k in tensors if k.startswith("noise_"))
        if not names:
            raise BitDanceError(f"noise file {self.path}: holds no tensors named noise_000, noise_001, ...")
        expected = [f"noise_{i:03d}" for i in range(len(names))]
        if names != expected:
            raise BitDanceError(f"noise file {self.path}: noise tensors must be numbered from noise_000 without gaps")
        self.tensors = [tensors[n].float() for n in names]
        self.index = 0

    def draw(self, shape):
        shape = tuple(shape)
        if self.index >= len(self.tensors):
            raise BitDanceError(
                f"noise file {self.path}: holds {len(self.tensors)} draws but generation needs more; "
                "record it with the same labels, steps, cfg and schedule"
            )
        t = self.tensors[self.index]
        # The official 1x sampler draws [rows, C]; we work with [rows, 1, C]: same numbers.
        if t.numel() != math.prod(shape) or [d for d in t.shape if d != 1] != [d for d in shape if d != 1]:
            raise BitDanceError(
                f"noise file {self.path}: noise_{self.index:03d} has shape {list(t.shape)}, "
                f"generation expects {list(shape)}; record it with the same labels, steps, cfg and schedule"
            )
        self.index += 1
        return t.reshape(shape)

    def finish(self):
        if self.index != len(self.tensors):
            raise BitDanceError(
                f"noise file {self.path}: generation used {self.index} of its {len(self.tensors)} draws; "
                "record it with the same labels, steps, cfg and schedule"
            )

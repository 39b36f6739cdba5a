"""Which stage calls a capture keeps: bounded, seeded, uniform over the whole run.

A full trajectory is far too large to keep (BitDance-B-4x at S=100: 64 backbone steps and 6,464
head evaluations per image, each backbone input holding the whole KV cache), so a capture keeps:

1. candidates: every backbone prefill, sampler and decoder call; the AR steps i with
   (i-1) % backbone_every == 0 (step 1 always; their token_embed and backbone calls); each head-net
   evaluation with probability `head_fraction` (the first always);
2. at most `max_samples` candidates per stage and phase (the backbone's prefill and steps apart),
   chosen by reservoir sampling, so the kept set is a uniform sample over all images, AR steps and
   sampler times, not the first calls of the run.

All choices come from one `random.Random(seed)`, never from torch's generators, so recording
cannot change the noise a generation draws.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from ..errors import BitDanceError


@dataclass(frozen=True)
class CapturePolicy:
    backbone_every: int = 1
    head_fraction: float = 0.25
    max_samples: int = 256
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.backbone_every, int) and self.backbone_every >= 1):
            raise BitDanceError(f"backbone_every must be a positive integer, got {self.backbone_every!r}")
        if not 0.0 < float(self.head_fraction) <= 1.0:
            raise BitDanceError(f"head_fraction must lie in (0, 1], got {self.head_fraction!r}")
        if not (isinstance(self.max_samples, int) and self.max_samples >= 1):
            raise BitDanceError(f"max_samples must be a positive integer, got {self.max_samples!r}")

    def keeps_step(self, step: int) -> bool:
        return (step - 1) % self.backbone_every == 0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "CapturePolicy":
        return cls(
            int(data["backbone_every"]), float(data["head_fraction"]), int(data["max_samples"]), int(data["seed"])
        )


class Reservoir:
    """Uniform sample of at most `size` items from a stream (Algorithm R), in arrival order."""

    def __init__(self, size: int, rng: random.Random):
        self.size = size
        self.rng = rng
        self.seen = 0
        self._items: list[tuple[int, object]] = []
        self._slot: int | None = None

    def offer(self) -> bool:
        """Count one candidate; True if it is to be kept (then call `put` with it)."""
        n = self.seen
        self.seen += 1
        if n < self.size:
            self._slot = len(self._items)
            return True
        j = self.rng.randrange(n + 1)
        self._slot = j if j < self.size else None
        return self._slot is not None

    def put(self, item) -> None:
        entry = (self.seen - 1, item)
        if self._slot == len(self._items):
            self._items.append(entry)
        else:
            self._items[self._slot] = entry
        self._slot = None

    def items(self) -> list:
        return [item for _, item in sorted(self._items, key=lambda e: e[0])]

"""The one KV-cache write: a chunk's new keys/values into the static cache, in place.

Cache layout (bitdance_rt.stages): kv [n_layer, 2, rows, heads, L, head_dim]. Graphs only read
the cache and return `new` [n_layer, 2, R, heads, T, head_dim] for their chunk; every backend
stores it with `write_rows` (ImageNet and text-to-image alike), whatever row slots and positions
the chunk's rows have, so rows at different AR steps share one backbone call.
"""

from __future__ import annotations

import torch


def write_rows(kv: torch.Tensor, new: torch.Tensor, slots, starts) -> None:
    """Write row i of `new` into cache row `slots[i]` at positions [starts[i], starts[i]+T).

    `slots`, `starts`: sequences of ints (or an int `starts` for all rows). Rows that share a start
    and sit in consecutive slots are written with one copy. Non-finite values are stored as 0: a
    masked cache position still adds 0 x value, so one NaN or inf kept here would poison every later
    call that reads the row, whoever owns it then (the request that made it fails on its own tokens)."""
    new = torch.nan_to_num(new, nan=0.0, posinf=0.0, neginf=0.0)  # (no "any non-finite?" test: on a GPU
    # that would be a host sync on every AR step; the copy is a chunk's keys/values, small beside the call)
    t = new.shape[4]
    slots = [int(s) for s in slots]
    starts = [int(starts)] * len(slots) if isinstance(starts, int) else [int(s) for s in starts]
    i = 0
    while i < len(slots):
        j = i + 1
        while j < len(slots) and starts[j] == starts[i] and slots[j] == slots[j - 1] + 1:
            j += 1
        kv[:, :, slots[i] : slots[i] + (j - i), :, starts[i] : starts[i] + t] = new[:, :, i:j]
        i = j


def write_cache(kv: torch.Tensor, new: torch.Tensor, start: int) -> None:
    """Every row of `new` at [start, start+T): a batch whose rows all sit at one position."""
    write_rows(kv, new, range(new.shape[2]), int(start))

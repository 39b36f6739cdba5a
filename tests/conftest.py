"""Shared test helpers: where the official fixtures live, and loading them the way users do."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("BITDANCE_FIXTURES", REPO.parent / "shared" / "fixtures" / "official"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block with n torch threads (tiny models: more threads only add contention)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fixture_dir(name: str) -> Path:
    d = FIXTURES / name
    if not d.is_dir():
        pytest.fail(f"official fixtures not found at {d}: the tests read ../shared/fixtures/official "
                    "(set BITDANCE_FIXTURES to override)")
    return d


def fixture_config(name: str) -> dict:
    return json.loads((fixture_dir(name) / "config.json").read_text())


@pytest.fixture(scope="session")
def official():
    """name -> (LoadedModel via the user-facing loader, safetensors stages, sample, config)."""
    from safetensors.torch import load_file

    from bitdance_rt.loading import load_model

    cache = {}

    def get(name: str):
        if name not in cache:
            d = fixture_dir(name)
            loaded = load_model(d / "config.json", d / "checkpoint.pt", d / "vae.pt")
            cache[name] = (loaded.model, load_file(str(d / "stages.safetensors")),
                           load_file(str(d / "sample.safetensors")), fixture_config(name))
        return cache[name]

    return get

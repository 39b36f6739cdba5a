"""Shared test helpers: where the official fixtures live, and loading them the way users do."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
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


# Float32 results of one network differ between CPUs: kernels sum in other orders (AVX-512 vs AVX2
# vs NEON). Measured max |ours - official| / max |official| over the fixtures, one network
# evaluation (decoder, encoder, head net, backbone): <= 3.9e-7 with this CPU's AVX-512 kernels,
# <= 1.44e-6 with AVX2 ones (an emulated EPYC-Milan; 5.96e-6 / 3.47 = 1.7e-6 on a real Zen 3).
# A sampler output iterates the head net S times: 0 here, 4.2e-6 with AVX2. The bounds leave ~6-12x
# headroom; a real defect moves outputs far more (weights rounded through bfloat16, as a wrong
# checkpoint cast would: ~8e-3, tested). Tokens are compared exactly, never with a bound.
ORACLE_REL = 1e-5
ORACLE_SAMPLER_REL = 5e-5


def assert_matches_oracle(actual: torch.Tensor, expected: torch.Tensor, what: str = "",
                          rel: float | None = None) -> None:
    """Float32 agreement with a recorded official output: max abs error <= rel * max |expected|
    (rel: ORACLE_REL for one network evaluation, ORACLE_SAMPLER_REL for sampler outputs)."""
    rel = ORACLE_REL if rel is None else rel
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = float(expected.abs().max())
    err = float((actual.double() - expected.double()).abs().max())
    assert err <= rel * scale, (f"{what}: max abs error {err:.3g} > {rel:g} x max |official| {scale:.3g} "
                                f"(relative {err / scale if scale else float('inf'):.3g})")


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


# ---- one export of the embedded model per session ------------------------------------------------------
@pytest.fixture(scope="session")
def embedded_cache_template(tmp_path_factory):
    """A cache root holding the embedded model's default export and ONNX Runtime's optimised graphs
    of it, made once per session (in a subprocess: this process's environment is left alone).
    Modules take a copy (`warm_cache`) instead of exporting the same graphs again (~20 s each on 2
    cores); tests of exporting into an empty cache keep their own empty roots."""
    root = tmp_path_factory.mktemp("embedded-cache-template")
    code = "from bitdance_rt import Pipeline; Pipeline.from_pretrained(threads=1, progress=False).close()"
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "BITDANCE_RT_CACHE": str(root)}, check=True,
                   timeout=600, cwd=REPO)
    return root


def copy_cache(template: Path, dest: Path) -> Path:
    """A private, writable copy of a cache root (the tiny model's export is a few MB)."""
    shutil.copytree(template, dest, dirs_exist_ok=True)
    return dest


@pytest.fixture(scope="module")
def warm_cache(embedded_cache_template, tmp_path_factory):
    """This module's own cache root, already holding the embedded model's export."""
    return copy_cache(embedded_cache_template, tmp_path_factory.mktemp("warm-cache"))


@contextlib.contextmanager
def cached_pipeline(cache: Path, **options):
    """A Pipeline (one thread, quiet) loaded from cache root `cache` (Pipeline(cache_dir=), which
    leaves the process's environment alone); closed afterwards."""
    from bitdance_rt import Pipeline

    with torch_threads(1):
        pipe = Pipeline.from_pretrained(threads=1, cache_dir=cache, progress=False, **options)
        try:
            yield pipe
        finally:
            pipe.close()


@pytest.fixture(scope="module")
def pipe(warm_cache):
    """The embedded model on ONNX Runtime over this module's warm cache (a module may define its own)."""
    with cached_pipeline(warm_cache) as p:
        yield p

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

# Under pytest-xdist (`--dist loadfile --no-loadscope-reorder`, pyproject.toml) each worker takes the next
# module in collection order when it is free. The longest modules go first, so that none of them starts
# last and leaves the other workers idle at the end (xdist's own reorder sorts by test count, not time).
# Serial seconds per module from `pytest -n auto --durations=0`, 2-core AMD EPYC, 2026-12-06; re-measure
# when a module grows.
LONGEST_FIRST = (
    "test_precision.py",  # 151 s
    "test_cli.py",  # 156 s, fewer since its commands run in-process
    "test_t2i.py",  # 119 s
    "test_streamed_int8.py",  # 92 s
    "test_serve.py",  # 89 s
    "test_large_graphs.py",  # 70 s
    "test_pipeline.py",  # 54 s
    "test_weights_once.py",  # 54 s
    "test_plan.py",  # 49 s
    "test_streamed_export.py",  # 42 s
    "test_export_onnx.py",  # 39 s
    "test_ort_backend.py",  # 35 s
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # (stable: the rest keep their order)


# Under pytest-xdist the workers share the cores: one torch thread each, so they do not oversubscribe them.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))


@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block with n torch threads (tiny models: more threads only add contention)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """`bitdance-rt ARGS` in this process, through cli.main as the console script calls it: exit code,
    stdout and stderr as subprocess.run gives them, without a new interpreter's ~3 s of imports. `env`
    (a whole environment, as subprocess.run takes) is applied for the call; the environment and torch's
    thread count (`--threads` sets it) are put back after. Tests of the process boundary itself (the
    console script, `python -m`, signals) run a subprocess."""
    import io

    from bitdance_rt.cli import main

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, torch_threads(torch.get_num_threads()):
        for name, value in (env or {}).items():
            if os.environ.get(name) != value:
                patch.setenv(name, value)
        for name in set(os.environ) - set(env or os.environ):
            patch.delenv(name)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
    return subprocess.CompletedProcess(["bitdance-rt", *map(str, args)], code, out.getvalue(), err.getvalue())


# Float32 results of one network differ between CPUs: kernels sum in other orders (AVX-512 vs AVX2
# vs NEON). Measured max |ours - official| / max |official| over the fixtures, one network
# evaluation (decoder, encoder, head net, backbone): <= 3.9e-7 with this CPU's AVX-512 kernels,
# <= 1.44e-6 with AVX2 ones (an emulated EPYC-Milan; 5.96e-6 / 3.47 = 1.7e-6 on a real Zen 3).
# A sampler output iterates the head net S times: 0 here, 4.2e-6 with AVX2. The bounds leave ~6-12x
# headroom; a real defect moves outputs far more (weights rounded through bfloat16, as a wrong
# checkpoint cast would: ~8e-3, tested). Tokens are compared exactly, never with a bound.
ORACLE_REL = 1e-5
ORACLE_SAMPLER_REL = 5e-5


def assert_matches_oracle(
    actual: torch.Tensor, expected: torch.Tensor, what: str = "", rel: float | None = None
) -> None:
    """Float32 agreement with a recorded official output: max abs error <= rel * max |expected|
    (rel: ORACLE_REL for one network evaluation, ORACLE_SAMPLER_REL for sampler outputs)."""
    rel = ORACLE_REL if rel is None else rel
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = float(expected.abs().max())
    err = float((actual.double() - expected.double()).abs().max())
    assert err <= rel * scale, (
        f"{what}: max abs error {err:.3g} > {rel:g} x max |official| {scale:.3g} "
        f"(relative {err / scale if scale else float('inf'):.3g})"
    )


def fixture_dir(name: str) -> Path:
    d = FIXTURES / name
    if not d.is_dir():
        pytest.fail(
            f"official fixtures not found at {d}: the tests read ../shared/fixtures/official "
            "(set BITDANCE_FIXTURES to override)"
        )
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
            cache[name] = (
                loaded.model,
                load_file(str(d / "stages.safetensors")),
                load_file(str(d / "sample.safetensors")),
                fixture_config(name),
            )
        return cache[name]

    return get


# ---- made once per run, shared by pytest-xdist's workers ---------------------------------------------
def made_once(tmp_path_factory, name: str, make) -> Path:
    """Directory `name`, filled by make(directory) once per test run. Under pytest-xdist every worker is
    its own session: the first to get here makes it under the run's shared temporary root while holding
    a file lock, the others wait and reuse it (a failed make leaves nothing marked made, so the next
    caller tries again)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    directory = (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / f"once-{name}"
    done = directory / ".made"
    with FileLock(f"{directory}.lock"):
        if not done.is_file():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            make(directory)
            done.touch()
    return directory


# ---- one export of the embedded model per session ------------------------------------------------------
@pytest.fixture(scope="session")
def embedded_cache_template(tmp_path_factory):
    """A cache root holding the embedded model's default export and ONNX Runtime's optimised graphs
    of it, made once per session (in a subprocess: this process's environment is left alone).
    Modules take a copy (`warm_cache`) instead of exporting the same graphs again (~20 s each on 2
    cores); tests of exporting into an empty cache keep their own empty roots."""
    code = "from bitdance_rt import Pipeline; Pipeline.from_pretrained(threads=1, progress=False).close()"

    def make(root: Path):
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "BITDANCE_RT_CACHE": str(root)},
            check=True,
            timeout=600,
            cwd=REPO,
        )

    return made_once(tmp_path_factory, "embedded-cache-template", make)


def copy_cache(template: Path, dest: Path) -> Path:
    """A private, writable copy of a cache root (the tiny model's export is a few MB)."""
    shutil.copytree(template, dest, dirs_exist_ok=True)
    return dest


@pytest.fixture(scope="session")
def embedded_fp16_cache_template(embedded_cache_template, tmp_path_factory):
    """embedded_cache_template plus the FP16 variant of its export (auto_export's), made once per session:
    converting the fused sampler of 25 steps to FP16 takes ~60 s of CPU (onnxconverter_common's node sort
    is quadratic), and several modules derive that same variant."""
    from bitdance_rt import paths
    from bitdance_rt.backends import BackendOptions, auto_export, resolve_model

    def make(root: Path):
        copy_cache(embedded_cache_template, root)
        source = resolve_model(None, None, None, None, None, None)
        with paths.using_cache_root(root), torch_threads(1):
            auto_export(source, source.config.default_steps, BackendOptions(progress=False), "fp16")

    return made_once(tmp_path_factory, "embedded-fp16-cache-template", make)


@pytest.fixture(scope="session")
def embedded_cache_template_s4(tmp_path_factory):
    """A cache root holding the embedded model's automatic FP32 export for 4 sampler steps (what
    auto_export / Pipeline.from_pretrained(steps=4) make), made once per session (~15 s on 2 cores):
    the modules that test the embedded model at 4 steps take a copy."""
    from bitdance_rt import paths
    from bitdance_rt.backends import BackendOptions, auto_export, resolve_model

    def make(root: Path):
        with paths.using_cache_root(root), torch_threads(1):
            auto_export(resolve_model(None, None, None, None, None, None), 4, BackendOptions(progress=False), "fp32")

    return made_once(tmp_path_factory, "embedded-cache-template-s4", make)


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


# ---- text-to-image: the tiny checkpoints and their automatic exports, once per session ------------------
T2I_TEXT_TOKENS = 48  # max_text_tokens of the tiny text-to-image tests
T2I_STEPS = 2  # their sampler steps


@pytest.fixture(scope="session")
def t2i_checkpoints(tmp_path_factory):
    """{P: the tiny official-layout text-to-image checkpoint of parallel_num P} (tests/t2i_tiny.py, seed 0),
    written once. Read-only: a test that damages or edits one copies it first."""
    from t2i_tiny import write_checkpoint

    def make(root: Path):
        for p in (16, 64):
            write_checkpoint(root / f"p{p}", parallel_num=p)

    root = made_once(tmp_path_factory, "t2i-checkpoints", make)
    return {p: root / f"p{p}" for p in (16, 64)}


@pytest.fixture(scope="session")
def t2i_cache_template(t2i_checkpoints, tmp_path_factory):
    """template(P, *precisions) -> a cache root holding the automatic exports (512x512, T2I_TEXT_TOKENS,
    T2I_STEPS, default options: what `generate` / Pipeline.from_pretrained make) of t2i_checkpoints[P] at
    those precisions (default fp32), each made once per session. Tests take a copy (`copy_cache`) instead
    of exporting the same graphs again (fp32 and fp16 of one checkpoint: ~20 s on 2 cores, per test); the
    weights' identity is their files' sha256, so a checkpoint written again with the same seed finds them."""
    from bitdance_rt import paths
    from bitdance_rt.backends import BackendOptions, auto_export, resolve_model

    root = made_once(tmp_path_factory, "t2i-cache-template", lambda root: None)

    def template(p: int, *precisions: str) -> Path:
        source = resolve_model(None, str(t2i_checkpoints[p]), None, 512, 512, T2I_TEXT_TOKENS)
        for precision in precisions or ("fp32",):

            def make(_, precision=precision):
                with paths.using_cache_root(root), torch_threads(1):
                    auto_export(source, T2I_STEPS, BackendOptions(progress=False, threads=1), precision)

            made_once(tmp_path_factory, f"t2i-cache-template-p{p}-{precision}", make)
        return root

    return template


# ---- the official fixture models' full export, once per session ----------------------------------------
FIXTURE_STEPS = 6  # the official fixtures' sampler steps


@pytest.fixture(scope="session")
def fixture_exports(tmp_path_factory):
    """get(name) -> the ExportResult of official fixture `name` exported with every stage at
    FIXTURE_STEPS (export_stages' defaults otherwise), made once per session: several modules test
    the same graphs. Modules take a copy (`copy_export`); its result is the session export's, manifest
    and all (the copy is the same files)."""
    from bitdance_rt.export import ExportResult, checkpoint_source, export_stages, read_manifest
    from bitdance_rt.loading import load_model

    def get(name: str):
        def make(directory: Path):
            d = fixture_dir(name)
            with torch_threads(1):
                model = load_model(f"{d}/config.json", f"{d}/checkpoint.pt").model
                result = export_stages(
                    model,
                    directory / name,
                    checkpoint_source(d / "checkpoint.pt"),
                    sampler_steps=FIXTURE_STEPS,
                    progress=False,
                )
            (directory / "reused.json").write_text(json.dumps(result.reused))

        made = made_once(tmp_path_factory, f"fixture-export-{name}", make)
        reused = json.loads((made / "reused.json").read_text())  # (what export_stages said; workers reread it)
        return ExportResult(made / name, read_manifest(made / name), reused=reused)

    return get


def copy_export(result, dest: Path):
    """A private copy of an export (an ExportResult) at `dest`, as the ExportResult of that copy."""
    from dataclasses import replace

    shutil.copytree(result.directory, dest)
    return replace(result, directory=Path(dest))

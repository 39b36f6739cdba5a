"""Fault injection at the Pipeline and the CLI: a request that computes NaN, values no front door
may let through, outputs that cannot be written, a read-only cache, a script that never calls
close(). Each test failed on the code before its fix (issue: fault injection found eleven defects)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from bitdance_rt import Pipeline
from bitdance_rt import stages as st
from bitdance_rt.errors import BitDanceError
from bitdance_rt.runtime.params import MAX_SEED, MAX_STEPS, ParamError
from bitdance_rt.sampling import NoiseSource
from conftest import REPO, torch_threads

pytest.importorskip("onnxruntime")


class NanNoise(NoiseSource):
    """A user's noise source that hands out NaN (a broken replay file would too)."""

    def draw(self, shape):
        return torch.full(tuple(shape), float("nan"))


def _poison_backbone(pipe, monkeypatch):
    """Every backbone call returns NaN keys/values and conditions, as an FP16 overflow would."""
    run = pipe.backend._run

    def poisoned(stage, feeds, phase=None):
        out = run(stage, feeds, phase)
        if stage == st.BACKBONE:
            out = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in out.items()}
        return out

    monkeypatch.setattr(pipe.backend, "_run", poisoned)


def test_a_request_that_computes_nan_fails_alone_and_poisons_nothing(pipe, monkeypatch):
    labels = list(range(10)) + [0, 1, 2, 3, 4, 5]
    before = {i: pipe.generate(labels=[l], seed=i).tokens for i, l in enumerate(labels)}
    with monkeypatch.context() as m:  # NaN in its own cache rows and conditions
        _poison_backbone(pipe, m)
        with pytest.raises(BitDanceError, match="non-finite values at AR step 0"):
            pipe.generate(labels=[5], seed=1)
    with pytest.raises(BitDanceError, match="non-finite"):  # NaN from its noise, on the real graphs
        pipe.generate(labels=[5], noise=NanNoise())
    assert torch.isfinite(pipe.backend._kv).all(), "a non-finite value was stored in the KV cache"
    # the same requests after the poisoned ones: alone, and 16 at once (every cache row reused)
    assert torch.equal(pipe.generate(labels=[labels[0]], seed=0).tokens, before[0])
    futures = {i: pipe.submit(labels=[l], seed=i) for i, l in enumerate(labels)}
    for i, f in futures.items():
        assert torch.equal(f.result().tokens, before[i]), f"request {i} differs after a poisoned request"


def test_a_poisoned_request_beside_others_leaves_them_exact(pipe):
    want = pipe.generate(labels=[7, 3], seed=4).tokens
    bad = pipe.submit(labels=[1, 2, 3], noise=NanNoise())
    good = pipe.submit(labels=[7, 3], seed=4)
    with pytest.raises(BitDanceError, match="non-finite"):
        bad.result()
    assert torch.equal(good.result().tokens, want)


@pytest.mark.parametrize(
    "kwargs,param,needle",
    [
        (dict(labels=5, cfg=float("inf")), "cfg", "finite number in 0..100"),
        (dict(labels=5, cfg=float("nan")), "cfg", "finite number"),
        (dict(labels=5, cfg=-1.0), "cfg", "finite number in 0..100"),
        (dict(labels=5, cfg="4"), "cfg", "must be a number"),
        (dict(labels="12"), "labels", "got the string '12'"),
        (dict(labels=[3.7]), "labels", "labels must be integers, got float 3.7"),
        (dict(labels=[True]), "labels", "labels must be integers"),
        (dict(labels=[]), "labels", "labels is empty"),
        (dict(labels={"a": 1}), "labels", "labels must be integers, got str"),
        (dict(labels=5, steps=MAX_STEPS + 1), "steps", f"steps must be an integer in 1..{MAX_STEPS}"),
        (dict(labels=5, steps=2.5), "steps", "steps must be an integer"),
        (dict(labels=5, seed=MAX_SEED + 1), "seed", "seed must be an integer in 0.."),
        (dict(labels=5, seed=-1), "seed", "seed must be an integer in 0.."),
        (dict(labels=5, seed=1.5), "seed", "seed must be an integer"),
        (dict(labels=5, num_images=True), "num_images", "num_images must be an integer"),
        (dict(labels=5, preview_every=-2), "preview_every", "preview_every"),
    ],
)
def test_every_value_is_checked_once_with_one_cap(pipe, kwargs, param, needle):
    with pytest.raises(ParamError, match=needle) as err:
        pipe.submit(**kwargs)
    assert err.value.param == param
    assert pipe.queued == 0 and pipe.rows_in_flight == 0


def test_the_cap_holds_at_load_too():
    with pytest.raises(ParamError, match=f"1..{MAX_STEPS}"):
        Pipeline.from_pretrained(steps=100000)


def test_numpy_and_torch_integers_are_labels(pipe):
    import numpy as np

    want = pipe.generate(labels=[3, 4], seed=2).tokens
    assert torch.equal(pipe.generate(labels=np.array([3, 4]), seed=np.int64(2)).tokens, want)
    assert torch.equal(pipe.generate(labels=torch.tensor([3, 4]), seed=2).tokens, want)


# ---- the command line ----------------------------------------------------------------------
def one_line(res, needle: str, warnings: bool = False) -> None:
    """Status 2 and one error line with `needle`, no traceback (`warnings`: one-line warnings may precede it)."""
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    if warnings:
        lines = [l for l in lines if "warning" not in l and "cannot write hash cache" not in l]
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and len(lines) == 1 and needle in lines[0], res.stderr


def in_process(capsys, *args):
    """main(argv) in this process (the refusals come before any model is loaded)."""
    from bitdance_rt.cli import main

    code = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, "", capsys.readouterr().err)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--cfg", "inf"], "cfg must be a finite number"),
        (["--steps", "100000"], f"steps must be an integer in 1..{MAX_STEPS}"),
        (["--seed", str(2**64)], "seed must be an integer in 0.."),
        (["--seed", "x"], "not a number: 'x'"),
    ],
)
def test_cli_refuses_values_at_parse_time(args, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BITDANCE_RT_CACHE", str(tmp_path / "c"))
    one_line(in_process(capsys, "generate", "--out", tmp_path / "o", *args), needle)
    assert not (tmp_path / "c").exists(), "nothing may be exported for a refused request"


def test_cli_refuses_outputs_it_cannot_write_before_generating(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BITDANCE_RT_CACHE", str(tmp_path / "c"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line(in_process(capsys, "generate", "--out", afile), "it is a file; give a directory")
    one_line(in_process(capsys, "generate", "--out", afile / "sub"), "is a file, so nothing can be written under it")
    one_line(
        in_process(capsys, "generate", "--out", tmp_path / "o", "--save-tokens", tmp_path),
        "it is a directory; give a file path",
    )
    assert not (tmp_path / "c").exists() and not (tmp_path / "o").exists()


def _unshare_ok() -> bool:
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


def test_cli_on_a_read_only_cache_is_one_line(tmp_path):
    """A read-only file system (EROFS, made with a read-only bind mount in a private mount namespace;
    root ignores chmod) under an empty cache: one line, status 2."""
    assert _unshare_ok(), "this test needs `unshare -m` (util-linux) to make a read-only mount"
    cache = tmp_path / "ro-cache"
    cache.mkdir()
    script = (
        f"mount --bind {cache} {cache} && mount -o remount,bind,ro {cache} && "
        f"BITDANCE_RT_CACHE={cache} {sys.executable} -m bitdance_rt generate --out {tmp_path / 'o'} --quiet"
    )
    res = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    one_line(res, "Read-only file system", warnings=True)


def test_a_script_that_never_closes_its_pipeline_exits_cleanly(pipe, warm_cache, tmp_path):
    """The interpreter's exit stops the scheduler and releases the sessions: it aborted in ONNX
    Runtime's destructors ("terminate called without an active exception", status 134) in most runs."""
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent("""
        from bitdance_rt import Pipeline
        pipe = Pipeline.from_pretrained(progress=False)
        pipe.generate(labels=[3])
    """)
    )
    for _ in range(3):
        res = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
            env={**os.environ, "BITDANCE_RT_CACHE": str(warm_cache)},
        )
        assert res.returncode == 0 and "terminate called" not in res.stderr, (res.returncode, res.stderr[-500:])


def test_close_releases_the_backend_and_is_idempotent(warm_cache):
    with torch_threads(1):
        p = Pipeline.from_pretrained(threads=1, cache_dir=warm_cache, progress=False)
    p.generate(labels=[1])
    p.close()
    p.close()
    assert p.backend.sessions == {} and p.backend._kv is None
    with pytest.raises(BitDanceError, match="closed"):
        p.submit(labels=[1])

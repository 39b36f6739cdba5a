"""The public API on the embedded model: load once, generate, submit from many threads, stream;
every request's images equal the same request run alone; text-to-image through the same Pipeline
on every backend; clear errors."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from bitdance_rt import Pipeline
from bitdance_rt.errors import BitDanceError
from bitdance_rt.runtime import generate_batched
from bitdance_rt.sampling import SeededNoise

from conftest import cached_pipeline, copy_cache, torch_threads

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def pipe(warm_cache):
    with cached_pipeline(warm_cache) as p:
        assert any((warm_cache / "exports").iterdir())
        yield p


def test_loading_leaves_the_environment_alone(warm_cache, monkeypatch):
    """cache_dir is this load's cache root: the export is found there (nothing is exported into the
    environment's root, an empty directory here), and os.environ is exactly as it was."""
    monkeypatch.setenv("BITDANCE_RT_CACHE", str(warm_cache.parent / "another-root"))
    before = dict(os.environ)
    with torch_threads(1), Pipeline.from_pretrained(threads=1, cache_dir=warm_cache, progress=False) as p:
        assert dict(os.environ) == before
        assert str(p.backend.dir).startswith(str(warm_cache))
        p.generate(labels=[1], seed=0)
    assert dict(os.environ) == before and not (warm_cache.parent / "another-root").exists()


def _alone(pipe, labels, seed, **kw):
    """The request run alone, through the batch entry point (its own scheduler, nothing else in it)."""
    cfg = pipe.config
    return generate_batched(
        pipe.backend,
        labels,
        kw.get("steps", pipe.steps),
        kw.get("cfg", cfg.default_cfg),
        kw.get("cfg_schedule"),
        SeededNoise(seed),
    )


def test_generate_defaults_and_output(pipe):
    assert pipe.backend.name == "onnxruntime" and pipe.config.name == "tiny-digits"
    out = pipe.generate(labels=[3, 7], seed=5)
    assert out.tokens.shape[0] == 2 and out.labels == [3, 7] and out.seconds > 0 and out.first_step_seconds > 0
    assert [im.size for im in out.images] == [(pipe.config.image_size, pipe.config.image_size)] * 2
    assert torch.equal(out.tokens, _alone(pipe, [3, 7], 5).tokens)
    four = pipe.generate(labels=2, num_images=4, seed=1)
    assert four.labels == [2, 2, 2, 2] and torch.equal(four.tokens, _alone(pipe, [2] * 4, 1).tokens)


def test_threads_submitting_at_once_get_what_they_would_get_alone(pipe):
    """12 requests from 6 threads (labels, seeds, guidance, schedule, image counts, sampler steps
    differ): the scheduler mixes them in shared calls, and each result equals its run alone."""
    specs = [
        dict(
            labels=[i % 10],
            seed=i,
            cfg=[1.0, 3.0, 4.0][i % 3],
            cfg_schedule=["linear", "constant"][i % 2],
            num_images=1 + i % 3,
            steps=[pipe.steps, 6][i % 4 == 3],
        )
        for i in range(12)
    ]
    results = [None] * len(specs)
    barrier = threading.Barrier(6)

    def worker(k):
        barrier.wait()
        futures = [(j, pipe.submit(**specs[j])) for j in range(k, len(specs), 6)]
        for j, f in futures:
            results[j] = f.result(timeout=300)

    before = pipe.scheduler.iterations
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert all(r is not None for r in results)
    shared = list(pipe.scheduler.rows_per_iteration)[before:]
    assert max(shared) > 2 * 3  # rows of several requests in one call (the largest request has 6)
    for spec, got in zip(specs, results):
        labels = [l for l in spec["labels"] for _ in range(spec["num_images"])]
        want = _alone(
            pipe, labels, spec["seed"], steps=spec["steps"], cfg=spec["cfg"], cfg_schedule=spec["cfg_schedule"]
        )
        assert torch.equal(got.tokens, want.tokens), spec
        assert torch.equal(got.image, want.image), spec


def test_stream_progress_previews_and_result(pipe):
    events = list(pipe.stream(labels=4, seed=2, preview_every=1))
    *steps, out = events
    ar = pipe.config.ar_steps
    assert [e.step for e in steps] == list(range(1, ar)) and all(e.total == ar for e in steps)
    assert all(e.preview.size == (pipe.config.image_size,) * 2 for e in steps)
    assert torch.equal(out.tokens, pipe.generate(labels=4, seed=2).tokens)
    plain = list(pipe.stream(labels=4, seed=2))[:-1]
    assert [e.preview for e in plain] == [None] * (ar - 1)  # no previews unless asked


def test_closing_a_stream_early_cancels_its_request(pipe):
    stream = pipe.stream(labels=1, seed=0)
    next(stream)
    stream.close()
    out = pipe.generate(labels=1, seed=0)  # the pipeline keeps serving
    assert torch.equal(out.tokens, _alone(pipe, [1], 0).tokens)
    assert pipe.rows_in_flight == 0 and pipe.queued == 0


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(labels=[10]), "out of range"),
        (dict(labels=[-1]), "out of range"),
        (dict(), "give labels"),
        (dict(prompt="a cat"), "class-conditional"),
        (dict(labels=1, num_images=0), "num_images must be a positive integer"),
        (dict(labels=1, steps=0), "steps must be an integer in 1..1000"),
        (dict(labels=1, cfg_schedule="cosine"), "cfg_schedule must be one of linear, constant"),
    ],
)
def test_bad_requests_fail_before_they_are_queued(pipe, kwargs, needle):
    with pytest.raises(BitDanceError, match=needle):
        pipe.submit(**kwargs)
    assert pipe.queued == 0


def test_bad_options():
    with pytest.raises(BitDanceError, match="backend 'magic'"):
        Pipeline.from_pretrained(backend="magic")
    with pytest.raises(BitDanceError, match="precision 'int2'"):
        Pipeline.from_pretrained(precision="int2")
    with pytest.raises(BitDanceError, match="text-to-image checkpoints"):
        Pipeline.from_pretrained(height=512)


def test_text_to_image_runs_through_the_same_pipeline_on_each_backend(
    t2i_checkpoints, t2i_cache_template, tmp_path, monkeypatch
):
    """The cache starts with the session's FP32 and FP16 exports of the checkpoint (conftest
    t2i_cache_template, as a Pipeline of each would leave them); the INT8 variant and its default
    calibration set are made here."""
    ckpt = t2i_checkpoints[64]
    cache = copy_cache(t2i_cache_template(64, "fp32", "fp16"), tmp_path / "cache")
    assert not (cache / "calibration").exists()
    monkeypatch.setenv("BITDANCE_RT_CACHE", str(cache))  # restored after the test
    kw = dict(checkpoint=ckpt, height=512, width=512, max_text_tokens=48, steps=2, threads=1, progress=False)
    tokens = {}
    with torch_threads(1):
        for backend in ("torch", "onnxruntime"):
            with Pipeline.from_pretrained(backend=backend, **kw) as p:
                out = p.generate(prompt="a red cat", seed=21)  # seed 21: far from any sign flip (test_t2i)
                assert out.prompts == ["a red cat"] and out.images[0].size == (512, 512)
                tokens[backend] = out.tokens
                with pytest.raises(BitDanceError, match="text-to-image: give prompt"):
                    p.submit(labels=[1])
    assert torch.equal(tokens["torch"], tokens["onnxruntime"])
    with torch_threads(1), Pipeline.from_pretrained(backend="onnxruntime", precision="fp16", **kw) as p:
        half = p.generate(prompt="a red cat", seed=21)
    assert half.tokens.abs().eq(1).all() and half.image.shape == (1, 3, 512, 512)
    # INT8: calibrated on text-to-image trajectories of the default prompts (ids / pad prefills, the
    # backbone steps with each row's padding), Q/DQ graphs, generated through the same Pipeline. The
    # default set is cut to its first 2 images (one capture batch): every step of the default capture
    # still runs, and its 16 images cost ~50 s more CPU here (decoding 512 px images on the FP16 graphs,
    # 1.7 s each, then calibrating the INT8 decoder on them) for nothing this test checks
    from bitdance_rt.precision import auto

    default_prompts = auto.default_prompts
    monkeypatch.setattr(auto, "default_prompts", lambda images=2: default_prompts(images))
    with torch_threads(1), Pipeline.from_pretrained(backend="onnxruntime", precision="int8", **kw) as p:
        eight = p.generate(prompt="a red cat", seed=21)
        graphs = p.backend.dir
    assert eight.tokens.abs().eq(1).all() and eight.image.shape == (1, 3, 512, 512) and eight.image.isfinite().all()
    import onnx

    for stage in ("token_embed", "backbone", "head_step", "decoder"):  # (the INT8 variant's quantised stages)
        ops = {n.op_type for n in onnx.load(str(graphs / f"{stage}.onnx"), load_external_data=False).graph.node}
        assert "QuantizeLinear" in ops and "DequantizeLinear" in ops, stage
    from bitdance_rt.calibration import load_calibration
    from bitdance_rt.precision.auto import DEFAULT_T2I_PROMPTS

    calib = [d for d in (tmp_path / "cache" / "calibration").iterdir() if d.is_dir()]
    cset = load_calibration(calib[0])
    prompts = cset.key["prompts"]
    assert len(prompts) == 2 and all(prompt in " ".join(DEFAULT_T2I_PROMPTS) for prompt in prompts)
    prefill = cset.phase_samples("backbone", "prefill")[0].inputs  # the backbone at its prefill: x of the ids
    assert prefill["x"].shape[1] == p.config.prefix_len and prefill["pad"].shape == prefill["start"].shape
    step = cset.phase_samples("backbone", "step")[0].inputs
    assert step["x"].shape[1] == p.config.parallel_num and step["pad"].shape == step["start"].shape
    assert cset.samples["token_embed"] and "prefix_embed" not in cset.samples  # a table lookup: nothing to calibrate
    if not torch.cuda.is_available():  # never a silent fallback to another backend
        with pytest.raises(BitDanceError, match="needs a CUDA GPU"):
            Pipeline.from_pretrained(backend="tensorrt", **kw)


def test_cancel_a_submitted_request(pipe):
    from concurrent.futures import CancelledError

    futures = [pipe.submit(labels=d, num_images=8, seed=d) for d in range(5)]  # more rows than slots: some wait
    pipe.cancel(futures[-1])
    with pytest.raises(CancelledError):
        futures[-1].result(timeout=300)
    assert all(f.result(timeout=300).tokens.shape[0] == 8 for f in futures[:-1])
    with pytest.raises(BitDanceError, match="a Future returned by this Pipeline"):
        pipe.cancel(object())


def test_torch_pipeline_mixes_requests_like_onnxruntime():
    """The embedded model on the torch backend: concurrent requests equal their runs alone too."""
    with torch_threads(1), Pipeline.from_pretrained(backend="torch", progress=False) as p:
        futures = [p.submit(labels=d, seed=d, num_images=1 + d % 2) for d in range(6)]
        got = [f.result(timeout=300) for f in futures]
        for d, out in enumerate(got):
            assert torch.equal(out.tokens, _alone(p, [d] * (1 + d % 2), d).tokens)


def test_a_max_batch_of_one_generates_the_same_images(pipe, warm_cache):
    """max_batch=1 gives graphs and a cache of 2 rows, fewer than the usual 4-row floor of a call:
    the cache then holds 2 rows, and the images are the default Pipeline's."""
    with (
        torch_threads(1),
        Pipeline.from_pretrained(max_batch=1, threads=1, cache_dir=warm_cache, progress=False) as small,
    ):
        assert small.max_batch == 1
        out = small.generate(labels=3, seed=4)
        assert small.backend._kv.shape[2] == 2
    assert torch.equal(out.tokens, pipe.generate(labels=3, seed=4).tokens)

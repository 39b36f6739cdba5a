"""TensorRT on a GPU (marker `gpu`; skipped without CUDA or without the tensorrt package):
fixture engines give the official tokens (FP32), FP16 agreement is reported, CUDA-graph replay
equals plain execution (the backbone's step phase captured, never its prefill), the backbone is one
engine with a profile per phase (prefill contexts on profile 0, step contexts on profile 1),
head_step is deserialised only when needed, a stale engine is rebuilt, and `check --backend
tensorrt` passes."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="needs the tensorrt package"),
]

from safetensors.torch import load_file  # noqa: E402

from bitdance_rt import stages as st  # noqa: E402
from bitdance_rt.cli import main  # noqa: E402
from bitdance_rt.export import checkpoint_source, export_stages  # noqa: E402
from bitdance_rt.loading import load_model  # noqa: E402
from bitdance_rt.runtime import generate  # noqa: E402
from bitdance_rt.sampling import ReplayNoise  # noqa: E402

from conftest import fixture_dir  # noqa: E402

S = 6


@pytest.fixture(scope="module", params=["tiny_4x", "tiny_1x"])
def tiny(request, tmp_path_factory):
    d = fixture_dir(request.param)
    model = load_model(d / "config.json", d / "checkpoint.pt").model
    root = tmp_path_factory.mktemp("trt-gpu")
    export_stages(
        model,
        root / "export",
        checkpoint_source(d / "checkpoint.pt"),
        sampler_steps=S,
        limits=st.Limits(max_batch=4, opt_batch=2),
    )
    return d, root / "export", root / "engines", load_file(str(d / "sample.safetensors"))


def _backend(tiny, **kw):
    from bitdance_rt.runtime.trt_backend import TrtBackend

    _, export, engines, _ = tiny
    return TrtBackend.from_export(export, engine_root=engines, **kw)


def _run(backend, tiny):
    d, _, _, sample = tiny
    labels = [int(x) for x in sample["labels"]]
    return generate(backend, labels, S, 3.0, "linear", ReplayNoise(d / "sample.safetensors"))


@pytest.mark.parametrize("sampler", ["fused", "step"])
def test_fp32_engines_reproduce_the_official_tokens(tiny, sampler):
    result = _run(_backend(tiny, sampler=sampler), tiny)
    sample = tiny[3]
    assert torch.equal(result.tokens.cpu(), sample["tokens"])
    assert torch.equal(result.latent.cpu(), sample["latent"])
    assert (result.image.cpu() - sample["image"]).abs().max().item() <= 1e-3


def test_cuda_graph_replay_equals_plain_execution(tiny):
    graphs = _backend(tiny)
    plain = _backend(tiny, cuda_graphs=False)
    a, b = _run(graphs, tiny), _run(plain, tiny)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.image, b.image)
    captured = {(stage, phase) for stage, phase, _ in graphs.captures}
    assert not [c.key for c in graphs._calls.values() if c.capture_failed]  # no silent fallback to eager
    assert {(st.BACKBONE, "step"), (st.TOKEN_EMBED, None)} <= captured
    assert (st.BACKBONE, "prefill") not in captured and (st.PREFIX_EMBED, None) not in captured
    assert {stage for stage, _ in captured} & set(st.SAMPLER_STAGES)
    assert plain.captures == []
    again = _run(graphs, tiny)  # replay only: no new captures for the same shapes
    assert torch.equal(again.tokens, a.tokens) and len({k for k in graphs.captures}) == len(graphs.captures)


def test_backbone_is_one_engine_with_a_profile_per_phase(tiny):
    """The built backbone engine holds the contract's prefill and step profiles (in that order); a
    generation runs the prefill on a profile-0 context and every step on a profile-1 context, and the
    backbone reads the embedding stages' output buffers in place."""
    from bitdance_rt.engines.profiles import dynamic_inputs

    backend = _backend(tiny)
    _run(backend, tiny)
    engine, spec = backend.engines[st.BACKBONE], backend.specs[st.BACKBONE]
    assert engine.num_optimization_profiles == 2 and spec.profile_phases == ["prefill", "step"]
    for k, phase in enumerate(spec.profile_phases):
        for name in dynamic_inputs(spec):
            got = tuple(tuple(d) for d in engine.get_tensor_profile_shape(name, k))
            assert got == spec.profile(name, phase), (name, phase)
    calls = [c for c in backend._calls.values() if c.stage == st.BACKBONE]
    assert {c.phase for c in calls} == {"prefill", "step"}
    for c in calls:
        assert c.profile == (0 if c.phase == "prefill" else 1)
        active = getattr(c.context, "active_optimization_profile", c.profile)
        assert active == c.profile
        embed = st.PREFIX_EMBED if c.phase == "prefill" else st.TOKEN_EMBED
        producer = backend._calls[(embed, None, (("rows", c.key[2][0][1]),))]
        assert c.buffers["x"] is producer.buffers["x"]  # no copy, no host round trip


def test_head_step_engine_is_loaded_only_when_needed(tiny):
    backend = _backend(tiny)  # sampler auto, fused graph of S: head_step waits
    result = _run(backend, tiny)
    assert st.HEAD_STEP not in backend.engines and backend.has_stage(st.HEAD_STEP)
    from bitdance_rt.sampling import SeededNoise

    sample = tiny[3]
    generate(backend, [int(x) for x in sample["labels"]][:1], S - 1, 3.0, "linear", SeededNoise(0))
    assert st.HEAD_STEP in backend.engines  # another step count: loaded now
    step = _backend(tiny, sampler="step")
    assert st.HEAD_STEP in step.engines
    assert torch.equal(_run(step, tiny).tokens.cpu(), result.tokens.cpu())


def test_fp16_engines_report_agreement(tiny):
    import tensorrt

    if int(tensorrt.__version__.split(".")[0]) >= 11:
        pytest.skip("TensorRT 11 builds FP16 engines only from FP16 graphs")
    result = _run(_backend(tiny, precision="fp16"), tiny)
    agreement = (result.tokens.cpu() == tiny[3]["tokens"]).float().mean().item()
    print(f"fp16 token agreement with the fp32 fixture: {agreement:.4f}")
    assert result.tokens.abs().eq(1).all() and agreement > 0.5


def test_stale_engine_is_rebuilt(tiny, caplog):
    from bitdance_rt.engines.build import build_engines

    caplog.set_level(logging.INFO, logger="bitdance_rt")
    _, export, engines, _ = tiny
    first = build_engines(export, workspace_mb=256, root=engines, stages=[st.DECODER])
    second = build_engines(export, workspace_mb=512, root=engines, stages=[st.DECODER])
    assert first[st.DECODER].status in ("built", "rebuilt", "cached")
    assert second[st.DECODER].status == "rebuilt" and any("workspace_bytes" in line for line in caplog.messages)
    assert build_engines(export, workspace_mb=512, root=engines, stages=[st.DECODER])[st.DECODER].status == "cached"


def test_check_tensorrt_cli(tiny, capsys):
    pytest.importorskip("polygraphy", reason="check compares stages with Polygraphy (pip install polygraphy)")
    d, export, engines, _ = tiny
    rc = main(
        [
            "check",
            "--backend",
            "tensorrt",
            "--export-dir",
            str(export),
            "--engine-dir",
            str(engines),
            "--model",
            str(d / "config.json"),
            "--checkpoint",
            str(d / "checkpoint.pt"),
            "--noise-from",
            str(d / "sample.safetensors"),
            "--cfg",
            "3.0",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "identical tokens" in out


def test_mixed_requests_on_fixed_device_buffers_equal_alone(tiny):
    """Continuous batching on TensorRT: rows at different AR steps and guidance share the captured
    calls (per-row positions, guidance and noise in fixed device buffers, padded row counts), and
    each request's tokens equal the request run alone."""
    from bitdance_rt.runtime import Scheduler
    from bitdance_rt.runtime.loop import make_request
    from bitdance_rt.sampling import SeededNoise

    backend = _backend(tiny)
    cfg = backend.config
    specs = [([1, 2], 0, 3.0, "linear"), ([5], 1, 2.0, "constant"), ([7], 2, 1.0, "linear"), ([3], 3, 4.0, "linear")]
    alone = [generate(backend, labels, S, g, sched, SeededNoise(seed)) for labels, seed, g, sched in specs]
    scheduler = Scheduler(backend)
    requests = []
    for k, (labels, seed, g, sched) in enumerate(specs):
        requests.append(scheduler.submit(make_request(cfg, labels, S, g, sched, SeededNoise(seed), None)))
        scheduler.iteration()  # the next one arrives one AR step later
    scheduler.run_until_idle()
    for a, r in zip(alone, requests):
        assert torch.equal(a.tokens, r.future.result().tokens)
    assert max(scheduler.rows_per_iteration) > 4
    assert not [c.key for c in backend._calls.values() if c.capture_failed]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_backend_on_the_second_gpu(tiny):
    backend = _backend(tiny, device="cuda:1")
    assert backend.device == torch.device("cuda", 1) and backend.kv_cache is None
    result = _run(backend, tiny)
    assert torch.equal(result.tokens.cpu(), tiny[3]["tokens"])
    assert backend._kv.device == torch.device("cuda", 1)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "int8", "int4"])
def test_text_to_image_on_tensorrt(tmp_path, monkeypatch, precision):
    """The tiny Qwen3 text-to-image checkpoint through TensorRT engines (ids / pad prefill, GQA cache,
    the backbone's two profiles): FP32 tokens agree with ONNX Runtime's FP32 (random weights put some
    pre-sign values near zero: >= 99% of bits, seed 21 as in test_t2i), FP16 / BF16 / INT8 / INT4 (the
    graphs of that precision, made as for ONNX Runtime; INT4 in TensorRT's form) generate +/-1 tokens and
    finite images."""
    from t2i_tiny import write_checkpoint

    from bitdance_rt import Pipeline

    monkeypatch.setenv("BITDANCE_RT_CACHE", str(tmp_path / "cache"))
    kw = dict(
        checkpoint=write_checkpoint(tmp_path / "t2i", parallel_num=16),
        height=512,
        width=512,
        max_text_tokens=24,
        steps=2,
        progress=False,
    )
    with Pipeline.from_pretrained(backend="tensorrt", precision=precision, **kw) as pipe:
        assert pipe.backend.name == "tensorrt"
        out = pipe.generate(prompt="a red cat", seed=21)
    assert out.tokens.abs().eq(1).all() and out.image.isfinite().all()
    if precision == "fp32":
        with Pipeline.from_pretrained(backend="onnxruntime", **kw) as ref:
            want = ref.generate(prompt="a red cat", seed=21).tokens
        assert (out.tokens.cpu() == want).float().mean() >= 0.99

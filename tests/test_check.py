"""`bitdance-rt check` on CPU: ONNX Runtime against the torch reference through the Polygraphy
harness (per stage, per output tolerance), end-to-end tokens with the fixture noise, and
failures that the harness must catch."""

from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("polygraphy")

from polygraphy.comparator import IterationResult  # noqa: E402

from bitdance_rt import stages as st  # noqa: E402
from bitdance_rt.check import Agreement, compare_stage, make_compare_func, ort_runner, tolerances  # noqa: E402
from bitdance_rt.cli import main  # noqa: E402
from bitdance_rt.export import checkpoint_source, export_stages  # noqa: E402
from bitdance_rt.loading import load_model  # noqa: E402
from bitdance_rt.runtime.ort_backend import OrtBackend  # noqa: E402

from conftest import fixture_dir, torch_threads  # noqa: E402

S = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = fixture_dir("tiny_4x")
    model = load_model(d / "config.json", d / "checkpoint.pt").model
    out = tmp_path_factory.mktemp("check") / "tiny_4x"
    with torch_threads(1):
        export_stages(
            model,
            out,
            checkpoint_source(d / "checkpoint.pt"),
            sampler_steps=S,
            limits=st.Limits(max_batch=4, opt_batch=2),
        )
    return d, model, out


def test_check_cli_onnxruntime_every_stage_and_end_to_end(tiny, capsys):
    d, _, export = tiny
    rc = main(
        [
            "check",
            "--backend",
            "onnxruntime",
            "--export-dir",
            str(export),
            "--model",
            str(d / "config.json"),
            "--checkpoint",
            str(d / "checkpoint.pt"),
            "--noise-from",
            str(d / "sample.safetensors"),
            "--cfg",
            "3.0",
            "--threads",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    for stage in st.ALL_STAGES:
        if stage == st.BACKBONE:  # one graph, compared in each of its phases
            assert "  backbone (prefill): PASS" in out and "  backbone (step): PASS" in out
        else:
            assert f"  {stage}: PASS" in out
    assert "tokens: ok, agreement 1.000000 (>= 1.0)" in out  # fp32: identical sampler tokens
    assert "image: ok, max |diff|" in out and "(atol 1e-04, rtol 1e-04)" in out
    assert "token agreement 1.000000 (>= 1.0), 2 of 2 images with identical tokens" in out
    assert out.rstrip().endswith("PASSED")


def test_check_catches_a_wrong_graph(tiny, capsys):
    """A reference with one perturbed head weight must fail head_step, and so the command."""
    d, model, export = tiny
    bad = copy.deepcopy(model)
    with torch.no_grad():
        next(bad.head.parameters()).add_(0.05)
    backend = OrtBackend(export, threads=1)
    result = compare_stage(bad, backend.specs[st.HEAD_STEP], ort_runner(backend, st.HEAD_STEP))
    assert not result.passed and result.outputs[0].name == "x_pred" and "max |diff|" in result.outputs[0].detail
    good = compare_stage(model, backend.specs[st.HEAD_STEP], ort_runner(backend, st.HEAD_STEP))
    assert good.passed
    other = fixture_dir("tiny_1x")
    rc = main(
        [
            "check",
            "--export-dir",
            str(export),
            "--model",
            str(d / "config.json"),
            "--checkpoint",
            str(other / "checkpoint.pt"),
            "--stages",
            "decoder",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "bitdance-rt: error:" in err  # an export of other weights is refused, not compared


def test_end_to_end_disagreement_fails(tiny, capsys, tmp_path):
    """Same noise, other head weights in the reference -> the tokens disagree and the check fails."""
    d, _, export = tiny
    from bitdance_rt.check import end_to_end
    from bitdance_rt.runtime.torch_backend import TorchBackend

    bad = copy.deepcopy(tiny[1])
    with torch.no_grad():
        for p in bad.head.parameters():
            p.mul_(-1.0)
    backend = OrtBackend(export, threads=1)
    e = end_to_end(TorchBackend(bad), backend, [3, 7], S, 3.0, "linear", d / "sample.safetensors", 1.0)
    assert not e["passed"] and e["agreement"] < 1.0 and e["identical_images"] < 2
    e = end_to_end(TorchBackend(tiny[1]), backend, [3, 7], S, 3.0, "linear", d / "sample.safetensors", 1.0)
    assert e["passed"] and e["agreement"] == 1.0 and e["identical_images"] == 2


def test_backbone_is_checked_in_both_phases(tiny):
    """The prefill phase runs the prefix embeddings (prefix_len positions) at start 0, the step phase
    P positions at step positions: both through the one backbone graph, both must agree; a
    perturbed backbone weight fails both."""
    from bitdance_rt.check import example_feed

    _, model, export = tiny
    backend = OrtBackend(export, threads=1)
    spec = backend.specs[st.BACKBONE]
    cfg = model.cfg
    prefill, step = example_feed(model, spec, 2, 0, "prefill"), example_feed(model, spec, 2, 0, "step")
    assert prefill["x"].shape == (4, cfg.prefix_len, cfg.dim) and not prefill["start"].any()
    assert step["x"].shape == (4, cfg.parallel_num, cfg.dim) and (step["start"] >= cfg.prefix_len).all()
    with pytest.raises(Exception, match="no phase 'decode'"):
        example_feed(model, spec, 2, 0, "decode")
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.layers[0].attention.wqkv.weight.add_(0.05)
    for phase in spec.profile_phases:
        good = compare_stage(model, spec, ort_runner(backend, st.BACKBONE, phase), phase=phase)
        assert good.passed and good.label == f"backbone ({phase})", good
        assert {o.name for o in good.outputs} == {"cond", "kv_new"}
        assert not compare_stage(bad, spec, ort_runner(backend, st.BACKBONE, phase), phase=phase).passed


def _iteration(name, **outputs):
    return IterationResult(
        OrderedDict((k, np.asarray(v, dtype=np.float32)) for k, v in outputs.items()), runner_name=name
    )


def test_per_output_tolerances_and_code_agreement():
    ref = _iteration("ref", cond=np.zeros(100), tokens=np.ones(100))
    near = _iteration("c", cond=np.full(100, 1e-3), tokens=np.r_[np.ones(99), -np.ones(1)])
    fp32 = make_compare_func("fp32", ["cond", "tokens"])(ref, near)
    fp16 = make_compare_func("fp16", ["cond", "tokens"])(ref, near)
    assert not bool(fp32["cond"]) and bool(fp16["cond"])  # 1e-3 is outside fp32's 1e-4, inside fp16's 5e-2
    assert isinstance(fp32["tokens"], Agreement) and fp32["tokens"].value == pytest.approx(0.99)
    assert not bool(fp32["tokens"]) and bool(fp16["tokens"])  # fp32 wants identical codes, fp16 >= 0.98
    assert bool(make_compare_func("fp32", ["cond", "tokens"], min_agreement=0.99)(ref, near)["tokens"])
    atol, rtol = tolerances("int8", ["cond", "latent"])
    assert atol == {"": 0.2, "cond": 0.2, "latent": 2.0} and rtol[""] == 0.2
    assert not Agreement(np.ones(3), np.ones(4), 0.0)  # shape mismatch never passes

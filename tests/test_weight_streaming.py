"""TensorRT weight streaming in the plan (plan/memory.streaming) and the options around it: the budget's
bytes of the backbone stay on the GPU, the rest is counted in host memory, and the figures are the
plan's own weights rearranged (the engine side: test_engines_build, test_trt_api_fakes)."""

from __future__ import annotations

import pytest

from bitdance_rt import stages as st
from bitdance_rt.errors import BitDanceError
from bitdance_rt.plan import plan, stage_weights
from bitdance_rt.t2i_config import t2i_preset

GIB = 1 << 30


@pytest.fixture(scope="module")
def int4_14b():
    cfg = t2i_preset("BitDance-14B-64x")
    backbone = stage_weights(cfg, "int4", int4_format="qdq", stages=(st.BACKBONE,))[st.BACKBONE]
    sizes = [b for _, b in backbone.values()]
    return cfg, plan(cfg, "int4", "tensorrt"), sum(sizes), max(sizes)


def test_streaming_keeps_the_budget_on_the_gpu(int4_14b):
    """With a budget, the GPU holds the budget of the backbone plus a scratch of two of its largest matrices,
    instead of all of it; the host holds the whole backbone; on a Jetson (one memory) that costs more than
    it saves; a budget above the backbone streams nothing."""
    cfg, base, held, largest = int4_14b
    budget = int(1.3 * GIB)
    p = plan(cfg, "int4", "tensorrt", weight_streaming_budget=budget)
    assert p.streamed_bytes == held - budget and p.host_weight_bytes == held
    assert p.total_bytes == base.total_bytes - (held - budget) + 2 * largest
    assert p.fits("orin-nx-16gb")[1] < base.fits("orin-nx-16gb")[1]
    assert any(f"each of its {cfg.ar_steps} calls an image" in n for n in p.notes)
    everything = plan(cfg, "int4", "tensorrt", weight_streaming_budget=100 * GIB)
    assert everything.streamed_bytes == 0 and everything.total_bytes == base.total_bytes


def test_the_14b_at_int4_on_16_and_24_gb(int4_14b):
    """The issue's bar, as the plan counts it: BitDance-14B-64x at 1024 px, INT4 on TensorRT, leaves >= 4 GiB
    on a 24 GB GPU as it is, and on a 16 GB GPU only with the backbone partly streamed (docs/memory.md)."""
    cfg, base, _, _ = int4_14b
    assert base.fits("gpu-24gb")[1] >= 4 * GIB and not base.fits("gpu-16gb")[0]
    assert plan(cfg, "int4", "tensorrt", weight_streaming_budget=int(1.3 * GIB)).fits("gpu-16gb")[1] >= 4 * GIB


def test_streaming_is_tensorrts(capsys):
    from bitdance_rt.backends import BackendOptions
    from bitdance_rt.cli import main

    cfg = t2i_preset("BitDance-14B-64x")
    with pytest.raises(BitDanceError, match="weight streaming is TensorRT's"):
        plan(cfg, "int4", "onnxruntime", weight_streaming_budget=GIB)
    with pytest.raises(BitDanceError, match=">= 0 bytes"):
        plan(cfg, "int4", "tensorrt", weight_streaming_budget=-1)
    with pytest.raises(BitDanceError, match="use backend tensorrt"):
        BackendOptions(backend="onnxruntime", weight_streaming_budget=GIB)
    with pytest.raises(BitDanceError, match="bytes >= 0"):
        BackendOptions(backend="tensorrt", weight_streaming_budget="4GB")
    args = ["plan", "--model", "BitDance-14B-64x", "--precision", "int4", "--target", "gpu-16gb"]
    assert main(args + ["--weight-streaming-budget", "1.3GB"]) == 0
    out = capsys.readouterr().out
    assert "weight streaming: the backbone keeps 1.30 GiB" in out and "fits          a 16 GB GPU" in out
    assert main(args + ["--weight-streaming-budget", "lots"]) == 2
    assert "memory size 'lots'" in capsys.readouterr().err

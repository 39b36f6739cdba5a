"""Calibration capture: recording changes nothing, samples fit the contract and reproduce the
reference outputs, sets round-trip on disk and refuse other models, and ONNX graphs take the feeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bitdance_rt import stages as st
from bitdance_rt.runtime.core import row_bucket
from bitdance_rt.calibration import (CAPTURED_STAGES, MANIFEST, CapturePolicy, StageDataReader, capture, feed,
                                     load_calibration, save_calibration)
from bitdance_rt.config import EMBEDDED_WEIGHTS
from bitdance_rt.errors import BitDanceError
from bitdance_rt.export import checkpoint_source
from bitdance_rt.loading import load_model
from bitdance_rt.runtime import generate_batched
from bitdance_rt.runtime.torch_backend import TorchBackend
from bitdance_rt.sampling import SeededNoise, sample_tokens

from conftest import fixture_dir, torch_threads

S = 6
RUN = {"tiny_4x": dict(labels=[3, 7, 1], seeds=[2025, 1], steps=S, cfg_scale=3.0, batch_size=2),
       "embedded": dict(labels=list(range(10)), seeds=[0], steps=S, cfg_scale=4.0, batch_size=4)}


class Captured:
    def __init__(self, name: str):
        if name == "embedded":
            self.model, self.weights = load_model().model, checkpoint_source(EMBEDDED_WEIGHTS)
        else:
            d = fixture_dir(name)
            self.model = load_model(f"{d}/config.json", f"{d}/checkpoint.pt").model
            self.weights = checkpoint_source(d / "checkpoint.pt")
        self.cfg, self.run = self.model.cfg, RUN[name]
        self.capture = capture(self.model, self.weights, **self.run, policy=CapturePolicy(head_fraction=0.5, seed=3))
        self.set = self.capture.dataset


@pytest.fixture(scope="module", params=["tiny_4x", "embedded"])
def cap(request):
    with torch_threads(1):
        yield Captured(request.param)


@pytest.fixture(scope="module")
def tiny():
    with torch_threads(1):
        yield Captured("tiny_4x")


def _unrecorded(c: Captured, seed: int):
    r = c.run
    return generate_batched(TorchBackend(c.model), r["labels"], r["steps"], r["cfg_scale"], "linear",
                            SeededNoise(seed), batch_size=r["batch_size"])


# ---- capture ---------------------------------------------------------------------------------
def test_recording_does_not_change_generation(cap):
    for seed, recorded in zip(cap.run["seeds"], cap.capture.results):
        plain = _unrecorded(cap, seed)
        assert torch.equal(recorded.tokens, plain.tokens)
        assert torch.equal(recorded.image, plain.image)


def test_every_stage_recorded_and_fits_contract(cap):
    specs = st.stage_specs(cap.cfg, CAPTURED_STAGES, S)
    for stage in CAPTURED_STAGES:
        samples = cap.set.samples[stage]
        assert samples, f"no {stage} samples"
        for s in samples:
            f = feed(cap.cfg, stage, s)
            assert sorted(f) == sorted(specs[stage].input_names)
            known: dict = {}
            for name in specs[stage].input_names:
                known = specs[stage].match(name, f[name].shape, str(f[name].dtype), known)
    batches = -(-len(cap.run["labels"]) // cap.run["batch_size"]) * len(cap.run["seeds"])
    assert len(cap.set.samples[st.PREFILL]) == batches
    assert len(cap.set.samples[st.BACKBONE_STEP]) == batches * (cap.cfg.ar_steps - 1)
    times = {round(float(s.inputs["t"][0]), 4) for s in cap.set.samples[st.HEAD_STEP]}
    assert len(times) > S // 2, "head samples should span the sampler's times"


def test_backbone_samples_reproduce_reference(cap):
    cfg = cap.cfg
    for s in cap.set.samples[st.BACKBONE_STEP]:
        f = feed(cfg, st.BACKBONE_STEP, s)
        assert len(set(f["start"].tolist())) == 1  # one request alone: every row at the same step
        start = int(f["start"][0])
        kv = torch.stack([torch.stack([torch.from_numpy(f[f"cache.{i}.key"]), torch.from_numpy(f[f"cache.{i}.value"])])
                          for i in range(cfg.n_layer)])
        assert not kv[:, :, :, :, start:].any(), "positions past start are empty, as in the runtime's cache"
        step = (start - cfg.prefix_len) // cfg.parallel_num + 1
        with torch.inference_mode():
            cond, new = cap.model.step(torch.from_numpy(f["tokens"]), step, kv)  # full masked cache, as graphs read it
        torch.testing.assert_close(cond, s.outputs["cond"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(new, s.outputs["kv_new"], atol=1e-5, rtol=1e-5)


def test_head_samples_reproduce_reference(cap):
    with torch.inference_mode():
        for s in cap.set.samples[st.HEAD_STEP]:
            # the runtime evaluated these rows in a call padded to its row bucket (torch's GEMM rounds
            # some small products differently): evaluate them the same way
            m = s.inputs["x"].shape[0]
            pad = lambda x: torch.cat([x, x[:1].expand(row_bucket(m, None) - m, *x.shape[1:])])  # noqa: E731
            out = cap.model.head_net(pad(s.inputs["x"]), pad(s.inputs["t"]), pad(s.inputs["cond"]))[:m]
            assert torch.equal(out, s.outputs["x_pred"])
        kinds = set()
        for s in cap.set.samples[st.HEAD_SAMPLER]:
            rows = s.inputs["cond"].shape[0]
            guided = not torch.equal(s.inputs["cond_row"], torch.arange(rows))  # rows paired with their twins
            kinds.add(guided)
            noise = s.inputs["noise"][:, : rows // 2] if guided else s.inputs["noise"]
            got = sample_tokens(cap.model.head_net, s.inputs["cond"], noise, float(s.inputs["cfg"][0]), guided,
                                cap.cfg.time_shift)  # the official batch sampler, from the recorded inputs
            assert torch.equal(got, s.outputs["tokens"])
        assert kinds == {False, True}  # step 0 (linear schedule) unguided, later steps guided


def test_policy_bounds_and_is_deterministic(tiny):
    run = dict(tiny.run, seeds=[5])
    policy = CapturePolicy(backbone_every=2, head_fraction=0.3, max_samples=4, seed=11)
    a = capture(tiny.model, tiny.weights, **run, policy=policy).dataset
    b = capture(tiny.model, tiny.weights, **run, policy=policy).dataset
    assert all(len(v) <= 4 for v in a.samples.values())
    assert {int(s.inputs["start"][0]) for s in a.samples[st.BACKBONE_STEP]} <= {st.step_start(tiny.cfg, i)
                                                                           for i in range(1, tiny.cfg.ar_steps, 2)}
    assert a.candidates[st.HEAD_STEP] > 4  # reservoir sampling had to choose
    for stage in CAPTURED_STAGES:
        assert [float(s.inputs[next(iter(s.inputs))].sum()) for s in a.samples[stage]] == \
               [float(s.inputs[next(iter(s.inputs))].sum()) for s in b.samples[stage]]
    with pytest.raises(BitDanceError, match="head_fraction"):
        CapturePolicy(head_fraction=0.0)


# ---- on disk ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    return save_calibration(tiny.set, tmp_path_factory.mktemp("calib") / "tiny")


def test_round_trip(tiny, saved):
    back = load_calibration(saved, config=tiny.cfg, weights=tiny.weights, steps=S)
    assert back.key == tiny.set.key
    for stage in CAPTURED_STAGES:
        assert len(back.samples[stage]) == len(tiny.set.samples[stage])
        for a, b in zip(back.samples[stage], tiny.set.samples[stage]):
            for part in ("inputs", "outputs"):
                x, y = getattr(a, part), getattr(b, part)
                assert sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)
    assert sorted(p.name for p in saved.parent.iterdir()) == ["tiny"], "no temporary directories left behind"
    with pytest.raises(BitDanceError, match="exists"):
        save_calibration(tiny.set, saved)


def test_other_model_weights_or_steps_refused(tiny, saved):
    other = load_model().model.cfg
    with pytest.raises(BitDanceError, match="another model config") as err:
        load_calibration(saved, config=other)
    assert "\n" not in str(err.value) and "dim" in str(err.value)
    with pytest.raises(BitDanceError, match="captured with weights"):
        load_calibration(saved, weights=checkpoint_source(EMBEDDED_WEIGHTS))
    with pytest.raises(BitDanceError, match="sampler steps"):
        load_calibration(saved, steps=S + 1)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_damaged_sets_give_clear_errors(saved, tmp_path):
    d = _copy(saved, tmp_path / "missing")
    (d / f"{st.HEAD_STEP}.safetensors").unlink()
    with pytest.raises(BitDanceError, match="missing from the calibration set"):
        load_calibration(d)
    d = _copy(saved, tmp_path / "flipped")
    path = d / f"{st.DECODER}.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BitDanceError, match="sha256"):
        load_calibration(d)
    path.write_bytes(b"not a safetensors file".ljust(len(data), b"\0"))
    with pytest.raises(BitDanceError, match="unreadable"):
        load_calibration(d, hashes=False)
    path.write_bytes(bytes(data[:100]))
    with pytest.raises(BitDanceError, match="truncated"):
        load_calibration(d)
    d = _copy(saved, tmp_path / "nomanifest")
    (d / MANIFEST).unlink()
    with pytest.raises(BitDanceError, match="is not a complete calibration set"):
        load_calibration(d)
    with pytest.raises(BitDanceError, match="not found"):
        load_calibration(tmp_path / "nothing")


# ---- ONNX ------------------------------------------------------------------------------------
def test_reader_feeds_run_in_exported_graphs(tiny, saved, tmp_path_factory):
    ort = pytest.importorskip("onnxruntime")
    from bitdance_rt.export import export_stages

    cset = load_calibration(saved, config=tiny.cfg, weights=tiny.weights, steps=S)
    with torch_threads(1):
        out = export_stages(tiny.model, tmp_path_factory.mktemp("onnx"), tiny.weights, stages=CAPTURED_STAGES,
                            sampler_steps=S, progress=False).directory
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    for stage in CAPTURED_STAGES:
        session = ort.InferenceSession(str(Path(out) / f"{stage}.onnx"), opts, providers=["CPUExecutionProvider"])
        reader = StageDataReader(cset, stage, per_row=False)
        assert [i.name for i in session.get_inputs()] == st.stage_spec(stage, tiny.cfg, S).input_names
        for n in range(min(3, len(reader))):
            got = session.run(None, reader.get_next())
            want = cset.samples[stage][n].outputs
            for name, value in zip(st.stage_spec(stage, tiny.cfg, S).output_names, got):
                np.testing.assert_allclose(value, want[name].numpy(), atol=1e-4, rtol=1e-4, err_msg=f"{stage}.{name}")
        reader.rewind()
        assert sum(1 for _ in iter(reader.get_next, None)) == len(cset.samples[stage])
        if stage in st.SAMPLER_STAGES:
            continue
        # per-row feeds (what the histogram calibrators need): same outputs, row by row
        rows = cset.reader(stage)
        first = cset.samples[stage][0]
        n_rows = next(iter(first.inputs.values())).shape[0] if stage != st.BACKBONE_STEP else first.inputs["tokens"].shape[0]
        name = st.stage_spec(stage, tiny.cfg, S).output_names[0]
        for r in range(n_rows):
            got = session.run([name], rows.get_next())[0]
            np.testing.assert_allclose(got[0], first.outputs[name][r].numpy(), atol=1e-4, rtol=1e-4,
                                       err_msg=f"{stage} row {r}")


def test_reader_drives_onnxruntime_quantization(tiny, saved, tmp_path):
    """The reader is a CalibrationDataReader quantize_static accepts; the QDQ graph still runs."""
    ort = pytest.importorskip("onnxruntime")
    quant = pytest.importorskip("onnxruntime.quantization")
    from bitdance_rt.export import export_stages

    cset = load_calibration(saved)
    with torch_threads(1):
        out = export_stages(tiny.model, tmp_path / "onnx", tiny.weights, stages=[st.HEAD_STEP], sampler_steps=S,
                            progress=False).directory
    qdq = tmp_path / "head_step.qdq.onnx"
    reader = cset.reader(st.HEAD_STEP)
    assert isinstance(reader, quant.CalibrationDataReader)
    quant.quantize_static(str(Path(out) / "head_step.onnx"), str(qdq), reader, quant_format=quant.QuantFormat.QDQ)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(qdq), opts, providers=["CPUExecutionProvider"])
    sample = cset.samples[st.HEAD_STEP][0]
    got = session.run(None, feed(tiny.cfg, st.HEAD_STEP, sample))[0]
    assert got.shape == tuple(sample.outputs["x_pred"].shape) and np.isfinite(got).all()

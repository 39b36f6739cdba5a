"""Calibration capture: recording changes nothing, samples fit the contract and reproduce the
reference outputs, sets round-trip on disk and refuse other models, and ONNX graphs take the feeds."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bitdance_rt import stages as st
from bitdance_rt.runtime.core import row_bucket
from bitdance_rt.calibration import (
    CAPTURED_STAGES,
    MANIFEST,
    CapturePolicy,
    StageDataReader,
    capture,
    feed,
    load_calibration,
    save_calibration,
)
from bitdance_rt.calibration.dataset import sample_phase
from bitdance_rt.config import EMBEDDED_WEIGHTS
from bitdance_rt.errors import BitDanceError
from bitdance_rt.export import checkpoint_source
from bitdance_rt.loading import load_model
from bitdance_rt.runtime import generate_batched
from bitdance_rt.runtime.torch_backend import TorchBackend
from bitdance_rt.sampling import SeededNoise, sample_tokens

from conftest import FIXTURE_STEPS, fixture_dir, torch_threads

S = 6
RUN = {
    "tiny_4x": dict(labels=[3, 7, 1], seeds=[2025, 1], steps=S, cfg_scale=3.0, batch_size=2),
    "embedded": dict(labels=list(range(10)), seeds=[0], steps=S, cfg_scale=4.0, batch_size=4),
}


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
    return generate_batched(
        TorchBackend(c.model),
        r["labels"],
        r["steps"],
        r["cfg_scale"],
        "linear",
        SeededNoise(seed),
        batch_size=r["batch_size"],
    )


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
            if stage == st.BACKBONE:  # a prefill sample has the prefill's sizes, a step sample a step's
                assert (
                    specs[stage].phase_of(known) == sample_phase(stage, s) or cap.cfg.prefix_len == cap.cfg.parallel_num
                )
    batches = -(-len(cap.run["labels"]) // cap.run["batch_size"]) * len(cap.run["seeds"])
    steps = batches * (cap.cfg.ar_steps - 1)
    # the backbone: every prefill and every AR step, prefill samples first; token_embed: every AR step
    phases = [sample_phase(st.BACKBONE, s) for s in cap.set.samples[st.BACKBONE]]
    assert phases == ["prefill"] * batches + ["step"] * steps
    assert cap.set.phase_counts(st.BACKBONE) == {"prefill": batches, "step": steps}
    assert len(cap.set.samples[st.TOKEN_EMBED]) == steps
    assert st.PREFIX_EMBED not in cap.set.samples  # a table lookup: nothing to calibrate
    prefill = cap.set.phase_samples(st.BACKBONE, "prefill")
    assert all(s.inputs["x"].shape[1] == cap.cfg.prefix_len and not s.inputs["start"].any() for s in prefill)
    assert all(s.inputs["cache"].shape[4] == 0 for s in prefill), "a prefill reads nothing cached: none stored"
    times = {round(float(s.inputs["t"][0]), 4) for s in cap.set.samples[st.HEAD_STEP]}
    assert len(times) > S // 2, "head samples should span the sampler's times"


def _labels_of(cap, batch: list[int]) -> list[int]:
    return batch + [cap.cfg.num_classes] * len(batch)  # conditional rows, then the null class (CFG)


def test_backbone_samples_hold_what_the_backbone_got_and_reproduce_it(cap):
    """x of a prefill sample is the prefix embedding of the batch's rows; x of a step sample is the
    output of that step's token_embed sample; the backbone on the recorded feeds (the full masked
    cache, as the graphs read it) gives the recorded outputs, for both phases."""
    from bitdance_rt.export.wrappers import stage_module

    cfg, run = cap.cfg, cap.run
    size = run["batch_size"]
    batches = [run["labels"][i : i + size] for i in range(0, len(run["labels"]), size)] * len(run["seeds"])
    backbone = stage_module(st.BACKBONE, cap.model)
    names = st.stage_spec(st.BACKBONE, cfg).input_names
    with torch.inference_mode():
        for s, batch in zip(cap.set.phase_samples(st.BACKBONE, "prefill"), batches):
            want = cap.model.prefix_embed(torch.tensor(_labels_of(cap, batch)))
            torch.testing.assert_close(s.inputs["x"], want, atol=0, rtol=0)
        steps = cap.set.phase_samples(st.BACKBONE, "step")
        for s, t in zip(steps, cap.set.samples[st.TOKEN_EMBED], strict=True):
            assert torch.equal(s.inputs["x"], t.outputs["x"])  # the very x the call got
            torch.testing.assert_close(cap.model.token_embed(t.inputs["tokens"]), t.outputs["x"], atol=1e-5, rtol=1e-5)
        for s in cap.set.samples[st.BACKBONE]:
            f = feed(cfg, st.BACKBONE, s)
            assert len(set(f["start"].tolist())) == 1  # one request alone: every row at the same step
            start = int(f["start"][0])
            kv = np.stack([np.stack([f[f"cache.{i}.key"], f[f"cache.{i}.value"]]) for i in range(cfg.n_layer)])
            assert not kv[:, :, :, :, start:].any(), "positions past start are empty, as in the runtime's cache"
            cond, new = backbone(*(torch.from_numpy(f[n]) for n in names))
            torch.testing.assert_close(cond, s.outputs["cond"], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(new, s.outputs["kv_new"], atol=1e-5, rtol=1e-5)
            assert new.shape[4] == (cfg.prefix_len if start == 0 else cfg.parallel_num)


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
            got = sample_tokens(
                cap.model.head_net, s.inputs["cond"], noise, float(s.inputs["cfg"][0]), guided, cap.cfg.time_shift
            )  # the official batch sampler, from the recorded inputs
            assert torch.equal(got, s.outputs["tokens"])
        assert kinds == {False, True}  # step 0 (linear schedule) unguided, later steps guided


def test_policy_bounds_and_is_deterministic(tiny):
    run = dict(tiny.run, seeds=[5])
    policy = CapturePolicy(backbone_every=2, head_fraction=0.3, max_samples=3, seed=11)
    a = capture(tiny.model, tiny.weights, **run, policy=policy).dataset
    b = capture(tiny.model, tiny.weights, **run, policy=policy).dataset
    assert all(len(v) <= 3 for k, v in a.samples.items() if k != st.BACKBONE)
    # 3 labels in batches of 2: 2 prefills, and AR steps 1 and 3 of each batch (backbone_every=2) kept as
    # candidates; one reservoir per backbone phase, so the steps never crowd the prefills out
    kept = {st.step_start(tiny.cfg, i) for i in range(1, tiny.cfg.ar_steps, 2)}
    assert a.phase_candidates[st.BACKBONE] == {"prefill": 2, "step": 2 * len(kept)}
    assert a.phase_counts(st.BACKBONE) == {"prefill": 2, "step": 3}
    assert {int(s.inputs["start"][0]) for s in a.phase_samples(st.BACKBONE, "step")} <= kept
    assert a.candidates[st.TOKEN_EMBED] == a.phase_candidates[st.BACKBONE]["step"]  # the same thinned steps
    assert a.candidates[st.HEAD_STEP] > 3  # reservoir sampling had to choose
    for stage in CAPTURED_STAGES:
        assert [float(s.inputs[next(iter(s.inputs))].sum()) for s in a.samples[stage]] == [
            float(s.inputs[next(iter(s.inputs))].sum()) for s in b.samples[stage]
        ]
    with pytest.raises(BitDanceError, match="head_fraction"):
        CapturePolicy(head_fraction=0.0)


# ---- on disk ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    return save_calibration(tiny.set, tmp_path_factory.mktemp("calib") / "tiny")


def test_round_trip(tiny, saved):
    back = load_calibration(saved, config=tiny.cfg, weights=tiny.weights, steps=S)
    assert back.key == tiny.set.key
    assert back.phase_candidates == tiny.set.phase_candidates and back.candidates == tiny.set.candidates
    summary = __import__("json").loads((saved / MANIFEST).read_text())["stages"][st.BACKBONE]
    assert summary["phases"] == {
        p: {"samples": n, "candidates": tiny.set.phase_candidates[st.BACKBONE][p]}
        for p, n in tiny.set.phase_counts(st.BACKBONE).items()
    }
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


def test_damaged_sets_give_clear_errors(saved, tmp_path):
    d = shutil.copytree(saved, tmp_path / "missing")
    (d / f"{st.HEAD_STEP}.safetensors").unlink()
    with pytest.raises(BitDanceError, match="missing from the calibration set"):
        load_calibration(d)
    d = shutil.copytree(saved, tmp_path / "flipped")
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
    d = shutil.copytree(saved, tmp_path / "nomanifest")
    (d / MANIFEST).unlink()
    with pytest.raises(BitDanceError, match="is not a complete calibration set"):
        load_calibration(d)
    with pytest.raises(BitDanceError, match="not found"):
        load_calibration(tmp_path / "nothing")


# ---- ONNX ------------------------------------------------------------------------------------
def test_reader_feeds_run_in_exported_graphs(tiny, saved, fixture_exports):
    """The graphs: the session's export of tiny_4x at S steps, every stage (conftest fixture_exports),
    read only."""
    ort = pytest.importorskip("onnxruntime")

    cset = load_calibration(saved, config=tiny.cfg, weights=tiny.weights, steps=S)
    assert S == FIXTURE_STEPS
    exported = fixture_exports("tiny_4x")
    key = exported.manifest["key"]
    assert key["checkpoint"] == tiny.weights and set(CAPTURED_STAGES) <= set(key["stages"])
    out = exported.directory
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
        # per-row feeds (what the histogram calibrators need): same outputs, row by row, in each phase
        spec = st.stage_spec(stage, tiny.cfg, S)
        for phase in spec.phases or [None]:
            rows = cset.reader(stage, phase)
            first = cset.phase_samples(stage, phase)[0]
            n_rows = feed(tiny.cfg, stage, first)[spec.input_names[0]].shape[0]
            name = spec.output_names[0]
            for r in range(n_rows):
                got = session.run([name], rows.get_next())[0]
                np.testing.assert_allclose(
                    got[0], first.outputs[name][r].numpy(), atol=1e-4, rtol=1e-4, err_msg=f"{stage} {phase} row {r}"
                )


def test_reader_drives_onnxruntime_quantization(tiny, saved, tmp_path):
    """The reader is a CalibrationDataReader quantize_static accepts; the QDQ graph still runs."""
    ort = pytest.importorskip("onnxruntime")
    quant = pytest.importorskip("onnxruntime.quantization")
    from bitdance_rt.export import export_stages

    cset = load_calibration(saved)
    with torch_threads(1):
        out = export_stages(
            tiny.model, tmp_path / "onnx", tiny.weights, stages=[st.HEAD_STEP], sampler_steps=S, progress=False
        ).directory
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


def test_backbone_is_calibrated_on_both_phases(tiny, saved, tmp_path):
    """One backbone graph serves the prefill and the steps, so its activation ranges come from both:
    the reader gives one group per phase (one shape each, which ONNX Runtime's histogram
    calibrators need), MinMax ranges over both are each phase's merged, and the histogram methods
    calibrate over both phases."""
    pytest.importorskip("onnxruntime.quantization")
    from onnxruntime.quantization.calibrate import load_tensors_data

    from bitdance_rt.export import export_stages
    from bitdance_rt.precision.int8 import activation_ranges

    cfg, cset = tiny.cfg, load_calibration(saved)
    with torch_threads(1):
        out = export_stages(
            tiny.model, tmp_path / "onnx", tiny.weights, stages=[st.BACKBONE], sampler_steps=S, progress=False
        ).directory
    graph = Path(out) / f"{st.BACKBONE}.onnx"
    reader = cset.reader(st.BACKBONE)
    groups = reader.groups()
    assert [g.phase for g in groups] == ["prefill", "step"]
    for g, seq in zip(groups, (cfg.prefix_len, cfg.parallel_num)):
        assert {tuple(f["x"].shape) for f in iter(g.get_next, None)} == {(1, seq, cfg.dim)}
    assert [len(g) for g in groups] == [cset.phase_counts(st.BACKBONE)[p] for p in ("prefill", "step")]
    assert sum(len(g) for g in groups) == len(reader) == len(cset.samples[st.BACKBONE])
    assert cset.reader(st.HEAD_STEP).groups()[0].phase is None  # a stage without phases: one group

    def ranges(r, method):
        path = tmp_path / f"{method}-{r.phase}.json"
        activation_ranges(graph, r, method, path)
        return {k: float(np.max(v.range_value[1])) for k, v in load_tensors_data(path).items()}

    both, prefill, step = (ranges(r, "max") for r in (reader, *groups))
    assert both.keys() == prefill.keys() == step.keys() and both
    for k in both:
        assert both[k] == pytest.approx(max(prefill[k], step[k]), rel=1e-6), k
    # the phases' activations differ both ways: ranges from one phase would clip the other somewhere
    assert any(prefill[k] > 1.05 * step[k] for k in both) and any(step[k] > 1.05 * prefill[k] for k in both)
    pct_both, pct_step = ranges(reader, "percentile"), ranges(groups[1], "percentile")
    assert pct_both.keys() == both.keys()
    assert any(not np.isclose(pct_both[k], pct_step[k]) for k in both), "the prefill phase changed no range"


def test_text_to_image_capture_records_both_phases_with_padding(tmp_path):
    """Text-to-image: token_embed takes the tokens only; the backbone's prefill and step samples
    both carry each row's prompt padding (the keys they hide), and reproduce the reference."""
    from t2i_tiny import write_checkpoint

    from bitdance_rt.export.wrappers import stage_module
    from bitdance_rt.t2i.loading import load_t2i

    with torch_threads(1):
        loaded = load_t2i(write_checkpoint(tmp_path / "t2i", parallel_num=64), 512, 512, max_text_tokens=48)
        model, cfg = loaded.model, loaded.model.cfg
        prompts = loaded.prompts.encode(["a red cat", "a blue dog on a long walk"])
        result = capture(model, loaded.source, None, [0], 2, 3.0, prompts=prompts, batch_size=2)
    cset = result.dataset
    cset.check_contract()
    pads = torch.cat([prompts.pad, torch.full((2,), prompts.uncond_pad)])  # conditional rows, then CFG's
    assert len(set(pads.tolist())) > 1, "rows with different padding"
    counts = cset.phase_counts(st.BACKBONE)
    assert counts == {"prefill": 1, "step": cfg.ar_steps - 1}
    assert sorted(cset.samples[st.TOKEN_EMBED][0].inputs) == ["tokens"]
    backbone = stage_module(st.BACKBONE, model)
    names = st.stage_spec(st.BACKBONE, cfg).input_names
    assert "pad" in names
    with torch.inference_mode():
        prefill = cset.phase_samples(st.BACKBONE, "prefill")[0]
        assert torch.equal(prefill.inputs["x"], model.prefix_embed(prompts.rows(True)["ids"]))
        for s, t in zip(cset.phase_samples(st.BACKBONE, "step"), cset.samples[st.TOKEN_EMBED], strict=True):
            assert torch.equal(s.inputs["x"], t.outputs["x"])
        for s in (prefill, *cset.phase_samples(st.BACKBONE, "step")[:3]):
            assert torch.equal(s.inputs["pad"], pads)
            f = feed(cfg, st.BACKBONE, s)
            cond, new = backbone(*(torch.from_numpy(f[n]) for n in names))
            torch.testing.assert_close(cond, s.outputs["cond"], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(new, s.outputs["kv_new"], atol=1e-5, rtol=1e-5)

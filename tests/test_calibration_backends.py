"""Calibration captured from any stage backend: ONNX Runtime on the FP32 export records what the
torch reference records (same seeds: same inputs per stage to float32 rounding, same tokens), a
capture from the FP16 graphs is marked fp16, the set's key and the cached default set follow what
produced them, and INT8 graphs derived from an ONNX Runtime capture generate."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from bitdance_rt import stages as st
from bitdance_rt.backends import BackendOptions, auto_export, resolve_model
from bitdance_rt.calibration import (
    CapturePolicy,
    RecordingBackend,
    capture,
    capture_choice,
    load_calibration,
    ort_capture_backend,
    save_calibration,
)
from bitdance_rt.calibration.producer import export_digest, producer_of
from bitdance_rt.errors import BitDanceError
from bitdance_rt.export.manifest import read_manifest
from bitdance_rt.precision.accuracy import accuracy_report
from bitdance_rt.precision.auto import calibration_for, default_calibration_dir, precision_export, variant_dir
from bitdance_rt.precision.report_files import markdown
from bitdance_rt.runtime import generate_batched
from bitdance_rt.runtime.ort_backend import OrtBackend
from bitdance_rt.runtime.timing import TimedBackend
from bitdance_rt.runtime.torch_backend import TorchBackend
from bitdance_rt.sampling import SeededNoise

from conftest import copy_cache, torch_threads

S = 4  # embedded model's sampler steps here
POLICY = CapturePolicy(head_fraction=0.5, seed=3)
QUIET = dict(progress=False)
# |a - b| / |b| (norm-wise) of every float input and output, per sample. Measured on an AVX2 EPYC
# (2026-12-05): at most ~5e-6 (head_step x, which iterates the head net); 5e-5 leaves ~10x for other
# CPUs' kernels (tests/conftest.py ORACLE_SAMPLER_REL), while a wrong capture is off by O(1).
REL = 5e-5


@pytest.fixture(scope="module")
def cache(embedded_cache_template_s4, tmp_path_factory):
    """A cache root of the module's own: the automatic exports are made once and shared. It starts as a
    copy of the session's (conftest) holding the embedded model's FP32 export at S steps."""
    root = copy_cache(embedded_cache_template_s4, tmp_path_factory.mktemp("cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BITDANCE_RT_CACHE", str(root))
        yield root


class Model:
    """A model, its FP32 export and the same run captured from torch and from ONNX Runtime FP32."""

    def __init__(self, source, steps: int, run: dict, export):
        self.source, self.steps, self.run = source, steps, run
        self.weights = source.weights_source()
        self.model = source.load()
        self.fp32 = export
        self.torch = capture(self.model, self.weights, **run, steps=steps, policy=POLICY)
        backend = ort_capture_backend(self.fp32, threads=1, expect_config=source.config, expect_source=self.weights)
        try:
            self.ort = capture(None, self.weights, **run, steps=steps, policy=POLICY, backend=backend)
            assert not backend.observers  # the recorder is detached
        finally:
            backend.close()


@pytest.fixture(scope="module")
def embedded(cache):
    source = resolve_model(None, None, None, None, None, None)  # Pipeline.from_pretrained()'s default model
    with torch_threads(1):
        fp32 = auto_export(source, S, BackendOptions(**QUIET), "fp32")
        yield Model(source, S, dict(labels=[0, 3, 7], seeds=[5], cfg_scale=4.0, batch_size=2), fp32)


@pytest.fixture(scope="module")
def t2i(cache, tmp_path_factory):
    from t2i_tiny import write_checkpoint

    from bitdance_rt.export import export_stages
    from bitdance_rt.stages import Limits

    root = tmp_path_factory.mktemp("t2i")
    source = resolve_model(None, str(write_checkpoint(root / "ckpt", parallel_num=64)), None, 512, 512, 48)
    with torch_threads(1):
        model = source.load()
        # what a capture runs (no fused head sampler: a capture samples with head_step)
        stages = [st.PREFIX_EMBED, st.TOKEN_EMBED, st.BACKBONE, st.HEAD_STEP, st.DECODER]
        export_stages(
            model,
            root / "fp32",
            source.weights_source(),
            stages=stages,
            sampler_steps=None,
            limits=Limits(1, 1),
            progress=False,
        )
        from bitdance_rt.t2i.prompt import PromptEncoder

        prompts = PromptEncoder(source.checkpoint + "/tokenizer.json", source.config).encode(["a red cat"])
        yield Model(
            source, 2, dict(labels=None, prompts=prompts, seeds=[0], cfg_scale=3.0, batch_size=1), root / "fp32"
        )


def _same_samples(a, b) -> None:
    assert a.samples.keys() == b.samples.keys()
    for stage, samples in a.samples.items():
        assert len(samples) == len(b.samples[stage]) > 0, stage
        for n, (x, y) in enumerate(zip(samples, b.samples[stage])):
            for part in ("inputs", "outputs"):
                want, got = getattr(x, part), getattr(y, part)
                assert want.keys() == got.keys(), (stage, n, part)
                for name, w in want.items():
                    g = got[name]
                    assert g.shape == w.shape and g.dtype == w.dtype, (stage, n, name)
                    if not w.dtype.is_floating_point or stage == st.HEAD_SAMPLER and name == "tokens":
                        assert torch.equal(g, w), (stage, n, name)  # rows, starts, pads, sampled tokens
                    elif w.numel():
                        err = float((g - w).norm()) / max(float(w.norm()), 1e-30)
                        assert err <= REL, f"{stage} sample {n} {part} {name}: relative error {err:.2e}"


@pytest.mark.parametrize("name", ["embedded", "t2i"])
def test_onnxruntime_fp32_capture_records_what_torch_records(name, request):
    m = request.getfixturevalue(name)
    a, b = m.torch.dataset, m.ort.dataset
    for x, y in zip(m.torch.results, m.ort.results, strict=True):
        assert torch.equal(x.tokens, y.tokens)
    _same_samples(a, b)
    assert a.candidates == b.candidates and a.phase_candidates == b.phase_candidates
    assert b.phase_counts(st.BACKBONE)["prefill"] >= 1 and b.phase_counts(st.BACKBONE)["step"] >= 1
    assert a.key["head_evaluations"] == b.key["head_evaluations"] > 0
    assert a.producer == {"backend": "torch", "precision": "fp32", "export_key": None}
    assert b.producer == {
        "backend": "onnxruntime",
        "precision": "fp32",
        "export_key": export_digest(read_manifest(m.fp32)),
    }
    assert {k: v for k, v in a.key.items() if k not in ("producer", "config")} == {
        k: v for k, v in b.key.items() if k not in ("producer", "config")
    }
    b.check_contract()


def test_onnxruntime_capture_changes_no_token(embedded):
    """Recording (step-by-step sampler, observers) gives the tokens of a plain ONNX Runtime run."""
    m = embedded
    plain = OrtBackend(m.fp32, threads=1)
    try:
        run = {k: v for k, v in m.run.items() if k not in ("seeds", "batch_size")}
        got = generate_batched(
            plain,
            run["labels"],
            S,
            run["cfg_scale"],
            None,
            SeededNoise(m.run["seeds"][0]),
            batch_size=m.run["batch_size"],
        )
    finally:
        plain.close()
    assert torch.equal(got.tokens, m.ort.results[0].tokens)


def test_fp16_capture_is_marked_fp16(t2i, tmp_path):
    m = t2i
    with torch_threads(1):
        fp16 = precision_export(m.fp32, "fp16", progress=False).directory
        backend = ort_capture_backend(fp16, threads=1, expect_config=m.source.config, expect_source=m.weights)
        try:
            result = capture(
                None,
                m.weights,
                **m.run,
                steps=m.steps,
                policy=POLICY,
                backend=backend,
                origin={"export_dir": str(fp16)},
            )
        finally:
            backend.close()
    out = save_calibration(result.dataset, tmp_path / "set")
    manifest = json.loads((out / "calibration.json").read_text())
    assert manifest["key"]["producer"] == {
        "backend": "onnxruntime",
        "precision": "fp16",
        "export_key": export_digest(read_manifest(fp16)),
    }
    assert manifest["capture"] == {"export_dir": str(fp16)}
    cset = load_calibration(out, config=m.source.config, weights=m.weights, steps=m.steps)
    assert cset.producer["precision"] == "fp16" and cset.origin["export_dir"] == str(fp16)
    assert cset.phase_counts(st.BACKBONE)["prefill"] == 1 and cset.samples[st.HEAD_STEP]
    # the FP16 trajectories: close to the FP32 ones at the start (same prompt ids, same first noise)
    first = cset.phase_samples(st.BACKBONE, "prefill")[0].inputs["x"]
    torch.testing.assert_close(
        first, m.ort.dataset.phase_samples(st.BACKBONE, "prefill")[0].inputs["x"], atol=1e-2, rtol=1e-2
    )
    assert torch.equal(result.results[0].tokens.abs(), torch.ones_like(result.results[0].tokens))


def test_fp16_capture_on_the_cpu_runs_lean_sessions(t2i):
    """On the CPU the FP16 capture's sessions hold the least (ort_backend.lean_options: no optimiser, no
    arena, priority order), and compute what the default sessions compute, within FP16 roundings; an
    FP32 capture keeps the default ones."""
    import onnxruntime as ort

    from bitdance_rt.calibration.dataset import feed
    from bitdance_rt.runtime.ort_backend import OrtBackend

    m = t2i
    fp16 = precision_export(m.fp32, "fp16", progress=False).directory
    lean = ort_capture_backend(fp16, threads=1, expect_config=m.source.config, expect_source=m.weights)
    plain = OrtBackend(fp16, threads=1, sampler="step")
    fp32 = ort_capture_backend(m.fp32, threads=1, expect_config=m.source.config, expect_source=m.weights)
    try:
        assert lean.lean and not fp32.lean and not plain.lean
        options = lean.sessions[st.BACKBONE].get_session_options()
        assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        assert options.execution_order == ort.ExecutionOrder.PRIORITY_BASED and not options.enable_cpu_mem_arena
        default = fp32.sessions[st.BACKBONE].get_session_options()
        assert default.graph_optimization_level != ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        for stage in (st.BACKBONE, st.HEAD_STEP):
            sample = m.ort.dataset.samples[stage][-1]
            inputs = feed(m.source.config, stage, sample)
            got = lean._get_session(stage).run(None, inputs)
            want = plain._get_session(stage).run(None, inputs)
            for a, b in zip(got, want):
                np.testing.assert_allclose(a, b, atol=2e-2, rtol=2e-2, err_msg=stage)
    finally:
        for backend in (lean, plain, fp32):
            backend.close()


def test_default_set_follows_the_capture_backend_and_int8_from_it_generates(embedded, caplog):
    """calibration_for: the default set of an onnxruntime fp16 capture has its own cached directory and
    key; it is reused while it fits that export, and INT8 graphs derived from it generate."""
    m = embedded
    cfg = m.source.config
    caplog.set_level(logging.INFO, logger="bitdance_rt")
    args = (cfg, m.weights, S, 4.0, "linear", lambda: pytest.fail("an onnxruntime capture loads no torch model"))
    with torch_threads(1):
        cset = calibration_for(
            *args,
            progress=False,
            fp32_export=m.fp32,
            capture_backend="onnxruntime",
            capture_precision="fp16",
            threads=1,
        )
        assert "capturing 10 images of tiny-digits with onnxruntime on the fp16 export" in caplog.text
        caplog.clear()
        fp16 = precision_export(m.fp32, "fp16", progress=False).directory
        assert cset.directory == default_calibration_dir(cfg, m.weights, S, "onnxruntime", "fp16")
        assert cset.directory.name.endswith("-onnxruntime-fp16") and cset.origin == {"export_dir": str(fp16)}
        assert cset.producer == {
            "backend": "onnxruntime",
            "precision": "fp16",
            "export_key": export_digest(read_manifest(fp16)),
        }
        again = calibration_for(
            *args, progress=False, fp32_export=m.fp32, capture_backend="onnxruntime", capture_precision="fp16"
        )
        assert "capturing" not in caplog.text and again.key == cset.key
        int8 = precision_export(m.fp32, "int8", cset, progress=False).directory
        # the INT8 variant's directory (and key) follow the set's producer
        assert int8 == variant_dir(m.fp32, "int8", cset) != variant_dir(m.fp32, "int8", m.torch.dataset)
        backend = OrtBackend(int8, threads=1)
        try:
            out = generate_batched(backend, [1, 2], S, 4.0, None, SeededNoise(0))
        finally:
            backend.close()
    assert torch.equal(out.tokens.abs(), torch.ones_like(out.tokens))
    assert out.image.shape[0] == 2 and bool(torch.isfinite(out.image).all())
    # the accuracy report (`calibrate --report`) says which model produced its calibration data
    with torch_threads(1):
        report = accuracy_report(
            cfg,
            m.weights,
            m.fp32,
            cset,
            "max",
            [1],
            [1000],
            S,
            4.0,
            "linear",
            lambda d: OrtBackend(d, threads=1),
            precisions=("int8",),
            progress=False,
        )
    assert report["exports"]["int8"] == str(int8)
    assert report["setup"]["calibration_producer"] == {**cset.producer, "export_dir": str(fp16)}
    assert f"captured with onnxruntime on the fp16 export {cset.producer['export_key'][:12]} ({fp16})" in markdown(
        report
    )


def test_cli_calibrate_from_the_fp16_export(embedded, tmp_path, capsys):
    from bitdance_rt.cli import main

    out = tmp_path / "set"
    with torch_threads(1):
        assert (
            main(
                [
                    "calibrate",
                    "--steps",
                    str(S),
                    "--labels",
                    "1",
                    "4",
                    "--out",
                    str(out),
                    "--capture-backend",
                    "onnxruntime",
                    "--capture-precision",
                    "fp16",
                    "--threads",
                    "1",
                ]
            )
            == 0
        )
    assert "captured with onnxruntime on the fp16 export" in capsys.readouterr().out
    fp16 = precision_export(embedded.fp32, "fp16", progress=False).directory  # (reused: the automatic variant)
    manifest = json.loads((out / "calibration.json").read_text())
    assert manifest["key"]["producer"] == {
        "backend": "onnxruntime",
        "precision": "fp16",
        "export_key": export_digest(read_manifest(fp16)),
    }
    assert manifest["capture"] == {"export_dir": str(fp16)} and manifest["key"]["labels"] == [1, 4]
    bf16 = shutil.copytree(fp16, tmp_path / "bf16")  # (only its manifest is read before the refusal)
    (bf16 / "manifest.json").write_text(json.dumps({**read_manifest(fp16), "precision": "bf16"}))
    for bad, why in (
        (["--capture-backend", "torch", "--capture-precision", "fp16"], "float32 reference"),
        (["--capture-export", str(embedded.fp32), "--capture-precision", "fp16"], "holds fp32 graphs"),
        (["--capture-export", str(bf16)], "holds bf16 graphs: a capture runs on fp32 or fp16 graphs"),
    ):
        assert main(["calibrate", "--steps", str(S), "--out", str(tmp_path / "x"), *bad]) == 2
        assert why in capsys.readouterr().err


def test_capture_choice_and_backends_without_stages(embedded):
    assert capture_choice(False) == ("torch", "fp32")
    assert capture_choice(True) == ("onnxruntime", "fp16")
    assert capture_choice(False, "onnxruntime") == ("onnxruntime", "fp32")
    assert capture_choice(True, "torch") == ("torch", "fp32")
    with pytest.raises(BitDanceError, match="float32 reference"):
        capture_choice(True, "torch", "fp16")
    with pytest.raises(BitDanceError, match="stage observers"):
        RecordingBackend(TimedBackend(TorchBackend(embedded.model)))  # a wrapper, not a stage backend
    plain = TorchBackend(embedded.model)  # any stage backend records: its observers see every stage
    recording = RecordingBackend(plain, POLICY)
    assert plain.observers and plain.sampler == "step"
    recording.detach()
    assert not plain.observers and plain.sampler == "auto"
    plain = OrtBackend(embedded.fp32, threads=1)
    try:
        assert producer_of(plain)["export_key"] == export_digest(plain.manifest)
    finally:
        plain.close()

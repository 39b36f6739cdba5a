"""TensorRT engine builds, on CPU: the precision decision table, option parsing, the engine cache
through build_engines with a fake TensorRT (hit / miss / stale -> rebuild with a message), the
one-line errors of `bitdance-rt build` without TensorRT or without a GPU, and a build path that
never imports torch.
(Over 400 lines: most of its tests build from one module-scoped export of the tiny 4x model, made once.)"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

pytest.importorskip("onnx")

from bitdance_rt import stages as st  # noqa: E402
from bitdance_rt.cli import main  # noqa: E402
from bitdance_rt.engines import build as eb  # noqa: E402
from bitdance_rt.engines import cache as ec  # noqa: E402
from bitdance_rt.engines.options import (
    PrecisionPlan,
    graph_precision,
    opt_level,
    plan_precision,  # noqa: E402
    workspace_bytes,
)
from bitdance_rt.engines.profiles import stage_profile, stage_profiles  # noqa: E402
from bitdance_rt.errors import BitDanceError  # noqa: E402
from bitdance_rt.export import checkpoint_source, export_stages, read_manifest  # noqa: E402
from bitdance_rt.export.manifest import manifest_specs  # noqa: E402
from bitdance_rt.loading import load_model  # noqa: E402

from conftest import REPO, fixture_dir, torch_threads  # noqa: E402

STAGES = [st.PREFIX_EMBED, st.BACKBONE, st.HEAD_STEP, st.DECODER]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    d = fixture_dir("tiny_4x")
    model = load_model(d / "config.json", d / "checkpoint.pt").model
    out = tmp_path_factory.mktemp("trt-build") / "tiny_4x"
    with torch_threads(1):
        export_stages(
            model,
            out,
            checkpoint_source(d / "checkpoint.pt"),
            stages=STAGES,
            sampler_steps=6,
            limits=st.Limits(max_batch=4, opt_batch=2),
        )
    return out


def with_precision(export: Path, dest: Path, precision: str) -> Path:
    """A copy of the export whose manifest says its graphs have `precision` (the precision
    engineer's export format: same files, a top-level "precision" field)."""
    shutil.copytree(export, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["precision"] = precision
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


class FakeTensorRT:
    """Stands in for engines.build.TensorRT: records every build request, returns fake bytes."""

    def __init__(self, version="10.3.0", gpu=("Orin", "8.7"), fail: str | None = None):
        self.version = version
        self.gpu = eb.GpuInfo(*gpu)
        self.calls = []
        self.fail = fail

    def build(self, onnx_path, plan, profiles, workspace, level, timing_cache):
        self.calls.append(
            dict(
                onnx=Path(onnx_path),
                plan=plan,
                profiles=profiles,
                workspace=workspace,
                level=level,
                timing=timing_cache,
            )
        )
        if self.fail:
            raise BitDanceError(self.fail)
        return f"engine:{Path(onnx_path).name}:{plan.precision}:{workspace}".encode()


# ---- the precision decision table ----------------------------------------------------------
@pytest.mark.parametrize("trt", ["10.3.0", "10.13.2.6", "11.0.0"])
@pytest.mark.parametrize("graph", ["fp32", "fp16", "int8"])
def test_graph_precision_builds_strongly_typed(trt, graph):
    for asked in (None, graph):
        plan = plan_precision(graph, asked, trt)
        assert plan == PrecisionPlan(graph, graph, strongly_typed=True, clear_tf32=(graph == "fp32"))
        assert plan.builder_flags == ()
    assert plan_precision("fp32", None, trt).key_flags == ("strongly_typed", "no_tf32")


def test_fp16_from_fp32_graphs_is_the_trt10_flag_and_refused_on_trt11():
    plan = plan_precision("fp32", "fp16", "10.3.0")
    assert (plan.precision, plan.strongly_typed, plan.builder_flags, plan.clear_tf32) == (
        "fp16",
        False,
        ("FP16",),
        False,
    )
    assert plan.key_flags == ("weakly_typed", "flag:FP16")
    with pytest.raises(BitDanceError, match="strongly typed networks only.*export FP16 graphs"):
        plan_precision("fp32", "fp16", "11.2.0")


@pytest.mark.parametrize("trt", ["10.3.0", "11.0.0"])
@pytest.mark.parametrize("graph", ["fp32", "fp16"])
def test_int8_needs_quantised_graphs(trt, graph):
    with pytest.raises(BitDanceError, match="run the INT8 quantisation first"):
        plan_precision(graph, "int8", trt)


@pytest.mark.parametrize("graph,asked", [("fp16", "fp32"), ("int8", "fp32"), ("int8", "fp16")])
def test_reduced_precision_graphs_do_not_give_other_engines(graph, asked):
    with pytest.raises(BitDanceError, match=f"holds {graph} graphs.*{asked}"):
        plan_precision(graph, asked, "10.3.0")


def test_bad_precision_and_versions():
    with pytest.raises(BitDanceError, match="--precision 'int2'"):
        plan_precision("fp32", "int2", "10.3.0")
    with pytest.raises(BitDanceError, match="cannot give a bf16 engine"):
        plan_precision("fp32", "bf16", "10.3.0")
    with pytest.raises(BitDanceError, match="too old"):
        plan_precision("fp32", None, "8.6.1")
    with pytest.raises(BitDanceError, match="version"):
        plan_precision("fp32", None, "unknown")


def test_graph_precision_from_manifest():
    assert graph_precision({}) == "fp32"
    assert graph_precision({"precision": "int8"}) == "int8"
    with pytest.raises(BitDanceError, match="unknown graph precision 'fp8'"):
        graph_precision({"precision": "fp8"})


def test_workspace_and_opt_level_parsing():
    assert workspace_bytes(None) is None
    assert workspace_bytes(1024) == 1 << 30
    assert workspace_bytes(" 256 ") == 256 << 20
    for bad in (0, -5, "1.5", "2G", 1 << 21):
        with pytest.raises(BitDanceError, match="--workspace-mb"):
            workspace_bytes(bad)
    assert [opt_level(x) for x in (0, "3", 5)] == [0, 3, 5]
    for bad in (-1, 6, "x", None):
        with pytest.raises(BitDanceError, match="0..5"):
            opt_level(bad)


# ---- build_engines with a fake TensorRT -----------------------------------------------------
def test_build_then_hit_then_stale_rebuild(export, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="bitdance_rt")
    root = tmp_path / "engines"
    fake = FakeTensorRT()
    built = eb.build_engines(export, workspace_mb=512, root=root, toolkit=fake)
    assert list(built) == STAGES and all(b.status == "built" for b in built.values())
    specs = manifest_specs(read_manifest(export), export)
    for call, stage in zip(fake.calls, STAGES):
        assert call["onnx"] == export / f"{stage}.onnx"
        assert call["profiles"] == stage_profiles(specs[stage])  # the contract's min/opt/max, nothing else
        assert call["workspace"] == 512 << 20 and call["level"] == 3
        assert call["plan"].precision == "fp32" and call["plan"].clear_tf32
        assert call["timing"] == root / "timing-trt10.3.0-orin-sm8.7.cache"
    assert fake.calls[0]["profiles"] == [[("labels", (1,), (4,), (8,))]]  # rows = 2 x batch, opt batch 2, max 4
    backbone = fake.calls[1]["profiles"]  # ONE engine, a profile per phase: prefill, then step
    assert backbone == [stage_profile(specs[st.BACKBONE], "prefill"), stage_profile(specs[st.BACKBONE], "step")]
    cfg = specs[st.BACKBONE]
    seqs = [dict((n, (lo, opt, hi)) for n, lo, opt, hi in p)["x"][0][1] for p in backbone]
    assert seqs == [cfg.phases["prefill"]["seq"], cfg.phases["step"]["seq"]]
    assert len(built[st.BACKBONE].key.profiles) == 2 and not list(root.glob("backbone_step-*"))
    for b in built.values():
        assert b.path.read_bytes().startswith(b"engine:") and ec.sidecar_path(b.path).is_file()
        assert b.path.parent == root and b.path.name.startswith(f"{b.stage}-fp32-")
    assert any("building fp32 engine with TensorRT 10.3.0 on Orin" in line for line in caplog.messages)

    caplog.clear()
    again = eb.build_engines(export, workspace_mb=512, root=root, toolkit=fake)
    assert len(fake.calls) == len(STAGES)  # nothing rebuilt
    assert all(b.status == "cached" for b in again.values()) and all("up to date" in line for line in caplog.messages)

    caplog.clear()
    newer = FakeTensorRT(version="10.4.0")
    rebuilt = eb.build_engines(export, workspace_mb=512, root=root, toolkit=newer)
    assert all(b.status == "rebuilt" for b in rebuilt.values()) and len(newer.calls) == len(STAGES)
    assert all(
        line.startswith(f"{s}: rebuilding:") and "trt_version: '10.3.0' -> '10.4.0'" in line
        for s, line in zip(STAGES, [l for l in caplog.messages if "rebuilding" in l])
    )
    assert newer.calls[0]["timing"].name == "timing-trt10.4.0-orin-sm8.7.cache"

    caplog.clear()
    eb.build_engines(export, workspace_mb=1024, root=root, toolkit=newer, stages=[st.DECODER])
    assert "workspace_bytes: 536870912 -> 1073741824" in caplog.messages[0]

    caplog.clear()
    other_gpu = FakeTensorRT(version="10.4.0", gpu=("NVIDIA H100 80GB HBM3", "9.0"))
    eb.build_engines(export, workspace_mb=1024, root=root, toolkit=other_gpu, stages=[st.DECODER])
    assert "gpu_name" in caplog.messages[0] and "compute_capability: '8.7' -> '9.0'" in caplog.messages[0]


def test_build_hands_over_an_engine_set(export, tmp_path):
    """Build before run: build_engines returns the EngineSet a TrtBackend takes (the export, one engine file
    per stage, the engine precision, the toolkit and its device), still a Mapping stage -> BuiltEngine; an
    export opened (and checked) by the caller is taken as it is."""
    from bitdance_rt.export.reader import ExportInfo, open_export

    fake = FakeTensorRT()
    fake.device = 1
    engines = eb.build_engines(open_export(export), root=tmp_path, toolkit=fake, stages=[st.DECODER, st.HEAD_STEP])
    assert isinstance(engines, eb.EngineSet) and isinstance(engines.export, ExportInfo)
    assert engines.directory == export and engines.precision == "fp32" and engines.toolkit is fake
    assert engines.device == 1  # the toolkit's device: the engines' GPU
    assert list(engines) == [st.DECODER, st.HEAD_STEP] and len(engines) == 2
    assert engines.paths == {s: b.path for s, b in engines.items()}
    assert engines.serialized(st.DECODER) == engines[st.DECODER].path.read_bytes()
    with pytest.raises(BitDanceError, match="no backbone engine was built"):
        engines.serialized(st.BACKBONE)
    engines[st.HEAD_STEP].path.unlink()  # e.g. the cache cleaned before a lazy head_step load
    with pytest.raises(BitDanceError, match="head_step engine cannot be read"):
        engines.serialized(st.HEAD_STEP)
    assert eb.build_engines(export, root=tmp_path, toolkit=FakeTensorRT(), stages=[st.DECODER]).device is None


def test_fp16_engine_from_fp32_graphs_on_trt10(export, tmp_path):
    fake = FakeTensorRT()
    built = eb.build_engines(export, precision="fp16", root=tmp_path, toolkit=fake, stages=[st.HEAD_STEP])
    (b,) = built.values()
    assert b.path.name.startswith("head_step-fp16-") and b.key.flags == ("weakly_typed", "flag:FP16")
    assert fake.calls[0]["plan"].builder_flags == ("FP16",)
    with pytest.raises(BitDanceError, match="export FP16 graphs"):
        eb.build_engines(export, precision="fp16", root=tmp_path, toolkit=FakeTensorRT("11.1.0"))


def test_weight_streaming_builds_the_backbone_streamable(export, tmp_path):
    """--weight-streaming: the backbone's engine is built with BuilderFlag.WEIGHT_STREAMING (a key of its
    own, beside the resident engine); the other stages as before; weakly typed plans are refused."""
    fake = FakeTensorRT()
    stages = [st.BACKBONE, st.DECODER]
    plain = eb.build_engines(export, root=tmp_path, toolkit=fake, stages=stages)
    streamed = eb.build_engines(export, root=tmp_path, toolkit=fake, stages=stages, weight_streaming=True)
    flags = [c["plan"].builder_flags for c in fake.calls]
    assert flags == [(), (), ("WEIGHT_STREAMING",)]  # backbone, decoder, then the streamable backbone only
    assert streamed[st.BACKBONE].key.flags == ("strongly_typed", "flag:WEIGHT_STREAMING", "no_tf32")
    assert streamed[st.BACKBONE].path != plain[st.BACKBONE].path and streamed[st.DECODER].status == "cached"
    with pytest.raises(BitDanceError, match="weight streaming needs a strongly typed network"):
        eb.build_engines(export, precision="fp16", root=tmp_path, toolkit=fake, stages=stages, weight_streaming=True)


def test_precision_comes_from_the_manifest(export, tmp_path):
    fp16 = with_precision(export, tmp_path / "fp16", "fp16")
    fake = FakeTensorRT("11.0.0")
    built = eb.build_engines(fp16, root=tmp_path / "e", toolkit=fake, stages=[st.PREFIX_EMBED])
    assert built[st.PREFIX_EMBED].key.precision == "fp16" and fake.calls[0]["plan"].strongly_typed
    with pytest.raises(BitDanceError, match="run the INT8 quantisation first"):
        eb.build_engines(fp16, precision="int8", root=tmp_path / "e", toolkit=fake)
    int8 = with_precision(export, tmp_path / "int8", "int8")
    built = eb.build_engines(int8, root=tmp_path / "e", toolkit=fake, stages=[st.PREFIX_EMBED])
    assert built[st.PREFIX_EMBED].path.name.startswith("prefix_embed-int8-")


def test_failed_build_leaves_no_engine(export, tmp_path):
    with pytest.raises(BitDanceError, match="parser refused"):
        eb.build_engines(export, root=tmp_path, toolkit=FakeTensorRT(fail="x.onnx: parser refused it"))
    assert not list(tmp_path.glob("*.engine"))


def test_lint_errors_stop_the_build(export, tmp_path, monkeypatch):
    from bitdance_rt.engines import lint

    bad = lint.Finding("decoder.onnx", "n1", "Det", "no importer")
    monkeypatch.setattr(lint, "lint_export", lambda d, target: [bad, bad] if target == "11" else [])
    fake = FakeTensorRT("11.0.0")
    with pytest.raises(BitDanceError, match=r"TensorRT 11 lint: decoder.onnx: error: node 'n1' \(Det\).*\+1 more"):
        eb.build_engines(export, root=tmp_path, toolkit=fake)
    assert fake.calls == []
    eb.build_engines(export, root=tmp_path, toolkit=FakeTensorRT("10.3.0"))  # 10.3 list: clean


def test_unknown_stage_and_bad_export(export, tmp_path):
    with pytest.raises(BitDanceError, match="has no stage.*encoder"):
        eb.build_engines(export, root=tmp_path, toolkit=FakeTensorRT(), stages=["encoder"])
    broken = shutil.copytree(export, tmp_path / "broken")
    (broken / "decoder.onnx").write_bytes(b"garbage")
    with pytest.raises(BitDanceError, match="decoder.onnx"):
        eb.build_engines(broken, root=tmp_path, toolkit=FakeTensorRT())


# ---- this machine: TensorRT, GPU ------------------------------------------------------------
class FakeLibCuda:
    def __init__(self, init=0, count=1, name=b"Orin (nvgpu)", cc=(8, 7)):
        self.init, self.count, self.name, self.cc = init, count, name, cc

    def cuInit(self, flags):
        return self.init

    def cuDeviceGetCount(self, ref):
        ref._obj.value = self.count
        return 0

    def cuDeviceGet(self, ref, index):
        ref._obj.value = index
        return 0

    def cuDeviceGetName(self, buf, size, dev):
        ctypes.memmove(buf, self.name, len(self.name))
        return 0

    def cuDeviceGetAttribute(self, ref, attr, dev):
        ref._obj.value = {75: self.cc[0], 76: self.cc[1]}[attr]
        return 0


def test_gpu_info_via_driver_api(monkeypatch):
    monkeypatch.setattr(eb, "_load_libcuda", lambda: FakeLibCuda())
    assert eb.gpu_info(0) == eb.GpuInfo("Orin (nvgpu)", "8.7")
    with pytest.raises(BitDanceError, match="device 1 does not exist"):
        eb.gpu_info(1)
    for lib, why in [
        (None, "driver \\(libcuda\\) is not installed"),
        (FakeLibCuda(init=100), "cuInit"),
        (FakeLibCuda(count=0), "no CUDA GPU visible"),
    ]:
        monkeypatch.setattr(eb, "_load_libcuda", lambda lib=lib: lib)
        with pytest.raises(BitDanceError, match=why):
            eb.gpu_info(0)


def _one_line_error(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("bitdance-rt: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_build_without_tensorrt_is_one_line(export, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    err = _one_line_error(capsys, ["build", "--export", str(export)])
    assert "needs TensorRT's Python package" in err and "pip install 'bitdance-rt[tensorrt]'" in err


def test_build_without_gpu_is_one_line(export, capsys, monkeypatch):
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.3.0"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(eb, "_load_libcuda", lambda: None)
    assert "no CUDA GPU here" in _one_line_error(capsys, ["build", "--export", str(export)])
    monkeypatch.setattr(eb, "_load_libcuda", lambda: FakeLibCuda(count=0))
    assert "no CUDA GPU visible" in _one_line_error(capsys, ["build", "--export", str(export)])


def test_build_cli_reports_counts(export, tmp_path, capsys, monkeypatch):
    fake = FakeTensorRT()
    monkeypatch.setattr(eb, "TensorRT", lambda device=0: fake)
    argv = [
        "build",
        "--export-dir",
        str(export),
        "--engine-dir",
        str(tmp_path),
        "--workspace-mb",
        "64",
        "--stages",
        "prefix_embed",
        "decoder",
    ]
    assert main(argv) == 0
    assert "2 built, 0 rebuilt, 0 cached (TensorRT 10.3.0, Orin)" in capsys.readouterr().out
    assert main(argv) == 0
    assert "0 built, 0 rebuilt, 2 cached" in capsys.readouterr().out
    bad = ["build", "--export", str(export), "--engine-dir", str(tmp_path), "--workspace-mb", "0"]  # the old spelling
    assert "--workspace-mb must lie" in _one_line_error(capsys, bad)


def test_build_path_does_not_import_torch(export):
    """Jetson recipe: `bitdance-rt build` runs in a process without torch (here it stops at the
    missing-TensorRT error, after reading the whole CLI and build module)."""
    code = (
        "import sys; sys.modules['tensorrt'] = None\n"
        "import bitdance_rt.engines.build, bitdance_rt.engines.lint\n"
        "from bitdance_rt.cli import main\n"
        f"rc = main(['build', '--export', {str(export)!r}])\n"
        "assert rc == 2, rc\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
        "print('torch-free')"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and "torch-free" in done.stdout, done.stderr


def test_tensorrt_backend_needs_cuda(export, capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from bitdance_rt.runtime.trt_backend import TrtBackend

    with pytest.raises(BitDanceError, match="needs a CUDA GPU"):
        TrtBackend.from_export(export)
    engines = eb.build_engines(export, root=tmp_path, toolkit=FakeTensorRT())  # the build needs no GPU here
    with pytest.raises(BitDanceError, match="needs a CUDA GPU"):
        TrtBackend(engines)
    d = fixture_dir("tiny_4x")
    err = _one_line_error(
        capsys, ["generate", "--backend", "tensorrt", "--model", str(d / "config.json"), "--labels", "3", "--quiet"]
    )
    assert "backend tensorrt needs a CUDA GPU" in err  # said before anything is exported for it


def test_ort_provider_option(export, capsys, tmp_path, monkeypatch):
    import onnxruntime

    from bitdance_rt.runtime import ort_backend

    seen = []

    def fake_backend(directory, **kw):
        seen.append(kw["providers"])
        raise BitDanceError("stop here")

    monkeypatch.setattr(ort_backend, "OrtBackend", fake_backend)
    d = fixture_dir("tiny_4x")
    base = [
        "generate",
        "--export-dir",
        str(export),
        "--model",
        str(d / "config.json"),
        "--labels",
        "3",
        "--quiet",
        "--out",
        str(tmp_path),
    ]
    for extra, want in [
        ([], ["cpu"]),
        (["--ort-provider", "tensorrt"], ["tensorrt", "cuda"]),
        (["--ort-provider", "cuda"], ["cuda"]),
    ]:
        assert "stop here" in _one_line_error(capsys, base + extra)
        assert seen[-1] == want
    if "TensorrtExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(BitDanceError, match="TensorrtExecutionProvider is not available.*onnxruntime-gpu"):
            ort_backend.normalize_providers(["tensorrt"])

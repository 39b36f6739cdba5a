"""The TensorRT parts that need no GPU: graph lint against the parser's operator lists,
optimisation profiles from the stage contract, and the engine cache (keys, lookup, lock).
(Over 400 lines: lint, profiles and the engine cache are tested on the same module-scoped pair of tiny
exports.)"""

from __future__ import annotations

import json
import multiprocessing
import time
from dataclasses import replace
from pathlib import Path

import pytest

onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper  # noqa: E402

from bitdance_rt import stages as st  # noqa: E402
from bitdance_rt.engines import cache as ec  # noqa: E402
from bitdance_rt.engines.lint import TARGETS, lint_export, lint_graph, op_table  # noqa: E402
from bitdance_rt.engines.profiles import (
    multi_shape_strings,
    profile_index,
    shape_strings,  # noqa: E402
    spanning_profile,
    stage_profile,
    stage_profiles,
    trtexec_shapes,
)
from bitdance_rt.errors import BitDanceError  # noqa: E402
from bitdance_rt.export import read_manifest  # noqa: E402
from bitdance_rt.loading import load_model  # noqa: E402
from bitdance_rt.runtime.ort_session import trt_profile_options  # noqa: E402

from conftest import FIXTURE_STEPS, copy_export, fixture_dir  # noqa: E402

S = 6


@pytest.fixture(scope="module", params=["tiny_4x", "tiny_1x"])
def export(request, tmp_path_factory, fixture_exports):
    """(export dir, model config) of an official tiny fixture, all stages: a copy of the session's
    export_stages(model, dir, source, sampler_steps=S) of it (conftest fixture_exports)."""
    d = fixture_dir(request.param)
    model = load_model(d / "config.json", d / "checkpoint.pt").model
    out = tmp_path_factory.mktemp("engines") / request.param
    assert S == FIXTURE_STEPS
    copy_export(fixture_exports(request.param), out)
    return out, model.cfg


# ---- lint: our graphs ---------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_fixture_exports_pass_lint(export, target):
    directory, _ = export
    # Nothing at all: no unsupported op or dtype, and `start` is only a gather index, not a shape tensor.
    assert [str(f) for f in lint_export(directory, target)] == []


def test_every_op_we_export_is_listed(export):
    directory, _ = export
    used = set()
    for f in (f for f in read_manifest(directory)["files"] if f.endswith(".onnx")):  # not shared.weights
        used |= {n.op_type for n in onnx.load(str(directory / f), load_external_data=False).graph.node}
    for target in TARGETS:
        assert used <= op_table(target).ops, (target, sorted(used - op_table(target).ops))


def test_op_tables():
    old, new = op_table("10.3"), op_table("11")
    assert (old.min_opset, old.max_opset) == (9, 20)
    assert new.max_opset >= 24 and old.ops <= new.ops
    assert "onnx/onnx-tensorrt" in old.source and "onnx/onnx-tensorrt" in new.source
    assert {"Det", "Unique", "SequenceAt", "MatMulInteger"}.isdisjoint(new.ops)
    assert {"LayerNormalization", "ScatterND", "Mod", "Sign", "InstanceNormalization"} <= old.ops
    assert {"Attention", "RMSNormalization"} <= new.ops - old.ops
    with pytest.raises(BitDanceError, match="TensorRT target"):
        op_table("9.0")


# ---- lint: crafted graphs ---------------------------------------------------------------------
def _model(nodes, inputs, outputs, opset=17, inits=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def test_bad_graph_is_flagged_with_file_and_node(tmp_path):
    model = _model(
        [
            helper.make_node("Relu", ["x"], ["r"], name="ok_relu"),
            helper.make_node("Det", ["r"], ["d"], name="the_det"),
            helper.make_node("Cast", ["r"], ["y64"], name="to_double", to=TensorProto.DOUBLE),
        ],
        [_vi("x", TensorProto.FLOAT, [2, 3, 3])],
        [_vi("d", TensorProto.FLOAT, [2]), _vi("y64", TensorProto.DOUBLE, [2, 3, 3])],
        opset=21,
    )
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    found = lint_graph(path, "10.3")
    by_node = {f.node: f for f in found}
    assert all(f.file == str(path) and f.severity == "error" for f in found)
    assert "opset 21" in by_node["(model)"].why and "9..20" in by_node["(model)"].why
    assert by_node["the_det"].op == "Det" and "no importer" in by_node["the_det"].why
    assert by_node["to_double"].op == "Cast" and "float64" in by_node["to_double"].why
    assert "ok_relu" not in by_node
    assert str(path) in str(by_node["the_det"]) and "the_det" in str(by_node["the_det"])
    # TensorRT 11 reads opset 21, but still has no Det and no DOUBLE.
    assert {f.node for f in lint_graph(path, "11")} == {"the_det", "to_double"}


def test_restrictions_and_types():
    axes = helper.make_tensor("one", TensorProto.INT64, [1], [0])
    model = _model(
        [
            helper.make_node("Shape", ["x"], ["s"], name="shape"),
            helper.make_node("Slice", ["s", "one_c", "two_c"], ["dyn_axes"], name="axes_from_shape"),
            helper.make_node("Constant", [], ["one_c"], value=helper.make_tensor("a", TensorProto.INT64, [1], [0])),
            helper.make_node("Constant", [], ["two_c"], value=helper.make_tensor("b", TensorProto.INT64, [1], [1])),
            helper.make_node("Sub", ["dyn_axes", "dyn_axes"], ["zero"], name="zero"),
            helper.make_node("Unsqueeze", ["x", "zero"], ["u"], name="computed_axes"),
            helper.make_node("Squeeze", ["u", "one"], ["q"], name="const_axes"),
            helper.make_node("ScatterND", ["x", "idx", "upd"], ["sc"], name="scatter_add", reduction="add"),
            helper.make_node("Cast", ["x"], ["u8"], name="to_uint8", to=TensorProto.UINT8),
            helper.make_node("Cast", ["u8"], ["back"], name="from_uint8", to=TensorProto.FLOAT),
            helper.make_node("Custom", ["x"], ["c"], name="plugin_op", domain="com.example"),
        ],
        [
            _vi("x", TensorProto.FLOAT, [4, 3]),
            _vi("idx", TensorProto.INT64, [1, 1]),
            _vi("upd", TensorProto.FLOAT, [1, 3]),
        ],
        [_vi(n, TensorProto.FLOAT, [4, 3]) for n in ("q", "sc", "back", "c")],
        inits=[axes],
    )
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    found = {f.node: f for f in lint_graph(model, "10.3")}
    assert set(found) == {"computed_axes", "scatter_add", "to_uint8", "plugin_op"}, [str(f) for f in found.values()]
    assert "axes" in found["computed_axes"].why and found["computed_axes"].severity == "error"
    assert "reduction='add'" in found["scatter_add"].why
    assert "uint8" in found["to_uint8"].why
    assert "plugin" in found["plugin_op"].why and found["plugin_op"].op == "com.example::Custom"
    assert found["computed_axes"].file == "<model>"
    assert {f.node: f.severity for f in lint_graph(model, "11")}["computed_axes"] == "warning"


def test_int_input_feeding_a_shape_operand_is_reported():
    model = _model(
        [
            helper.make_node("Add", ["start", "p"], ["end"], name="end"),
            helper.make_node("Slice", ["x", "start", "end"], ["y"], name="slice_at_start"),
        ],
        [_vi("x", TensorProto.FLOAT, [8, 3]), _vi("start", TensorProto.INT64, [1])],
        [_vi("y", TensorProto.FLOAT, None)],
        inits=[helper.make_tensor("p", TensorProto.INT64, [1], [2])],
    )
    (f,) = lint_graph(model, "10.3")
    assert (f.node, f.op, f.severity) == ("slice_at_start", "Slice", "warning") and "shape tensor" in f.why


def test_backbone_graph_with_a_static_seq_is_flagged(export):
    """Our backbone graph keeps `seq` dynamic (one engine, a profile per phase); a graph with seq baked
    in (or any contract-dynamic dim made static, or a wrong static size) is an error naming the dim."""
    directory, cfg = export
    spec = st.stage_spec(st.BACKBONE, cfg, S, st.Limits.from_json(read_manifest(directory)["key"]["limits"]))
    model = onnx.load(str(directory / "backbone.onnx"), load_external_data=False)
    assert lint_graph(model, "10.3", spec) == []
    x = next(v for v in model.graph.input if v.name == "x")
    x.type.tensor_type.shape.dim[1].dim_value = cfg.prefix_len  # seq fixed to the prefill's size
    kv = next(v for v in model.graph.output if v.name == "kv_new")
    kv.type.tensor_type.shape.dim[0].dim_value = cfg.n_layer + 1  # a static size the contract fixes otherwise
    found = {f.node: f for f in lint_graph(model, "10.3", spec)}
    assert set(found) == {"x", "kv_new"} and all(f.severity == "error" for f in found.values())
    assert f"axis 1 is fixed to {cfg.prefix_len}" in found["x"].why and "'seq'" in found["x"].why
    assert f"prefill: {cfg.prefix_len}, step: {cfg.parallel_num}" in found["x"].why
    assert f"axis 0 is {cfg.n_layer + 1}" in found["kv_new"].why
    assert lint_graph(model, "10.3") == []  # without the contract only the graph itself is linted


def test_lint_errors_are_one_line(tmp_path):
    with pytest.raises(BitDanceError, match="not found"):
        lint_graph(tmp_path / "none.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00junk")
    with pytest.raises(BitDanceError, match="not a readable ONNX file"):
        lint_graph(tmp_path / "junk.onnx")
    with pytest.raises(BitDanceError, match="export directory not found"):
        lint_export(tmp_path / "nothing")


# ---- profiles -----------------------------------------------------------------------------------
def _opts(options):
    return options["trt_profile_min_shapes"], options["trt_profile_opt_shapes"], options["trt_profile_max_shapes"]


def test_profiles_are_the_contract(export):
    _, cfg = export
    limits = st.Limits(max_batch=3, opt_batch=2)
    for spec in st.stage_specs(cfg, st.ALL_STAGES, S, limits).values():
        profiles = stage_profiles(spec)
        assert len(profiles) == len(spec.profile_phases)  # one per phase, else one
        dynamic = [t.name for t in spec.inputs if any(isinstance(d, str) for d in t.shape)]
        for phase, profile in zip(spec.profile_phases, profiles):
            assert [p[0] for p in profile] == dynamic and profile == stage_profile(spec, phase)
            for name, lo, opt, hi in profile:
                assert (lo, opt, hi) == spec.profile(name, phase)
            assert profile_index(spec, phase) == spec.profile_phases.index(phase)
        if not spec.phases:
            assert _opts(trt_profile_options(spec)) == shape_strings(profiles[0])
            assert _opts(trt_profile_options(spec, per_phase=True)) == shape_strings(profiles[0])
    p, c = cfg.parallel_num, cfg.token_dim
    head = dict((n, (lo, opt, hi)) for n, lo, opt, hi in stage_profile(st.head_step_stage(cfg, limits)))
    assert head["x"] == ((1, p, c), (4, p, c), (6, p, c)) and head["t"] == ((1,), (4,), (6,))
    sampler = dict((n, (lo, opt, hi)) for n, lo, opt, hi in stage_profile(st.head_sampler_stage(cfg, S, limits)))
    assert sampler["cond"][2][0] == 6 and sampler["noise"] == ((S + 1, 1, p, c), (S + 1, 4, p, c), (S + 1, 6, p, c))
    assert sampler["cfg"] == sampler["cond_row"] == sampler["uncond_row"] == ((1,), (4,), (6,))  # one per row
    backbone = st.backbone_stage(cfg, limits)
    names = [n for n, *_ in stage_profile(backbone, "step")]
    assert names[:2] == ["x", "start"] and names[2:] == st.cache_input_names(cfg)
    args = trtexec_shapes(st.head_step_stage(cfg, limits))
    assert args[0] == f"--minShapes=x:1x{p}x{c},t:1,cond:1x{p}x{cfg.dim}"
    assert [a.split("=")[0] for a in args] == ["--minShapes", "--optShapes", "--maxShapes"]
    two = trtexec_shapes(backbone)  # one flag set per profile, in profile order
    assert [a.split("=")[0] for a in two] == ["--minShapes", "--optShapes", "--maxShapes"] * 2
    assert two[0].startswith(f"--minShapes=x:1x{cfg.prefix_len}x{cfg.dim},") and two[3].startswith(
        f"--minShapes=x:1x{p}x{cfg.dim},"
    )
    with pytest.raises(BitDanceError, match="no phase 'decode'"):
        profile_index(backbone, "decode")


def test_backbone_profiles_per_phase(export):
    """The backbone: profile 0 is the prefill's (seq = prefix_len), profile 1 the step's (seq = P), with the
    contract's row range in each; the phase-fixed dims are exact (min = opt = max)."""
    _, cfg = export
    limits = st.Limits(max_batch=3, opt_batch=2)
    spec = st.backbone_stage(cfg, limits)
    prefill, step = stage_profiles(spec)
    for profile, seq in ((prefill, cfg.prefix_len), (step, cfg.parallel_num)):
        entries = dict((n, (lo, opt, hi)) for n, lo, opt, hi in profile)
        assert entries["x"] == ((1, seq, cfg.dim), (4, seq, cfg.dim), (6, seq, cfg.dim))
        assert entries["start"] == ((1,), (4,), (6,))
        kv = st.kv_shape(cfg)[3:]
        assert entries[st.cache_input_names(cfg)[-1]] == ((1, *kv), (4, *kv), (6, *kv))
    with pytest.raises(BitDanceError, match="phases"):
        stage_profile(spec)  # a stage with phases has no phase-less profile


def test_ort_tensorrt_ep_profiles(export):
    """The ORT TensorRT EP: by default ONE profile spanning both phases (the EP keeps its context on
    profile 0), tuned for the step; per_phase lists each input once per profile, in profile order."""
    _, cfg = export
    spec = st.backbone_stage(cfg, st.Limits(max_batch=3, opt_batch=2))
    lo, opt, hi = _opts(trt_profile_options(spec))
    short, long_ = sorted((cfg.prefix_len, cfg.parallel_num))
    assert lo.startswith(f"x:1x{short}x{cfg.dim},start:1,") and hi.startswith(f"x:6x{long_}x{cfg.dim},start:6,")
    assert opt.startswith(f"x:4x{cfg.parallel_num}x{cfg.dim},")
    assert (lo, opt, hi) == shape_strings(spanning_profile(spec))
    many = _opts(trt_profile_options(spec, per_phase=True))
    assert many == multi_shape_strings(stage_profiles(spec))
    for text in many:  # each input once per profile: ParseProfileShapes collects profile k = k-th entry
        names = [entry.split(":")[0] for entry in text.split(",")]
        assert names == spec.input_names * 2
    assert many[0].startswith(f"x:1x{cfg.prefix_len}x{cfg.dim},")
    assert f",x:1x{cfg.parallel_num}x{cfg.dim}," in many[0]


# ---- engine cache -------------------------------------------------------------------------------
def _key(export, stage=st.HEAD_STEP, profiles=None, **changes):
    directory, cfg = export
    spec = st.stage_spec(stage, cfg, S)
    profiles = stage_profiles(spec) if profiles is None else profiles
    key = ec.engine_key(
        read_manifest(directory),
        stage,
        "fp16",
        profiles,
        "NVIDIA H100 80GB HBM3",
        "9.0",
        "10.3.0",
        opt_level=3,
        workspace_bytes=1 << 30,
    )
    return replace(key, **changes)


CHANGES = {
    "onnx_sha256": "0" * 64,
    "data_sha256": "1" * 64,
    "precision": "bf16",
    "profiles": ((("x", (1,), (2,), (3,)),),),
    "gpu_name": "NVIDIA A100-SXM4-80GB",
    "compute_capability": "8.0",
    "trt_version": "11.0.0",
    "opt_level": 5,
    "workspace_bytes": 1 << 31,
    "flags": ("strongly_typed",),
}


def test_key_changes_with_every_field(export):
    base = _key(export)
    assert base.onnx_sha256 == read_manifest(export[0])["files"]["head_step.onnx"]["sha256"]
    assert len(base.profiles) == 1 and base.profiles[0][0][0] == "x"
    assert base.data_sha256 == read_manifest(export[0])["files"]["shared.weights"]["sha256"]  # the head's weights
    assert set(CHANGES) | {"stage"} == set(base.to_json())
    digests = {base.digest()}
    for field, value in CHANGES.items():
        other = replace(base, **{field: value})
        assert other.differences(base) == [field]
        digests.add(other.digest())
    digests.add(_key(export, st.DECODER).digest())
    assert len(digests) == len(CHANGES) + 2
    assert ec.EngineKey.from_json(json.loads(json.dumps(base.to_json()))) == base
    assert base.filename().startswith("head_step-fp16-") and base.filename().endswith(".engine")


def test_key_validation(export):
    for bad in ({"precision": "fp64"}, {"opt_level": 7}, {"workspace_bytes": 0}):
        with pytest.raises(BitDanceError):
            _key(export, **bad)
    with pytest.raises(BitDanceError, match="no files recorded|records no files"):
        ec.engine_key({"stage_files": {}, "files": {}}, "decoder", "fp16", [[]], "gpu", "9.0", "10.3")
    one = stage_profile(st.stage_spec(st.HEAD_STEP, export[1], S))
    with pytest.raises(BitDanceError, match="the list of its profiles"):  # one profile where a list belongs
        ec.engine_key(read_manifest(export[0]), st.HEAD_STEP, "fp16", one, "gpu", "9.0", "10.3")


def test_backbone_key_holds_every_phase_profile(export, tmp_path):
    """Both profiles are in the backbone's key, in order: another step profile (or the two swapped) is
    another engine, and a stale one says the profiles changed."""
    _, cfg = export
    spec = st.stage_spec(st.BACKBONE, cfg, S)
    prefill, step = stage_profiles(spec)
    base = _key(export, st.BACKBONE)
    assert len(base.profiles) == 2 and base.profiles == ec._freeze([ec.profile_json(p) for p in (prefill, step)])
    other_step = [(n, lo, opt, hi) if n != "x" else (n, lo, (2, *opt[1:]), hi) for n, lo, opt, hi in step]
    keys = [
        base,
        _key(export, st.BACKBONE, profiles=[prefill, other_step]),
        _key(export, st.BACKBONE, profiles=[step, prefill]),
        _key(export, st.BACKBONE, profiles=[prefill]),
    ]
    assert len({k.digest() for k in keys}) == 4
    ec.store(base, b"two-profile engine", tmp_path)
    found = ec.lookup(keys[1], tmp_path)
    assert found.status == "stale" and found.differs == ("profiles",)
    assert "optimisation profiles changed" in found.reason
    assert ec.EngineKey.from_json(json.loads(json.dumps(base.to_json()))) == base


def test_sidecar_of_the_one_profile_format_is_stale(export, tmp_path):
    key = _key(export)
    path = ec.store(key, b"engine-bytes", tmp_path)
    side = json.loads(ec.sidecar_path(path).read_text())
    side["format"] = "bitdance-rt-engine/1"
    side["key"]["profile"] = side["key"].pop("profiles")[0]
    ec.sidecar_path(path).write_text(json.dumps(side))
    found = ec.lookup(key, tmp_path)
    assert found.status == "stale" and found.differs == ("format",) and "bitdance-rt-engine/1" in found.reason


def test_root_follows_env(monkeypatch, tmp_path, export):
    monkeypatch.setenv("BITDANCE_RT_CACHE", str(tmp_path / "c"))
    assert ec.engine_path(_key(export)).parent == tmp_path / "c" / "engines"
    monkeypatch.delenv("BITDANCE_RT_CACHE")
    assert ec.engine_root() == Path.home() / ".cache" / "bitdance-rt" / "engines"


def test_lookup_hit_miss_stale(export, tmp_path):
    key = _key(export)
    assert ec.lookup(key, tmp_path).status == "miss"
    path = ec.store(key, b"engine-bytes", tmp_path)
    assert path == ec.engine_path(key, tmp_path) and ec.lookup(key, tmp_path).hit
    assert ec.lookup(key, tmp_path, hashes=True).hit
    assert ec.lookup(_key(export, st.DECODER), tmp_path).status == "miss"  # other stages do not count
    for field, value in CHANGES.items():
        found = ec.lookup(replace(key, **{field: value}), tmp_path)
        assert found.status == "stale" and found.differs == (field,) and field in found.reason
        assert found.stale_path == path and found.path != path
    newer = ec.lookup(replace(key, trt_version="11.0.0"), tmp_path)
    assert "'10.3.0' -> '11.0.0'" in newer.reason
    path.write_bytes(b"engine-byt")  # truncated
    assert ec.lookup(key, tmp_path).status == "stale" and "size" in ec.lookup(key, tmp_path).reason
    path.write_bytes(b"ENGINE-BYTES")  # same size, other bytes
    assert ec.lookup(key, tmp_path).hit and ec.lookup(key, tmp_path, hashes=True).status == "stale"
    ec.sidecar_path(path).unlink()
    assert ec.lookup(key, tmp_path).differs == ("sidecar",)


def _locked_increment(path: str, log: str, delay: float) -> None:
    with ec.build_lock(path):
        with open(log, "a") as f:
            f.write("begin\n")
        counter = Path(path)
        value = int(counter.read_text()) if counter.exists() else 0
        time.sleep(delay)
        counter.write_text(str(value + 1))
        with open(log, "a") as f:
            f.write("end\n")


def test_lock_serialises_processes(tmp_path):
    path, log = tmp_path / "x.engine", tmp_path / "log"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_locked_increment, args=(str(path), str(log), 0.3)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert path.read_text() == "2"
    assert log.read_text().split() == ["begin", "end", "begin", "end"]


def test_lock_timeout(tmp_path):
    path = tmp_path / "y.engine"
    with ec.build_lock(path):
        with pytest.raises(BitDanceError, match="another process"):
            with ec.build_lock(path, timeout=0.2):
                pass
    with ec.build_lock(path, timeout=0.2):  # free again
        pass


def _build_once(key_json: str, root: str, log: str) -> None:
    def build():
        with open(log, "a") as f:
            f.write("built\n")
        time.sleep(0.3)
        return b"the-engine"

    ec.get_or_build(ec.EngineKey.from_json(json.loads(key_json)), build, root)


def test_get_or_build_builds_once(export, tmp_path):
    key, log = _key(export), tmp_path / "log"
    ctx = multiprocessing.get_context("fork")
    args = (json.dumps(key.to_json()), str(tmp_path / "root"), str(log))
    procs = [ctx.Process(target=_build_once, args=args) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert log.read_text().split() == ["built"]
    assert ec.lookup(key, tmp_path / "root", hashes=True).hit
    assert ec.engine_path(key, tmp_path / "root").read_bytes() == b"the-engine"

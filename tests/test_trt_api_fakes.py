"""The TensorRT / Polygraphy calls of the builder, the backend and `check`, on CPU: fakes that model
the Python bindings of TensorRT 10.3 and 11.1 (trt_fakes.py; python/src/infer/pyCore.cpp at those tags
of github.com/NVIDIA/TensorRT) and Polygraphy 0.49 / later return types check which names are called,
with which arguments, and what happens when TensorRT says no.
(Over 400 lines: one test per binding behaviour the builder, the backend and `check` rely on; the
fakes they share are in trt_fakes.py.)"""

from __future__ import annotations

import contextlib
import logging
from types import SimpleNamespace

import pytest

from bitdance_rt.errors import BitDanceError
from trt_fakes import (
    FakeConfig,
    FakeContext,
    FakeEngine,
    FakeTrtEngine,
    Strategy,
    _build,
    _fake_backend,
    _patch_cuda_graphs,
    _tiny_specs,
    fake_trt,
    toolkit,
)


# ---- builder -------------------------------------------------------------------------------
def test_trt10_strongly_typed_fp32_clears_tf32(tmp_path):
    trt = fake_trt("10.3.0")
    assert _build(toolkit(trt), tmp_path) == b"plan"
    flags, builder_flags = trt.built[0]
    assert flags == 1 << 1  # 1 << kSTRONGLY_TYPED (= 1 in 10.x); no EXPLICIT_BATCH
    assert "TF32" not in builder_flags and "FP16" not in builder_flags
    assert trt.config.pools == {"WORKSPACE": 1 << 20} and trt.config.builder_optimization_level == 3
    assert len(trt.config.profiles) == 1 and trt.config.profiles[0].shapes == [("labels", (1,), (2,), (4,))]


def test_trt10_fp16_flag_on_weakly_typed_network(tmp_path):
    trt = fake_trt("10.3.0")
    _build(toolkit(trt), tmp_path, "fp32", "fp16")
    flags, builder_flags = trt.built[0]
    assert flags == 0 and "FP16" in builder_flags and "TF32" in builder_flags


def test_trt11_passes_no_network_flag(tmp_path):
    trt = fake_trt("11.1.0")
    _build(toolkit(trt), tmp_path)
    flags, builder_flags = trt.built[0]
    assert flags == 0  # every 11.x network is strongly typed; kSTRONGLY_TYPED is deprecated and ignored
    assert "TF32" not in builder_flags
    _build(toolkit(trt), tmp_path, "fp16")
    assert trt.built[1][0] == 0


def test_parser_errors_are_one_line(tmp_path):
    errors = ["In node 3 with name: /Mul and operator: Mul (parseNode): UNSUPPORTED_NODE: bad\nmore detail", ""]
    trt = fake_trt("10.3.0", parser_errors=errors)
    with pytest.raises(BitDanceError) as e:
        _build(toolkit(trt), tmp_path)
    msg = str(e.value)
    assert "UNSUPPORTED_NODE: bad (+1 more)" in msg and "\n" not in msg


def test_failed_build_is_one_error(tmp_path):
    with pytest.raises(BitDanceError, match="could not build an engine"):
        _build(toolkit(fake_trt("10.3.0", build_ok=False)), tmp_path)
    assert not (tmp_path / "timing.cache").exists()


@pytest.mark.parametrize(
    "on_disk, expect",
    [
        (None, "here:new"),  # first build: a fresh cache, saved
        (b"here:a,b", "here:a,b,new"),  # same device: reused and extended
        (b"other-gpu:z", "here:new"),  # another device: set_timing_cache is False -> fresh, replaces it
        (b"\x00garbage", "here:new"),  # unreadable: create_timing_cache gives None -> fresh
    ],
)
def test_timing_cache_reuse_and_recovery(tmp_path, on_disk, expect):
    path = tmp_path / "timing.cache"
    if on_disk is not None:
        path.write_bytes(on_disk)
    _build(toolkit(fake_trt("10.3.0")), tmp_path)
    assert path.read_bytes().decode() == expect


def test_timing_cache_merge_keeps_a_concurrent_builders_entries(tmp_path, monkeypatch):
    path = tmp_path / "timing.cache"
    trt = fake_trt("10.3.0")
    real = FakeConfig.set_timing_cache

    def meanwhile(self, cache, ignore_mismatch):  # another process saves its timings during our build
        path.write_bytes(b"here:theirs")
        return real(self, cache, ignore_mismatch)

    monkeypatch.setattr(FakeConfig, "set_timing_cache", meanwhile)
    _build(toolkit(trt), tmp_path)
    assert path.read_bytes().decode() == "here:new,theirs"


# ---- backend helpers -----------------------------------------------------------------------
torch = pytest.importorskip("torch")
from bitdance_rt.runtime import trt_backend as tb  # noqa: E402


def test_user_managed_context_on_10_3_and_11_1():
    trt = SimpleNamespace(ExecutionContextAllocationStrategy=Strategy)
    made = []
    engine = SimpleNamespace(create_execution_context=lambda strategy=Strategy.STATIC: made.append(strategy) or "ctx")
    assert tb._create_context(trt, engine) == "ctx" and made == ["USER_MANAGED"]

    class RuntimeConfigOnly:  # a binding that takes only an IRuntimeConfig
        def create_runtime_config(self):
            return SimpleNamespace(
                strategy=None, set_execution_context_allocation_strategy=lambda s: setattr(self, "strategy", s)
            )

        def create_execution_context(self, runtime_config=None):
            if isinstance(runtime_config, str):
                raise TypeError("incompatible function arguments")
            return ("ctx", self.strategy)

    assert tb._create_context(trt, RuntimeConfigOnly()) == ("ctx", "USER_MANAGED")


def test_device_memory_v2_names():
    class Ctx:
        def set_device_memory(self, memory, size):
            self.got = (memory, size)

    ctx = Ctx()
    tb._set_device_memory(ctx, 4096, 1 << 20)
    assert ctx.got == (4096, 1 << 20)
    assert tb._device_memory_size(SimpleNamespace(device_memory_size_v2=123, device_memory_size=1)) == 123
    assert tb._device_memory_size(SimpleNamespace(device_memory_size=7)) == 7  # 10.0 (no _v2 yet)


def test_host_tensors_by_location():
    trt = SimpleNamespace(TensorLocation=SimpleNamespace(DEVICE="DEVICE", HOST="HOST"))
    engine = SimpleNamespace(get_tensor_location=lambda name: "HOST" if name == "shape" else "DEVICE")
    assert tb._on_host(trt, engine, "shape") and not tb._on_host(trt, engine, "tokens")


def _call(monkeypatch, context, invalidate=False):
    """A _Call for the backbone's step phase with fake torch.cuda graph/stream objects (no GPU needed)."""
    graphs = []

    @contextlib.contextmanager
    def graph_ctx(graph, stream=None, capture_error_mode="global", **_):
        assert stream is backend.stream and capture_error_mode == "thread_local"
        context.capturing = True
        try:
            yield
            if invalidate:
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")
        finally:
            context.capturing = False

    _patch_cuda_graphs(monkeypatch, graph_ctx, graphs)
    backend = SimpleNamespace(
        stream=SimpleNamespace(cuda_stream=1234, synchronize=lambda: None), cuda_graphs=True, captures=[]
    )
    call = object.__new__(tb._Call)
    call.stage, call.backend, call.context, call.host_shape_inputs = tb.st.BACKBONE, backend, context, False
    call.phase, call.graph_candidate = "step", True
    call.after, call.graph, call.capture_failed, call.calls = None, None, False, 0
    call.key = (call.stage, call.phase, (("rows", 2), ("seq", 1)))
    writes = []
    call.after = lambda: writes.append(context.capturing)
    return call, backend, graphs, writes


def test_graph_capture_after_one_eager_enqueue(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="bitdance_rt")
    ctx = FakeContext()
    call, backend, graphs, writes = _call(monkeypatch, ctx)
    call.run()
    assert ctx.enqueued == 2 and writes == [False, True]  # eager warm-up, then the captured enqueue + cache write
    assert call.graph is graphs[0] and backend.captures == [call.key] and not caplog.messages
    call.run()
    call.run()
    assert graphs[0].replays == 2 and ctx.enqueued == 2


@pytest.mark.parametrize("invalidate", [False, True])
def test_uncapturable_engine_runs_eagerly(monkeypatch, invalidate, caplog):
    caplog.set_level(logging.INFO, logger="bitdance_rt")
    ctx = FakeContext(capturable=invalidate)  # enqueue refuses under capture, or the capture is invalidated
    call, backend, graphs, writes = _call(monkeypatch, ctx, invalidate=invalidate)
    call.run()
    assert call.graph is None and call.capture_failed and backend.captures == []
    logs = caplog.messages
    assert len(logs) == 1 and "runs without one" in logs[0] and "\n" not in logs[0]
    call.run()
    assert ctx.enqueued == 3 and len(graphs) == 1  # no second capture attempt


# ---- Polygraphy's compare_accuracy across versions ----------------------------------------------
def test_first_accuracy_result_for_polygraphy_049_and_later():
    from bitdance_rt.check import _first_accuracy

    result = {("torch", "trt"): [{"x": True}]}  # 0.49: AccuracyResult (an ordered dict)
    assert _first_accuracy(result) is result
    assert _first_accuracy([result]) is result  # later: AccuracyResults, a list with no items()


# ---- the shared-core TensorRT backend: contract checks, alignment, fixed buffers ------------------
def test_refused_optimisation_profile_is_an_error(tmp_path, monkeypatch):
    """add_optimization_profile returns -1 for an invalid profile (NvInfer.h): never ignored."""
    trt = fake_trt("10.3.0")
    monkeypatch.setattr(FakeConfig, "add_optimization_profile", lambda self, profile: -1)
    with pytest.raises(BitDanceError, match="refused optimisation profile 0"):
        _build(toolkit(trt), tmp_path)


def test_second_profile_refused_names_it(tmp_path, monkeypatch):
    real = FakeConfig.add_optimization_profile
    monkeypatch.setattr(
        FakeConfig, "add_optimization_profile", lambda self, profile: -1 if self.profiles else real(self, profile)
    )
    two = [[("x", (1, 8, 4), (2, 8, 4), (4, 8, 4))], [("x", (1, 2, 4), (2, 2, 4), (4, 2, 4))]]
    with pytest.raises(BitDanceError, match=r"refused optimisation profile 1 \[\('x', \(1, 2, 4\)"):
        _build(toolkit(fake_trt("10.3.0")), tmp_path, profiles=two)


def _head_step_spec():
    from bitdance_rt.config import load_config

    return tb.st.head_step_stage(load_config("tiny-4x"))


def test_engine_io_is_checked_against_the_contract():
    spec = _head_step_spec()
    good = {t.name: tuple(-1 if isinstance(d, str) else d for d in t.shape) for t in spec.inputs + spec.outputs}
    tb.check_engine_io(None, FakeEngine(good), spec, "x.engine")
    missing = dict(good)
    missing.pop("t")
    with pytest.raises(BitDanceError, match="engine tensors .* are not those of stage head_step"):
        tb.check_engine_io(None, FakeEngine(missing), spec, "x.engine")
    wrong = dict(good, x=(-1, good["x"][1] + 1, good["x"][2]))  # a static dim of another model
    with pytest.raises(BitDanceError, match="engine tensor x has shape"):
        tb.check_engine_io(None, FakeEngine(wrong), spec, "x.engine")
    static = dict(good, x=(8, *good["x"][1:]))  # a static row count where the contract is dynamic: fine
    tb.check_engine_io(None, FakeEngine(static), spec, "x.engine")


def test_cache_views_must_be_256_byte_aligned():
    import torch

    from bitdance_rt.config import load_config

    cfg = load_config("tiny-4x")
    kv = torch.zeros(tb.st.kv_shape(cfg, 2))
    if kv.data_ptr() % 256 == 0:
        tb.check_alignment(kv, cfg)
    flat = torch.zeros(kv.numel() + 1)
    shifted = flat[1:].view(kv.shape)  # 4 bytes off
    with pytest.raises(BitDanceError, match="not 256-byte aligned"):
        tb.check_alignment(shifted, cfg)


def test_put_goes_through_the_pinned_twin():
    """Per-call values reach the fixed device buffer through its host twin (an async copy), the
    buffer keeps its address, and device values are copied directly."""
    import torch

    call = object.__new__(tb._Call)
    call.buffers = {"start": torch.zeros(4, dtype=torch.int64), "cond": torch.zeros(2, 3)}
    call.staging = {"start": torch.zeros(4, dtype=torch.int64)}
    address = call.buffers["start"].data_ptr()
    call.put("start", torch.tensor([5, 9, 13, 5]))
    assert call.buffers["start"].tolist() == [5, 9, 13, 5] and call.staging["start"].tolist() == [5, 9, 13, 5]
    assert call.buffers["start"].data_ptr() == address
    call.put("cond", torch.ones(6))
    assert call.buffers["cond"].shape == (2, 3) and call.buffers["cond"].sum() == 6


# ---- the backbone: one engine, one profile per phase ---------------------------------------------


def test_backbone_engine_gets_one_profile_per_phase_in_order(tmp_path):
    """TensorRT.build adds one optimisation profile per phase, in profile_phases order, each with the
    contract's shapes of that phase (prefill: seq = prefix_len, step: seq = P), all in one engine."""
    from bitdance_rt.engines.profiles import stage_profile, stage_profiles

    cfg, specs = _tiny_specs()
    spec = specs[tb.st.BACKBONE]
    trt = fake_trt("10.3.0")
    _build(toolkit(trt), tmp_path, profiles=stage_profiles(spec))
    assert len(trt.built) == 1 and spec.profile_phases == ["prefill", "step"]
    got = [p.shapes for p in trt.config.profiles]
    assert got == [stage_profile(spec, "prefill"), stage_profile(spec, "step")]
    rows = spec.dims["rows"]
    for shapes, seq in zip(got, (cfg.prefix_len, cfg.parallel_num)):
        x = dict((n, (lo, opt, hi)) for n, lo, opt, hi in shapes)["x"]
        assert x == ((rows.min, seq, cfg.dim), (rows.opt, seq, cfg.dim), (rows.max, seq, cfg.dim))
    assert [n for n, *_ in got[0]] == spec.input_names  # every input has the dynamic rows dim


def _generate_steps(backend, steps=2, ar_steps=3):
    cfg = backend.config
    p, c = cfg.parallel_num, cfg.token_dim
    backend.prefill(torch.tensor([1, 2, cfg.num_classes, cfg.num_classes]))  # 2 images with CFG: 4 rows
    for i in range(1, ar_steps):
        backend.step(torch.ones(4, p, c), i)
    return backend.sample_tokens(torch.zeros(4, p, cfg.dim), torch.zeros(steps + 1, 2, p, c), 3.0, True)


def _backbone_call(backend, phase):
    (call,) = [c for c in backend._calls.values() if c.stage == tb.st.BACKBONE and c.phase == phase]
    return call


def test_prefill_on_profile_0_step_on_profile_1(monkeypatch, tmp_path):
    backend, log, _ = _fake_backend(monkeypatch, tmp_path)
    _generate_steps(backend)
    prefill, step = _backbone_call(backend, "prefill"), _backbone_call(backend, "step")
    assert prefill.context is not step.context  # two contexts of ONE engine (its weights once)
    assert {id(prefill.context), id(step.context)} <= {id(c) for c in backend.engines[tb.st.BACKBONE].contexts}
    assert (prefill.context.selected, prefill.context.profile) == ([0], 0)
    assert (step.context.selected, step.context.profile) == ([1], 1)
    cfg = backend.config
    assert prefill.context.shapes["x"] == (4, cfg.prefix_len, cfg.dim)
    assert step.context.shapes["x"] == (4, cfg.parallel_num, cfg.dim)
    runs = [(stage, profile) for stage, profile, _ in log if isinstance(stage, str) and stage == tb.st.BACKBONE]
    assert runs[0] == (tb.st.BACKBONE, 0) and set(runs[1:]) == {(tb.st.BACKBONE, 1)}
    with pytest.raises(BitDanceError, match="phase step"):  # a prefill-sized call is no step
        backend._run(
            tb.st.BACKBONE,
            {
                "x": torch.zeros(4, cfg.prefix_len, cfg.dim),
                "start": torch.zeros(4, dtype=torch.int64),
                **backend._cache_feeds(4),
            },
            phase="step",
        )


def test_only_step_phase_calls_are_graph_captured(monkeypatch, tmp_path):
    backend, log, graphs = _fake_backend(monkeypatch, tmp_path)
    _generate_steps(backend, ar_steps=4)
    captured = {(stage, phase) for stage, phase, _ in backend.captures}
    assert captured == {(tb.st.TOKEN_EMBED, None), (tb.st.BACKBONE, "step"), (tb.st.HEAD_SAMPLER, None)}
    assert _backbone_call(backend, "prefill").graph is None  # the prefill runs eagerly, never captured
    assert not [1 for stage, _, capturing in log if capturing and stage == tb.st.PREFIX_EMBED]
    step = _backbone_call(backend, "step")
    assert step.graph.replays == 2 and step.calls == 3  # eager warm-up + capture, then replays
    plain, _, _ = _fake_backend(monkeypatch, tmp_path / "plain", cuda_graphs=False)
    _generate_steps(plain)
    assert plain.captures == []


def test_embeddings_stay_on_the_device_buffers(monkeypatch, tmp_path):
    """The backbone reads the embedding stage's output buffer in place: no copy, no host round trip."""
    backend, _, _ = _fake_backend(monkeypatch, tmp_path)
    _generate_steps(backend)
    calls = {c.stage: c for c in backend._calls.values() if c.stage != tb.st.BACKBONE}
    prefill, step = _backbone_call(backend, "prefill"), _backbone_call(backend, "step")
    assert prefill.buffers["x"] is calls[tb.st.PREFIX_EMBED].buffers["x"]
    assert step.buffers["x"] is calls[tb.st.TOKEN_EMBED].buffers["x"]
    assert "x" not in step.staging and "x" not in prefill.staging
    assert step.context.addresses["x"] == calls[tb.st.TOKEN_EMBED].context.addresses["x"]
    out = backend._run(
        tb.st.TOKEN_EMBED, {"tokens": torch.ones(4, backend.config.parallel_num, backend.config.token_dim)}
    )
    assert out["x"] is calls[tb.st.TOKEN_EMBED].buffers["x"]  # handed back as the device buffer
    # another x (not our buffer) is copied into the bound buffer, which keeps its address
    address = step.buffers["x"].data_ptr()
    step.put("x", torch.full(tuple(step.buffers["x"].shape), 2.0))
    assert step.buffers["x"].data_ptr() == address and float(step.buffers["x"].mean()) == 2.0


def test_head_step_is_deserialised_only_when_needed(monkeypatch, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="bitdance_rt")
    backend, _, _ = _fake_backend(monkeypatch, tmp_path, steps=2)
    runtime = backend._runtime
    assert tb.st.HEAD_STEP not in runtime.loaded and tb.st.HEAD_STEP not in backend.engines
    assert backend.has_stage(tb.st.HEAD_STEP)  # built, so the sampler choice still sees it
    _generate_steps(backend, steps=2)  # S = the fused graph's: head_sampler serves
    assert tb.st.HEAD_STEP not in runtime.loaded
    cfg = backend.config
    p, c = cfg.parallel_num, cfg.token_dim
    backend.sample_tokens(torch.zeros(4, p, cfg.dim), torch.zeros(4, 2, p, c), 3.0, True)  # S = 3: head_step
    backend.sample_tokens(torch.zeros(4, p, cfg.dim), torch.zeros(4, 2, p, c), 3.0, True)
    assert runtime.loaded.count(tb.st.HEAD_STEP) == 1 and tb.st.HEAD_STEP in backend.engines
    assert any("head_step: loading its engine" in line for line in caplog.messages)
    assert sorted(runtime.loaded) == sorted(backend.specs)  # every other engine once, at load


@pytest.mark.parametrize("sampler, lazy", [("auto", {"head_step"}), ("fused", {"head_step"}), ("step", set())])
def test_lazy_stages(sampler, lazy):
    _, specs = _tiny_specs()
    assert tb.lazy_stages(sampler, specs) == lazy
    assert tb.lazy_stages(sampler, {k: v for k, v in specs.items() if k != tb.st.HEAD_SAMPLER}) == set()


def test_step_sampler_loads_head_step_at_start(monkeypatch, tmp_path):
    backend, _, _ = _fake_backend(monkeypatch, tmp_path, sampler="step")
    assert sorted(backend._runtime.loaded) == sorted(backend.specs)


def test_lazily_loaded_engine_larger_than_the_scratch_gets_its_own(monkeypatch, tmp_path):
    def engine(spec, profiles, log):
        return FakeTrtEngine(spec, profiles, log, memory=1 << 16 if spec.name == tb.st.HEAD_STEP else 4096)

    backend, _, _ = _fake_backend(monkeypatch, tmp_path, make_engine=engine)
    assert backend.scratch.numel() == 4096
    backend._run(
        tb.st.HEAD_STEP,
        {
            "x": torch.zeros(4, backend.config.parallel_num, backend.config.token_dim),
            "t": torch.zeros(4),
            "cond": torch.zeros(4, backend.config.parallel_num, backend.config.dim),
        },
    )
    (call,) = [c for c in backend._calls.values() if c.stage == tb.st.HEAD_STEP]
    assert call.context.memory == (backend._own_scratch[tb.st.HEAD_STEP].data_ptr(), 1 << 16)
    assert backend.scratch.numel() == 4096  # the shared scratch (and its address) did not move


def test_weight_streaming_budget_is_set_on_the_backbone_before_its_contexts(monkeypatch, tmp_path):
    """--weight-streaming-budget: the backbone engine keeps that many bytes of its streamable weights on the
    GPU (ICudaEngine.weight_streaming_budget_v2, set before any context is made), at most all of them; the
    other engines are left alone; an engine built without streaming is refused in one line."""

    def engine(spec, profiles, log):
        return FakeTrtEngine(spec, profiles, log, streamable=1000 if spec.name == tb.st.BACKBONE else 0)

    backend, _, _ = _fake_backend(monkeypatch, tmp_path, make_engine=engine, weight_streaming_budget=300)
    _generate_steps(backend, steps=2)
    backbone = backend.engines[tb.st.BACKBONE]
    assert backbone.weight_streaming_budget_v2 == 300 and backend.streamed_bytes == 700
    assert backbone.contexts and backbone.budget_at_context == 300
    assert all(e.weight_streaming_budget_v2 == -1 for s, e in backend.engines.items() if s != tb.st.BACKBONE)
    backend, _, _ = _fake_backend(monkeypatch, tmp_path / "all", make_engine=engine, weight_streaming_budget=5000)
    assert backend.engines[tb.st.BACKBONE].weight_streaming_budget_v2 == 1000 and backend.streamed_bytes == 0
    with pytest.raises(BitDanceError, match="no streamable weights: build it with weight streaming"):
        _fake_backend(monkeypatch, tmp_path / "resident", weight_streaming_budget=300)
    with pytest.raises(BitDanceError, match="must be >= 0 bytes"):
        _fake_backend(monkeypatch, tmp_path / "negative", make_engine=engine, weight_streaming_budget=-1)


def test_backbone_engine_without_the_phase_profiles_is_refused(monkeypatch, tmp_path):
    """An engine with one profile (or the phases' profiles swapped) cannot serve the contexts' indices."""
    from bitdance_rt.engines.profiles import spanning_profile, stage_profile

    _, specs = _tiny_specs()
    spec = specs[tb.st.BACKBONE]
    one = FakeTrtEngine(spec, [spanning_profile(spec)], [])
    with pytest.raises(BitDanceError, match="1 optimisation profile.*one per phase.*rebuild"):
        tb.check_engine_profiles(one, spec, "backbone.engine")
    swapped = FakeTrtEngine(spec, [stage_profile(spec, "step"), stage_profile(spec, "prefill")], [])
    with pytest.raises(BitDanceError, match="profile 0 gives x .* phase prefill"):
        tb.check_engine_profiles(swapped, spec, "backbone.engine")
    tb.check_engine_profiles(
        FakeTrtEngine(spec, [stage_profile(spec, "prefill"), stage_profile(spec, "step")], []), spec, "backbone.engine"
    )
    tb.check_engine_profiles(one, specs[tb.st.DECODER], "decoder.engine")  # no phases: nothing to check


def test_refused_profile_selection_is_an_error():
    class Old:  # bindings that raise instead of returning False
        def set_optimization_profile_async(self, index, stream):
            raise RuntimeError("Error in set optimization profile async.\nmore")

    with pytest.raises(BitDanceError, match=r"backbone: TensorRT refused optimisation profile 1 \(Error in set"):
        tb._select_profile(Old(), 1, 7, "backbone")
    no = SimpleNamespace(set_optimization_profile_async=lambda index, stream: False)
    with pytest.raises(BitDanceError, match="returned False"):
        tb._select_profile(no, 1, 7, "backbone")


def test_text_to_image_runs_on_the_tensorrt_backend(monkeypatch, tmp_path):
    """Text-to-image on TrtBackend (fake engines, the tiny Qwen3 checkpoint's contract): prefix_embed
    gets the ids, the backbone each row's pad and position at the prefill and at every step, and the
    cache it reads has the GQA kv heads; the embeddings stay in place."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from t2i_tiny import write_checkpoint

    from bitdance_rt.t2i.config import read_checkpoint_config

    cfg = read_checkpoint_config(write_checkpoint(tmp_path / "ckpt"), 512, 512, 12)
    backend, log, _ = _fake_backend(monkeypatch, tmp_path / "engines", cfg=cfg)
    p, c = cfg.parallel_num, cfg.token_dim
    ids = torch.randint(0, cfg.llm.vocab_size, (4, cfg.prefix_len), generator=torch.Generator().manual_seed(0))
    pad = torch.tensor([3, 0, 5, 5])
    backend.prefill({"ids": ids, "pad": pad})
    for i in (1, 2):
        backend.step(torch.ones(4, p, c), i)
    calls = {(k.stage, k.phase): k for k in backend._calls.values()}
    assert torch.equal(calls[(tb.st.PREFIX_EMBED, None)].buffers["ids"], ids)
    prefill, step = calls[(tb.st.BACKBONE, "prefill")], calls[(tb.st.BACKBONE, "step")]
    assert torch.equal(prefill.buffers["pad"], pad) and not prefill.buffers["start"].any()
    assert torch.equal(step.buffers["pad"], pad)
    assert step.buffers["start"].tolist() == [tb.st.step_start(cfg, 2)] * 4
    assert calls[(tb.st.TOKEN_EMBED, None)].context.shapes == {"tokens": (4, p, c)}
    assert prefill.buffers["x"] is calls[(tb.st.PREFIX_EMBED, None)].buffers["x"]
    key = step.buffers[tb.st.cache_input_names(cfg)[0]]
    assert key.shape == (4, cfg.n_kv_head, cfg.max_seq_len, cfg.head_dim) and cfg.n_kv_head < cfg.n_head
    with pytest.raises(BitDanceError, match="pad must lie"):
        backend.prefill({"ids": ids, "pad": torch.tensor([0, 0, 0, cfg.max_text_tokens + 1])})

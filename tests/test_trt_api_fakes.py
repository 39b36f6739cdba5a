"""The TensorRT / Polygraphy calls of the builder, the backend and `check`, on CPU: fakes that model
the Python bindings of TensorRT 10.3 and 11.1 (python/src/infer/pyCore.cpp at those tags of
github.com/NVIDIA/TensorRT) and Polygraphy 0.49 / later return types check which names are called,
with which arguments, and what happens when TensorRT says no."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest

from bitdance_rt.engines import build as eb
from bitdance_rt.engines.options import plan_precision
from bitdance_rt.errors import BitDanceError


# ---- a fake `tensorrt` module --------------------------------------------------------------
class FakeCache:
    def __init__(self, entries, device="here"):
        self.entries, self.device = set(entries), device

    def combine(self, other, ignore_mismatch):
        assert ignore_mismatch is False
        if other.device != self.device:
            return False
        self.entries |= other.entries
        return True

    def serialize(self):
        return f"{self.device}:{','.join(sorted(self.entries))}".encode()


def _parse_cache(blob: bytes):
    """Blob -> cache, None for a blob TensorRT cannot read (createTimingCache may return nullptr)."""
    if not blob:
        return FakeCache(())
    text = bytes(blob).decode(errors="replace")
    if ":" not in text:
        return None
    device, entries = text.split(":", 1)
    return FakeCache([e for e in entries.split(",") if e], device)


class FakeConfig:
    def __init__(self, trt):
        self.trt, self.flags, self.pools, self.profiles, self.cache = trt, {"TF32"}, {}, [], None
        self.builder_optimization_level = 3

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.flags.discard(flag)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, blob):
        return _parse_cache(blob)

    def set_timing_cache(self, cache, ignore_mismatch):
        assert isinstance(cache, FakeCache), "TensorRT takes an ITimingCache, not None"
        if cache.device != "here" and not ignore_mismatch:
            return False
        self.cache = cache
        return True


class FakeParser:
    def __init__(self, network, logger, errors=()):
        self.errors = list(errors)

    def parse_from_file(self, path):
        return not self.errors

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, i):
        return self.errors[i]


def fake_trt(version="10.3.0", parser_errors=(), build_ok=True):
    """The names engines.build uses, as the 10.3 or 11.1 bindings define them."""
    major = int(version.split(".")[0])
    trt = SimpleNamespace(__version__=version, built=[])
    if major >= 11:  # kSTRONGLY_TYPED = 0 (deprecated, ignored); no kEXPLICIT_BATCH, no FP16/INT8 flags
        trt.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=0, PREFER_AOT_PYTHON_PLUGINS=2,
                                                            PREFER_JIT_PYTHON_PLUGINS=1)
        trt.BuilderFlag = SimpleNamespace(TF32="TF32", REFIT="REFIT")
    else:
        trt.NetworkDefinitionCreationFlag = SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=1)
        trt.BuilderFlag = SimpleNamespace(FP16="FP16", INT8="INT8", TF32="TF32", REFIT="REFIT")
    trt.MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            trt.network_flags = flags
            return SimpleNamespace(flags=flags)

        def create_builder_config(self):
            trt.config = FakeConfig(trt)
            return trt.config

        def create_optimization_profile(self):
            shapes = []
            return SimpleNamespace(shapes=shapes,
                                   set_shape=lambda name, lo, mid, hi: shapes.append((name, lo, mid, hi)))

        def build_serialized_network(self, network, config):
            if not build_ok:
                return None
            if config.cache is not None:
                config.cache.entries.add("new")  # the build adds its timings to the attached cache
            trt.built.append((network.flags, set(config.flags)))
            return memoryview(b"plan")  # IHostMemory has the buffer protocol

    trt.Builder = Builder
    trt.OnnxParser = lambda network, logger: FakeParser(network, logger, parser_errors)
    return trt


def toolkit(trt) -> eb.TensorRT:
    tk = object.__new__(eb.TensorRT)  # no GPU query: only the build path is exercised
    tk.trt, tk.version, tk.logger, tk.gpu = trt, trt.__version__, object(), eb.GpuInfo("Fake", "8.7")
    return tk


def _build(tk, tmp_path, graph="fp32", asked=None, timing=True):
    plan = plan_precision(graph, asked, tk.version)
    profile = [("labels", (1,), (2,), (4,))]
    cache = tmp_path / "timing.cache" if timing else None
    return tk.build(tmp_path / "x.onnx", plan, profile, 1 << 20, 3, cache)


# ---- builder -------------------------------------------------------------------------------
def test_trt10_strongly_typed_fp32_clears_tf32(tmp_path):
    trt = fake_trt("10.3.0")
    assert _build(toolkit(trt), tmp_path) == b"plan"
    flags, builder_flags = trt.built[0]
    assert flags == 1 << 1  # 1 << kSTRONGLY_TYPED (= 1 in 10.x); no EXPLICIT_BATCH
    assert "TF32" not in builder_flags and "FP16" not in builder_flags
    assert trt.config.pools == {"WORKSPACE": 1 << 20} and trt.config.builder_optimization_level == 3
    assert trt.config.profiles[0].shapes == [("labels", (1,), (2,), (4,))]


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


@pytest.mark.parametrize("on_disk, expect", [
    (None, "here:new"),                       # first build: a fresh cache, saved
    (b"here:a,b", "here:a,b,new"),            # same device: reused and extended
    (b"other-gpu:z", "here:new"),             # another device: set_timing_cache is False -> fresh, replaces it
    (b"\x00garbage", "here:new"),             # unreadable: create_timing_cache gives None -> fresh
])
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


class Strategy:
    STATIC, ON_PROFILE_CHANGE, USER_MANAGED = "STATIC", "ON_PROFILE_CHANGE", "USER_MANAGED"


def test_user_managed_context_on_10_3_and_11_1():
    trt = SimpleNamespace(ExecutionContextAllocationStrategy=Strategy)
    made = []
    engine = SimpleNamespace(create_execution_context=lambda strategy=Strategy.STATIC: made.append(strategy) or "ctx")
    assert tb._create_context(trt, engine) == "ctx" and made == ["USER_MANAGED"]

    class RuntimeConfigOnly:  # a binding that takes only an IRuntimeConfig
        def create_runtime_config(self):
            return SimpleNamespace(strategy=None, set_execution_context_allocation_strategy=lambda s: setattr(
                self, "strategy", s))

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


class FakeContext:
    def __init__(self, capturable=True):
        self.capturable, self.enqueued, self.capturing = capturable, 0, False

    def execute_async_v3(self, stream_handle):
        assert isinstance(stream_handle, int)
        self.enqueued += 1
        return self.capturable or not self.capturing


class FakeGraph:
    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


def _call(monkeypatch, context, invalidate=False):
    """A _Call for backbone_step with fake torch.cuda graph/stream objects (no GPU needed)."""
    logs, graphs = [], []

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

    def new_graph():
        graphs.append(FakeGraph())
        return graphs[-1]

    monkeypatch.setattr(torch.cuda, "graph", graph_ctx)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", new_graph)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    backend = SimpleNamespace(stream=SimpleNamespace(cuda_stream=1234, synchronize=lambda: None), cuda_graphs=True,
                              captures=[], log=logs.append)
    call = object.__new__(tb._Call)
    call.stage, call.backend, call.context, call.host_shape_inputs = tb.st.BACKBONE_STEP, backend, context, False
    call.after, call.graph, call.capture_failed, call.calls = None, None, False, 0
    call.key = (call.stage, (("rows", 2),))
    writes = []
    call.after = lambda: writes.append(context.capturing)
    return call, backend, logs, graphs, writes


def test_graph_capture_after_one_eager_enqueue(monkeypatch):
    ctx = FakeContext()
    call, backend, logs, graphs, writes = _call(monkeypatch, ctx)
    call.run()
    assert ctx.enqueued == 2 and writes == [False, True]  # eager warm-up, then the captured enqueue + cache write
    assert call.graph is graphs[0] and backend.captures == [call.key] and not logs
    call.run()
    call.run()
    assert graphs[0].replays == 2 and ctx.enqueued == 2


@pytest.mark.parametrize("invalidate", [False, True])
def test_uncapturable_engine_runs_eagerly(monkeypatch, invalidate):
    ctx = FakeContext(capturable=invalidate)  # enqueue refuses under capture, or the capture is invalidated
    call, backend, logs, graphs, writes = _call(monkeypatch, ctx, invalidate=invalidate)
    call.run()
    assert call.graph is None and call.capture_failed and backend.captures == []
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
    with pytest.raises(BitDanceError, match="refused the optimisation profile"):
        _build(toolkit(trt), tmp_path)


class FakeEngine:
    def __init__(self, tensors):
        self.tensors = tensors  # name -> shape (-1 for a dynamic dim)

    @property
    def num_io_tensors(self):
        return len(self.tensors)

    def get_tensor_name(self, i):
        return list(self.tensors)[i]

    def get_tensor_shape(self, name):
        return self.tensors[name]


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

"""Fakes of the TensorRT and CUDA Python APIs, for tests/test_trt_api_fakes.py: a `tensorrt` module
with the names engines.build calls, as the 10.3 and 11.1 bindings define them (python/src/infer/pyCore.cpp
at those tags of github.com/NVIDIA/TensorRT); the runtime's execution contexts, engines and CUDA-graph
stand-ins; and a TrtBackend over fake engines on the CPU.

Nothing here imports torch at import time (the builder's tests run without it): the helpers that need
it import it when called."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

from bitdance_rt.engines import build as eb
from bitdance_rt.engines.options import plan_precision


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
        trt.NetworkDefinitionCreationFlag = SimpleNamespace(
            STRONGLY_TYPED=0, PREFER_AOT_PYTHON_PLUGINS=2, PREFER_JIT_PYTHON_PLUGINS=1
        )
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
            return SimpleNamespace(
                shapes=shapes, set_shape=lambda name, lo, mid, hi: shapes.append((name, lo, mid, hi))
            )

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


def _build(tk, tmp_path, graph="fp32", asked=None, timing=True, profiles=None):
    plan = plan_precision(graph, asked, tk.version)
    profiles = [[("labels", (1,), (2,), (4,))]] if profiles is None else profiles
    cache = tmp_path / "timing.cache" if timing else None
    return tk.build(tmp_path / "x.onnx", plan, profiles, 1 << 20, 3, cache)


# ---- the runtime side: execution contexts, CUDA graphs, engines ----------------------------------------
class Strategy:
    STATIC, ON_PROFILE_CHANGE, USER_MANAGED = "STATIC", "ON_PROFILE_CHANGE", "USER_MANAGED"


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


def _patch_cuda_graphs(monkeypatch, graph_ctx, graphs: list) -> None:
    """torch.cuda's graph capture as stand-ins: `graph_ctx` for torch.cuda.graph, FakeGraphs into `graphs`."""
    import torch

    def new_graph():
        graphs.append(FakeGraph())
        return graphs[-1]

    monkeypatch.setattr(torch.cuda, "graph", graph_ctx)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", new_graph)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())


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


# ---- a TrtBackend over fake engines -----------------------------------------------------------------
def _tiny_specs(steps=2, cfg=None):
    from bitdance_rt.config import load_config
    from bitdance_rt.runtime import trt_backend as tb

    cfg = cfg or load_config("tiny-4x")
    return cfg, tb.st.stage_specs(cfg, tb.st.GENERATION_STAGES, steps, tb.st.Limits(max_batch=4, opt_batch=2))


class FakeStream:
    cuda_stream = 1234

    def synchronize(self):
        pass

    def wait_stream(self, other):
        pass


class FakeExecContext:
    """IExecutionContext as TensorRT checks it: shapes are checked against the SELECTED profile, and a
    profile is selected before any shape is set."""

    def __init__(self, engine, log):
        self.engine, self.log = engine, log
        self.profile, self.selected, self.shapes, self.addresses, self.capturing = 0, [], {}, {}, False

    def set_optimization_profile_async(self, index, stream_handle):
        assert isinstance(stream_handle, int) and not self.shapes, "select the profile before any shape"
        self.selected.append(index)
        if not 0 <= index < self.engine.num_optimization_profiles:
            return False
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.get_tensor_profile_shape(name, self.profile)
        if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        spec, dims = self.engine.spec, {}
        for n, shape in self.shapes.items():
            dims = spec.match(n, shape, known=dims)
        return spec.shape(name, **dims)

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return True

    def set_device_memory(self, address, size):
        self.memory = (address, size)

    def execute_async_v3(self, stream_handle):
        self.log.append((self.engine.spec.name, self.profile, self.capturing))
        return True


class FakeTrtEngine:
    """ICudaEngine of one stage, with the profiles the builder was given."""

    def __init__(self, spec, profiles, log, memory=4096, streamable=0):
        self.spec, self.profiles, self.log, self.device_memory_size_v2 = spec, profiles, log, memory
        self.contexts = []
        self.streamable_weights_size = streamable  # (a streamable engine's; 0 for a resident one)
        self.weight_streaming_budget_v2 = -1  # TensorRT's default: no budget set

    @property
    def num_optimization_profiles(self):
        return max(len(self.profiles), 1)

    @property
    def num_io_tensors(self):
        return len(self.spec.inputs) + len(self.spec.outputs)

    def get_tensor_name(self, i):
        return (self.spec.input_names + self.spec.output_names)[i]

    def get_tensor_shape(self, name):
        return tuple(-1 if isinstance(d, str) else d for d in self.spec.tensor(name).shape)

    def get_tensor_dtype(self, name):
        return self.spec.tensor(name).dtype

    def get_tensor_location(self, name):
        return "DEVICE"

    def get_tensor_profile_shape(self, name, index):
        return list(dict((n, (lo, opt, hi)) for n, lo, opt, hi in self.profiles[index])[name])

    def create_execution_context(self, strategy=None):
        assert strategy == Strategy.USER_MANAGED
        self.budget_at_context = self.weight_streaming_budget_v2  # (TensorRT: set before any context)
        self.contexts.append(FakeExecContext(self, self.log))
        return self.contexts[-1]


class FakeRuntime:
    def __init__(self, engines):
        self.engines, self.loaded = engines, []

    def deserialize_cuda_engine(self, blob):
        stage = bytes(blob).decode()
        self.loaded.append(stage)
        return self.engines[stage]


BACKEND_TRT = SimpleNamespace(
    float32="float32",
    float16="float16",
    int32="int32",
    int64="int64",
    bool="bool",
    int8="int8",
    TensorLocation=SimpleNamespace(HOST="HOST", DEVICE="DEVICE"),
    ExecutionContextAllocationStrategy=Strategy,
)


def _fake_backend(
    monkeypatch, tmp_path, sampler="auto", steps=2, cuda_graphs=True, make_engine=None, cfg=None, **backend_options
):
    """A TrtBackend over fake engines on the CPU: every engine has the profiles TensorRT.build (with the
    fake bindings) was given for its stage, torch.cuda's stream / graph calls are stand-ins."""
    import torch

    from bitdance_rt.engines.profiles import stage_profiles
    from bitdance_rt.export.reader import ExportInfo
    from bitdance_rt.runtime import trt_backend as tb

    cfg, specs = _tiny_specs(steps, cfg)
    log, graphs = [], []

    @contextlib.contextmanager
    def graph_ctx(graph, stream=None, capture_error_mode="global", **_):
        for engine in backend.engines.values():
            for c in engine.contexts:
                c.capturing = True
        try:
            yield
        finally:
            for engine in backend.engines.values():
                for c in engine.contexts:
                    c.capturing = False

    _patch_cuda_graphs(monkeypatch, graph_ctx, graphs)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self)
    monkeypatch.setattr(tb, "check_alignment", lambda kv, cfg: None)  # CPU allocations are not 256-aligned
    monkeypatch.setattr(tb, "cuda_device", lambda device: torch.device("cpu"))  # the buffers live on the CPU
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream())
    builder = fake_trt("10.3.0")
    tmp_path.mkdir(parents=True, exist_ok=True)
    engines, paths = {}, {}
    for stage, spec in specs.items():
        _build(toolkit(builder), tmp_path, profiles=stage_profiles(spec), timing=False)
        profiles = [p.shapes for p in builder.config.profiles]
        engines[stage] = (make_engine or FakeTrtEngine)(spec, profiles, log)
        paths[stage] = tmp_path / f"{stage}.engine"
        paths[stage].write_bytes(stage.encode())
    # the engine set a build hands over: the export's contract, one engine file per stage, and the toolkit
    # whose `trt` (here the fake runtime bindings) and logger deserialise them
    export = ExportInfo(tmp_path, {"key": {"sampler_steps": steps}}, cfg, specs, "fp32")
    runtime = FakeRuntime(engines)
    trt = SimpleNamespace(**vars(BACKEND_TRT), Runtime=lambda logger: runtime)
    built = {s: eb.BuiltEngine(s, path, "built", None) for s, path in paths.items()}
    engine_set = eb.EngineSet(export, built, "fp32", SimpleNamespace(trt=trt, logger=object()), device=0)
    backend = tb.TrtBackend(engine_set, sampler=sampler, cuda_graphs=cuda_graphs, **backend_options)
    return backend, log, graphs

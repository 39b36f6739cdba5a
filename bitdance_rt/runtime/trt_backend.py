"""The TensorRT backend: per-stage engines, fixed device buffers, CUDA-graph replay.

(Over 400 lines: engines, buffers and graph replay share one device context and its lifetime;
split apart they would pass that state back and forth.)

It runs stages for the shared core (runtime/core.py: cache slots, cache writes, sampler choice,
row padding) over an EngineSet that engines.build.build_engines built beforehand: the backend takes
artifacts, not build options, and never builds (TrtBackend.from_export does both in one call).
Every call is enqueued on the backend's ONE CUDA stream, which is what lets the contexts of one
profile and one shared scratch buffer coexist: TensorRT asks for neither to be used concurrently.
Keep it so (a second stream would need one profile per concurrent context at build time). The
design, and the NVIDIA sources each call was checked against: docs/tensorrt.md ("The runtime",
"API choices"); the details are at the code they explain.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from .. import stages as st
from ..config import ModelConfig
from ..engines.profiles import HOT_PHASE, dynamic_inputs, profile_index
from ..errors import BitDanceError
from ..export.reader import require_generation_stages
from .core import SAMPLER_MODES, StageBackend

if TYPE_CHECKING:
    from ..engines.build import EngineSet

logger = logging.getLogger(__name__)


def cuda_device(device: str | int | torch.device | None = None) -> torch.device:
    """The CUDA device a backend runs on ("cuda" or None: the current one; "cuda:N" or N), with its
    index, or a one-line error when torch sees no CUDA GPU."""
    if not torch.cuda.is_available():
        raise BitDanceError("--backend tensorrt needs a CUDA GPU, and torch sees none here")
    given = torch.device(f"cuda:{device}" if isinstance(device, int) else device or "cuda")
    if given.type != "cuda":
        raise BitDanceError(f"device {str(given)!r}: TensorRT engines run on a CUDA device (cuda or cuda:N)")
    return torch.device("cuda", given.index if given.index is not None else torch.cuda.current_device())


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.int32: torch.int32,
        trt.int64: torch.int64,
        trt.bool: torch.bool,
        trt.int8: torch.int8,
    }
    bf16 = getattr(trt, "bfloat16", None)
    if bf16 is not None:
        table[bf16] = torch.bfloat16
    if dtype not in table:
        raise BitDanceError(f"TensorRT tensor type {dtype} is not one bitdance-rt binds")
    return table[dtype]


def _create_context(trt, engine):
    """An execution context without its own device memory (the backend supplies the scratch)."""
    strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
    if strategy is not None:
        try:
            return engine.create_execution_context(strategy.USER_MANAGED)  # TensorRT 10.x
        except TypeError:
            make_config = getattr(engine, "create_runtime_config", None)  # TensorRT 11: IRuntimeConfig
            if make_config is not None:
                config = make_config()
                config.set_execution_context_allocation_strategy(strategy.USER_MANAGED)
                return engine.create_execution_context(config)
    return engine.create_execution_context_without_device_memory()  # deprecated in 10.0, kept as last resort


def _device_memory_size(engine) -> int:
    size = getattr(engine, "device_memory_size_v2", None)  # 10.1+; the only one left in 11
    return int(size if size is not None else engine.device_memory_size)


def _on_host(trt, engine, name: str) -> bool:
    """Whether TensorRT wants this I/O tensor in host memory (shape-tensor inputs do):
    ICudaEngine.get_tensor_location, "established at build time" (NvInferRuntime.h). A call with
    such an input (read on the host at enqueue time) is never captured into a CUDA graph."""
    return engine.get_tensor_location(name) == trt.TensorLocation.HOST


def _stream_weights(engine, budget: int, path) -> int:
    """Keep `budget` bytes of `engine`'s streamable weights on the GPU, the rest in host memory, streamed in
    on each run (ICudaEngine.weight_streaming_budget_v2, TensorRT 10.1+; set before any context is made).
    Returns the bytes streamed per run."""
    streamable = int(getattr(engine, "streamable_weights_size", 0) or 0)
    if streamable <= 0:
        raise BitDanceError(
            f"{path}: this engine has no streamable weights: build it with weight streaming "
            "(bitdance-rt build --weight-streaming, or run with --weight-streaming-budget)"
        )
    engine.weight_streaming_budget_v2 = min(int(budget), streamable)
    return streamable - min(int(budget), streamable)


def _set_device_memory(context, ptr: int, size: int) -> None:
    if hasattr(context, "set_device_memory"):  # setDeviceMemoryV2 (10.1+): pointer and size
        context.set_device_memory(ptr, size)
    else:
        context.device_memory = ptr


def _select_profile(context, index: int, stream_handle: int, stage: str) -> None:
    """IExecutionContext.set_optimization_profile_async(profile_index, stream_handle): returns False
    in 10.x / 11.x when TensorRT refuses, older bindings raise RuntimeError instead.

    The backbone is ONE engine with one optimisation profile per phase (stages.backbone_phases:
    0 = prefill, 1 = step), so its weights are held once; each of its contexts selects its phase's
    profile here, once, before its input shapes are set (they are checked against the selected
    profile), and `_run`'s `phase` picks the context."""
    try:
        ok = context.set_optimization_profile_async(index, stream_handle)
    except RuntimeError as exc:
        ok, why = False, (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    else:
        why = "it returned False"
    if not ok:
        raise BitDanceError(
            f"stage {stage}: TensorRT refused optimisation profile {index} ({why}); rebuild the engines for this export"
        )


def _graph_candidate(stage: str, phase: str | None) -> bool:
    """Replayed as a CUDA graph: a graph-capture stage (stages.GRAPH_CAPTURE_STAGES: token_embed, the
    backbone, head_step, the fused head sampler), and of a stage with phases only the step phase
    (the prefill runs once per request: a graph per row count would only cost memory)."""
    return stage in st.GRAPH_CAPTURE_STAGES and phase in (None, HOT_PHASE)


class _Call:
    """One stage at one shape (and phase): its context, static buffers, and (after capture) its CUDA graph.

    One per (stage, phase, rows); the scheduler pads row counts to a few sizes (core.row_bucket), so
    few are made and captured. The context is created with ExecutionContextAllocationStrategy.USER_MANAGED
    and given the backend's shared scratch (`_scratch_for`). Every input and output is a fixed torch
    CUDA tensor bound once with set_tensor_address; a call copies its arguments into the input
    buffers (per-row positions, guidance and noise through pinned host twins, asynchronously) and
    reads the outputs: no allocation per call."""

    def __init__(
        self,
        backend: "TrtBackend",
        stage: str,
        dims: dict[str, int],
        bound: dict[str, torch.Tensor],
        phase: str | None = None,
        shared: dict[str, torch.Tensor] | None = None,
    ):
        """`bound`: inputs given by address that must fit (the cache views); `shared`: inputs given by
        address when dtype and shape fit (another call's output buffer, e.g. the embeddings `x`: an
        embedding stage returns its output buffer, and the backbone context of that phase and row
        count binds that very buffer as its `x` input; no copy, no host round trip, and both
        addresses stay fixed, so captured graphs stay valid)."""
        trt, engine = backend.trt, backend._engine(stage)
        spec = backend.specs[stage]
        self.stage, self.phase, self.backend = stage, phase, backend
        self.profile = profile_index(spec, phase)
        self.context = _create_context(trt, engine)
        if self.context is None:
            raise BitDanceError(f"stage {stage}: TensorRT could not create an execution context")
        _set_device_memory(self.context, *backend._scratch_for(stage))
        if spec.phases:  # before any input shape: the shapes are checked against the selected profile
            _select_profile(self.context, self.profile, backend.stream.cuda_stream, stage)
        self.buffers: dict[str, torch.Tensor] = {}
        self.staging: dict[str, torch.Tensor] = {}
        self.host_shape_inputs = False
        shared = shared or {}
        for t in spec.inputs:
            shape = spec.shape(t.name, **dims)
            if any(d < 0 for d in engine.get_tensor_shape(t.name)):
                if not self.context.set_input_shape(t.name, shape):
                    raise BitDanceError(
                        f"stage {stage}: TensorRT refused shape {list(shape)} for {t.name} (outside "
                        f"the engine's profile {self.profile}; rebuild the engines for this export)"
                    )
            dtype = _torch_dtype(trt, engine.get_tensor_dtype(t.name))
            given = shared.get(t.name)
            if t.name in bound:
                buf = bound[t.name]
                if buf.dtype != dtype or tuple(buf.shape) != shape:
                    raise BitDanceError(f"stage {stage}: engine wants {t.name} as {dtype} {list(shape)}")
            elif _on_host(trt, engine, t.name):
                buf = torch.zeros(shape, dtype=dtype).pin_memory()  # shape tensors are read on the host
                self.host_shape_inputs = True
            elif (
                given is not None
                and given.dtype == dtype
                and tuple(given.shape) == shape
                and given.is_contiguous()
                and given.device == backend.device
            ):
                buf = given  # the producer's fixed output buffer: read in place, never copied
            else:
                buf = torch.zeros(shape, dtype=dtype, device=backend.device)
                # pinned host twin: per-call values (tokens, positions, guidance, noise) go to the fixed
                # device buffer by an asynchronous copy on the stream, never from pageable memory
                self.staging[t.name] = torch.zeros(shape, dtype=dtype).pin_memory()
            self.buffers[t.name] = buf
        for t in spec.outputs:
            shape = tuple(self.context.get_tensor_shape(t.name))
            want = spec.shape(t.name, **dims)
            if shape != want:
                raise BitDanceError(
                    f"stage {stage}: engine output {t.name} has shape {list(shape)}, the contract "
                    f"{list(want)}; rebuild the engines for this export"
                )
            dtype = _torch_dtype(trt, engine.get_tensor_dtype(t.name))
            self.buffers[t.name] = torch.empty(shape, dtype=dtype, device=backend.device)
        for name, buf in self.buffers.items():
            if not self.context.set_tensor_address(name, buf.data_ptr()):
                raise BitDanceError(f"stage {stage}: TensorRT refused the address of {name}")
        self.after = None  # extra work on the stream after the engine (captured with it)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_failed = False  # tried once, the engine cannot be captured: run eagerly
        self.graph_candidate = _graph_candidate(stage, phase)
        self.key = (stage, phase, tuple(sorted(dims.items())))
        self.calls = 0

    def put(self, name: str, value: torch.Tensor) -> None:
        """Input `name` for the next run (on the backend's stream). The host twin is rewritten only
        after the previous run's outputs were read (the backend waits for them), so its last
        asynchronous copy has finished. The bound buffer itself (a shared `x`) needs no copy."""
        buf = self.buffers[name]
        value = torch.as_tensor(value)
        if value.data_ptr() == buf.data_ptr() and value.device == buf.device and value.shape == buf.shape:
            return
        if value.is_cuda:
            buf.copy_(value.reshape(buf.shape))
        elif name in self.staging:
            self.staging[name].copy_(value.reshape(buf.shape))
            buf.copy_(self.staging[name], non_blocking=True)
        else:
            buf.copy_(value.reshape(buf.shape))

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.backend.stream.cuda_stream):
            raise BitDanceError(f"stage {self.stage}: TensorRT execution failed (execute_async_v3)")
        if self.after is not None:
            self.after()

    def run(self) -> None:
        """Run with the inputs already in the buffers. The first call runs eagerly with
        execute_async_v3: it is also the warm-up enqueue TensorRT's developer guide asks for before a
        capture, which does the deferred per-shape work and the setup a profile switch may defer to
        the next enqueue (a context selects its profile once and never switches). Right after it,
        graph candidates are captured once (torch.cuda.CUDAGraph on the same stream, one graph per
        (stage, phase, rows)), and every later call replays the graph."""
        b = self.backend
        with torch.cuda.stream(b.stream):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._enqueue()
                if b.cuda_graphs and self.graph_candidate and not self.host_shape_inputs and not self.capture_failed:
                    self._capture()
        self.calls += 1

    def _capture(self) -> None:
        """Capture as trtexec does (samples/common/sampleInference.cpp, createEnqueueFunction): one
        enqueue "to avoid capturing initialization calls" (the eager run before), stream synchronize,
        capture in thread-local mode (sampleDevice.h: cudaStreamCaptureModeThreadLocal). An enqueue
        that fails under capture means the engine holds operations not permitted in a graph: the
        stage then runs without one."""
        b = self.backend
        b.stream.synchronize()  # the warm-up enqueue has finished (trtexec does the same)
        graph = torch.cuda.CUDAGraph()
        ok, why = False, "execute_async_v3 returned False under capture"
        # Capture on the stream TensorRT enqueues to (torch.cuda.graph's `stream` argument), so the
        # engine's kernels and the cache write land in this graph. Capturing records, it does not run.
        try:
            with torch.cuda.graph(graph, stream=b.stream, capture_error_mode="thread_local"):
                ok = bool(self.context.execute_async_v3(b.stream.cuda_stream))
                if ok and self.after is not None:
                    self.after()
        except RuntimeError as exc:  # capture invalidated (an operation not permitted in a graph)
            ok, why = False, (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if not ok:
            self.capture_failed = True
            logger.info(
                "%s: TensorRT engine cannot be captured into a CUDA graph (%s); it runs without one", self.stage, why
            )
            return
        self.graph = graph
        b.captures.append(self.key)


def lazy_stages(sampler: str, specs) -> set[str]:
    """Stages deserialised on first use: head_step while the fused head sampler serves (as in OrtBackend);
    it is needed only for a step count the fused graph was not exported for, or with sampler "step".
    It is built with the others (its file is in the EngineSet); loading it eagerly would hold the
    head net's weights twice."""
    return {st.HEAD_STEP} if sampler != "step" and st.HEAD_SAMPLER in specs else set()


# outputs handed back as the call's device buffer (valid until that call runs again): the cache rows
# the core writes into the cache, and the embeddings the backbone reads in place
DEVICE_OUTPUTS = ("kv_new", "x")


class TrtBackend(StageBackend):
    """Stages on TensorRT engines, on the device it was given: deserialisation and contexts run inside
    that device's context, so one backend per GPU works (the build runs on it too: from_export and
    backends._trt_backend make it current first)."""

    name = "tensorrt"

    def __init__(
        self,
        engines: EngineSet,
        device: str | int | torch.device | None = None,
        cuda_graphs: bool = True,
        sampler: str = "auto",
        expect_config: ModelConfig | None = None,
        weight_streaming_budget: int | None = None,
    ):
        """Over built engines (engines.build.build_engines): deserialise them and bind their buffers; no
        build happens here. `device`: default the one the engines were built on; `sampler` as OrtBackend's;
        `expect_config`: refuse engines of another model's export; `weight_streaming_budget`: bytes of
        the backbone's weights kept on the GPU (its engine built streamable), the rest streamed per call."""
        if weight_streaming_budget is not None and int(weight_streaming_budget) < 0:
            raise BitDanceError(f"weight streaming budget must be >= 0 bytes, got {weight_streaming_budget}")
        self.weight_streaming_budget = weight_streaming_budget
        self.streamed_bytes = 0
        if sampler not in SAMPLER_MODES:
            raise BitDanceError(f"sampler mode {sampler!r}: use one of {', '.join(SAMPLER_MODES)}")
        self.device = cuda_device(engines.device if device is None else device)
        self.engine_set = engines
        self.export = engines.export
        self.export.check_model(expect_config)
        self.dir = self.export.directory
        require_generation_stages(engines.paths, f"the engines of {self.dir}")
        self.sampler = sampler
        self.manifest, self.config, self.specs = self.export.manifest, self.export.config, self.export.specs
        self.sampler_steps = self.export.sampler_steps
        self.precision = engines.precision
        self.engine_paths = engines.paths
        self.trt = engines.toolkit.trt
        # Deserialisation and context creation run on THIS device: TensorRT uses the thread's current
        # CUDA device, so without the context cuda:1 would get engines loaded on cuda:0.
        with torch.cuda.device(self.device):
            self._runtime = self.trt.Runtime(engines.toolkit.logger)
            self.stream = torch.cuda.Stream(self.device)
        self._load_engines(lazy_stages(sampler, self.specs))
        self.cuda_graphs = bool(cuda_graphs)
        self.captures: list = []
        self._calls: dict = {}
        self._init_core(self.specs[st.BACKBONE].dims["rows"].max)

    @classmethod
    def from_export(
        cls,
        export_dir,
        precision: str | None = None,
        workspace_mb=None,
        engine_root=None,
        device: str | int = "cuda",
        cuda_graphs: bool = True,
        sampler: str = "auto",
        level: int = 3,
        expect_config: ModelConfig | None = None,
        weight_streaming_budget: int | None = None,
    ) -> "TrtBackend":
        """Build (engines missing from the cache, or stale) on `device`, then a backend over them: the
        one-call form for `check` and the tests; backends._trt_backend spells the two steps out."""
        from ..engines.build import build_engines
        from ..export.reader import open_export

        device = cuda_device(device)
        # another model's export, or one that cannot generate, is refused before anything is built
        export = open_export(export_dir, expect_config, generation=True)
        with torch.cuda.device(device):  # TensorRT builds on the current CUDA device
            engines = build_engines(
                export,
                precision,
                workspace_mb,
                level,
                list(export.specs),
                engine_root,
                device=device.index,
                weight_streaming=weight_streaming_budget is not None,
            )
        return cls(
            engines,
            device=device,
            cuda_graphs=cuda_graphs,
            sampler=sampler,
            expect_config=expect_config,
            weight_streaming_budget=weight_streaming_budget,
        )

    def has_stage(self, stage: str) -> bool:
        return stage in self.engine_paths

    def close(self) -> None:
        """Finish the stream's work, then drop CUDA graphs, contexts and engines (in that order)."""
        if getattr(self, "stream", None) is not None:
            self.stream.synchronize()
        self.captures.clear()
        self._calls.clear()
        self.engines = {}
        super().close()

    # ---- engines -------------------------------------------------------------------------
    def _load_engines(self, lazy) -> None:
        """Deserialise every engine but the `lazy` stages'; size the shared scratch to the loaded ones.

        Every context shares ONE scratch buffer, sized to the largest loaded engine's
        device_memory_size_v2 (its largest profile): stages run one after another on the stream, so
        their activations never live at the same time (ICudaEngine.create_execution_context /
        IExecutionContext.set_device_memory; TensorRT 11 also offers IRuntimeConfig for the strategy)."""
        self.engines = {}
        for stage in self.engine_paths:
            if stage not in lazy:
                self._load(stage)
        size = max(_device_memory_size(e) for e in self.engines.values())
        self.scratch = torch.empty(max(size, 256), dtype=torch.uint8, device=self.device)  # shared by all contexts
        self._own_scratch: dict[str, torch.Tensor] = {}  # lazily loaded engines that need more than `scratch`

    def _load(self, stage: str):
        """Deserialise the engine of `stage` (on this backend's device) and check it against the contract:
        its I/O names and static dims, and for a stage with phases its profiles (count and shapes)."""
        path = self.engine_paths[stage]
        blob = self.engine_set.serialized(stage)
        with torch.cuda.device(self.device):
            engine = self._runtime.deserialize_cuda_engine(blob)
        if engine is None:
            raise BitDanceError(f"{path}: TensorRT could not deserialize it (delete it to rebuild)")
        check_engine_io(self.trt, engine, self.specs[stage], path)
        check_engine_profiles(engine, self.specs[stage], path)
        if stage == st.BACKBONE and self.weight_streaming_budget is not None:
            self.streamed_bytes = _stream_weights(engine, self.weight_streaming_budget, path)
        self.engines[stage] = engine
        return engine

    def _engine(self, stage: str):
        if stage not in self.engines:  # head_step: deserialised on first use
            if stage not in self.engine_paths:
                raise BitDanceError(f"{self.dir} has no {stage} stage; re-export with it")
            logger.info("%s: loading its engine (first call)", stage)
            self._load(stage)
        return self.engines[stage]

    def _scratch_for(self, stage: str) -> tuple[int, int]:
        """(address, bytes) of the activation memory for a context of `stage`: the shared scratch, or,
        for a lazily loaded engine needing more, its own (growing the shared one would move the
        address that existing contexts and captured graphs hold)."""
        size = _device_memory_size(self.engines[stage])
        if size <= self.scratch.numel():
            return self.scratch.data_ptr(), self.scratch.numel()
        if stage not in self._own_scratch:
            self._own_scratch[stage] = torch.empty(size, dtype=torch.uint8, device=self.device)
        own = self._own_scratch[stage]
        return own.data_ptr(), own.numel()

    # ---- plumbing ------------------------------------------------------------------------
    def _alloc_cache(self, rows: int) -> torch.Tensor:
        """The whole cache at once (all max_rows slots, [n_layer, 2, max rows, heads, L, hd]): its address
        never changes, so the engines' bound cache inputs and every captured CUDA graph stay valid. It is
        bound to the per-layer `cache.{i}.key/value` inputs by address (read only, no aliasing with any
        output; each view 256-byte aligned, checked); the core writes `kv_new` into each row's slot and
        position after the engine."""
        kv = torch.zeros(st.kv_shape(self.config, self.max_rows), dtype=torch.float32, device=self.device)
        check_alignment(kv, self.config)
        return kv

    def _own_output(self, value) -> bool:
        """Whether `value` is an output buffer of one of our calls (fixed address: safe to bind)."""
        if not isinstance(value, torch.Tensor):
            return False
        return any(value is c.buffers.get(t.name) for c in self._calls.values() for t in self.specs[c.stage].outputs)

    def _call(self, stage: str, dims: dict[str, int], phase: str | None = None, feeds: dict | None = None) -> _Call:
        key = (stage, phase, tuple(sorted(dims.items())))
        if key not in self._calls:
            bound = self._cache_feeds(dims["rows"]) if stage == st.BACKBONE else {}  # by address, read only
            shared = {k: v for k, v in (feeds or {}).items() if k not in bound and self._own_output(v)}
            with torch.cuda.device(self.device):
                self._calls[key] = _Call(self, stage, dims, bound, phase, shared)
        return self._calls[key]

    def _phase(self, spec: st.StageSpec, dims: dict, phase: str | None) -> str | None:
        """The profile's phase of a call: the one asked (its sizes checked), else the one `dims` imply."""
        if not spec.phases:
            if phase is not None:
                raise BitDanceError(f"stage {spec.name} has no phases, got phase {phase!r}")
            return None
        if phase is None:
            return spec.phase_of(dims)
        if phase not in spec.phases:
            raise BitDanceError(f"stage {spec.name} has phases {', '.join(spec.phases)}, not {phase!r}")
        wrong = {s: dims.get(s) for s, v in spec.phases[phase].items() if dims.get(s) != v}
        if wrong:
            raise BitDanceError(f"stage {spec.name}, phase {phase}: {wrong} where the phase has {spec.phases[phase]}")
        return phase

    def _run(self, stage: str, feeds: dict, phase: str | None = None) -> dict:
        """Copy the inputs into the call's fixed device buffers (through pinned host memory; an input
        that is already its buffer stays), run (or replay) it on our stream; outputs: kv_new and x as
        the device buffers, the rest copied to the host."""
        spec = self.specs[stage]
        dims: dict = {}
        for t in spec.inputs:
            dims = spec.match(t.name, feeds[t.name].shape, known=dims)
        phase = self._phase(spec, dims, phase)
        call = self._call(stage, dims, phase, feeds)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # inputs made on the caller's stream
        with torch.cuda.stream(self.stream):
            for t in spec.inputs:
                if not t.name.startswith("cache."):
                    call.put(t.name, feeds[t.name])
        call.run()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return {
            t.name: call.buffers[t.name] if t.name in DEVICE_OUTPUTS else call.buffers[t.name].float().cpu()
            for t in spec.outputs
        }


def check_engine_io(trt, engine, spec: st.StageSpec, path) -> None:
    """The engine's I/O tensors are the contract's, with its static dims: a mismatch would make a
    bound buffer too small, and TensorRT would read or write out of bounds without a word."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    want = spec.input_names + spec.output_names
    if sorted(names) != sorted(want):
        raise BitDanceError(
            f"{path}: engine tensors {sorted(names)} are not those of stage {spec.name} "
            f"({sorted(want)}); rebuild the engines for this export"
        )
    for t in spec.inputs + spec.outputs:
        got = tuple(engine.get_tensor_shape(t.name))
        if len(got) != len(t.shape) or any(isinstance(w, int) and g not in (w, -1) for g, w in zip(got, t.shape)):
            raise BitDanceError(
                f"{path}: engine tensor {t.name} has shape {list(got)}, the contract "
                f"{list(t.shape)}; rebuild the engines for this export"
            )


def check_engine_profiles(engine, spec: st.StageSpec, path) -> None:
    """A stage with phases needs its engine's profile k to be phase k's (the contexts select profiles
    by index): the count always, the shapes where the binding reports them (get_tensor_profile_shape)."""
    if not spec.phases:
        return
    phases = spec.profile_phases
    count = int(getattr(engine, "num_optimization_profiles", len(phases)))
    if count != len(phases):
        raise BitDanceError(
            f"{path}: engine has {count} optimisation profile(s), stage {spec.name} one per phase "
            f"({', '.join(phases)}); rebuild the engines for this export"
        )
    shapes = getattr(engine, "get_tensor_profile_shape", None)
    if shapes is None:
        return
    for k, phase in enumerate(phases):
        for name in dynamic_inputs(spec):
            got = tuple(tuple(int(d) for d in dims) for dims in shapes(name, k))
            if got != spec.profile(name, phase):
                raise BitDanceError(
                    f"{path}: profile {k} gives {name} min/opt/max {[list(d) for d in got]}, phase "
                    f"{phase} of stage {spec.name} {[list(d) for d in spec.profile(name, phase)]}; "
                    "rebuild the engines for this export"
                )


def check_alignment(kv: torch.Tensor, cfg) -> None:
    """TensorRT wants bound addresses 256-byte aligned; every per-layer cache view starts at a
    multiple of rows x heads x L x head_dim floats from the (aligned) allocation."""
    for i in range(cfg.n_layer):
        for part in (0, 1):
            if kv[i, part].data_ptr() % 256:
                raise BitDanceError(
                    f"KV-cache view of layer {i} is not 256-byte aligned "
                    f"({kv[i, part].data_ptr() % 256} bytes off): TensorRT cannot bind it"
                )

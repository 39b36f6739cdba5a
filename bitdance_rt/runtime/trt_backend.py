"""The TensorRT backend: per-stage engines, static device buffers, CUDA-graph replay.

Implements the Backend calls (prefill, step, sample_tokens, decode) like the ONNX Runtime backend,
over engines from bitdance_rt.engines.build (built into the engine cache when missing or stale).

Memory and execution (one CUDA stream, torch CUDA tensors as the device buffers):
- one execution context per (stage, dims) shape, created with
  ExecutionContextAllocationStrategy.USER_MANAGED, all sharing ONE scratch buffer sized to the
  largest engine's device_memory_size_v2: stages run one after another on the stream, so their
  activations never live at the same time (TensorRT Python API, ICudaEngine.create_execution_context /
  IExecutionContext.set_device_memory; TensorRT 11 also offers IRuntimeConfig for the strategy);
- every input and output is a static torch CUDA tensor bound once with set_tensor_address; a call
  copies its arguments into the input buffers and reads the outputs: no allocation per call;
- the KV cache [n_layer, 2, rows, heads, L, hd] is one static buffer per row count, bound to the
  per-layer `cache.{i}.key/value` inputs by address (read only, no aliasing with any output);
  backbone_step returns `kv_new`, which is written into the cache at [start, start+P) with
  index_copy_ on a static device index, so that write is captured into the same CUDA graph;
- per-step scalars (`start`, `cfg`) and the sampler noise live in fixed device buffers;
- backbone_step, head_step and the fused head samplers are run once with execute_async_v3
  (warm-up; TensorRT's developer guide asks for one enqueue before capture, which does the
  deferred per-shape work), then captured with torch.cuda.CUDAGraph on the same stream, one graph
  per (stage, dims), and replayed on every later call. An engine whose input is a shape tensor
  (host memory, read at enqueue time) is never captured.

Checked against NVIDIA's sources (github.com/NVIDIA/TensorRT, tags v10.3.0 and v11.1):
- contexts sharing profile 0: "The newly created execution context will be assigned optimization
  profile 0" (ICudaEngine::createExecutionContext, NvInferRuntime.h, 10.3 and 11.1); the 8.x rule
  that only one context may hold a profile ("no other execution contexts assigned to optimization
  profile 0") was deprecated in 8.6 and dropped in 9.0. Device memory "in use from the invocation of
  enqueueV3() until network execution is complete" (setDeviceMemoryV2), so sharing one scratch is
  safe as long as contexts never run concurrently: here they are all enqueued on one stream.
- graph capture follows trtexec (samples/common/sampleInference.cpp, createEnqueueFunction): one
  enqueue "to avoid capturing initialization calls", stream synchronize, capture in thread-local mode
  (sampleDevice.h: cudaStreamCaptureModeThreadLocal); an enqueue that fails under capture means the
  engine holds operations not permitted in a graph, and the stage then runs without one.
- USER_MANAGED contexts: create_execution_context(strategy) exists in 10.3 and 11.1 (pyCore.cpp);
  create_execution_context_without_device_memory and device_memory_size are gone in 11.x.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import stages as st
from ..config import ModelConfig
from ..errors import BitDanceError
from ..export.manifest import MANIFEST, manifest_config, manifest_specs, read_manifest
from ..sampling import sample_tokens
from .ort_backend import REQUIRED, SAMPLER_MODES, _architecture

GRAPH_STAGES = (st.BACKBONE_STEP, st.HEAD_STEP, st.HEAD_SAMPLER_UNGUIDED, st.HEAD_SAMPLER_GUIDED)


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int64: torch.int64, trt.bool: torch.bool, trt.int8: torch.int8}
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
    ICudaEngine.get_tensor_location, "established at build time" (NvInferRuntime.h)."""
    return engine.get_tensor_location(name) == trt.TensorLocation.HOST


def _set_device_memory(context, ptr: int, size: int) -> None:
    if hasattr(context, "set_device_memory"):  # setDeviceMemoryV2 (10.1+): pointer and size
        context.set_device_memory(ptr, size)
    else:
        context.device_memory = ptr


class _Call:
    """One stage at one shape: its context, static buffers, and (after capture) its CUDA graph."""

    def __init__(self, backend: "TrtBackend", stage: str, dims: dict[str, int], bound: dict[str, torch.Tensor]):
        trt, engine = backend.trt, backend.engines[stage]
        spec = backend.specs[stage]
        self.stage, self.backend = stage, backend
        self.context = _create_context(trt, engine)
        if self.context is None:
            raise BitDanceError(f"stage {stage}: TensorRT could not create an execution context")
        _set_device_memory(self.context, backend.scratch.data_ptr(), backend.scratch.numel())
        self.buffers: dict[str, torch.Tensor] = {}
        self.host_shape_inputs = False
        for t in spec.inputs:
            shape = spec.shape(t.name, **dims)
            if any(d < 0 for d in engine.get_tensor_shape(t.name)):
                if not self.context.set_input_shape(t.name, shape):
                    raise BitDanceError(f"stage {stage}: TensorRT refused shape {list(shape)} for {t.name} (outside "
                                        "the engine's profile; rebuild the engines for this export)")
            dtype = _torch_dtype(trt, engine.get_tensor_dtype(t.name))
            if t.name in bound:
                buf = bound[t.name]
                if buf.dtype != dtype or tuple(buf.shape) != shape:
                    raise BitDanceError(f"stage {stage}: engine wants {t.name} as {dtype} {list(shape)}")
            elif _on_host(trt, engine, t.name):
                buf = torch.zeros(shape, dtype=dtype).pin_memory()  # shape tensors are read on the host
                self.host_shape_inputs = True
            else:
                buf = torch.zeros(shape, dtype=dtype, device=backend.device)
            self.buffers[t.name] = buf
        for t in spec.outputs:
            shape = tuple(self.context.get_tensor_shape(t.name))
            want = spec.shape(t.name, **dims)
            if shape != want:
                raise BitDanceError(f"stage {stage}: engine output {t.name} has shape {list(shape)}, the contract "
                                    f"{list(want)}; rebuild the engines for this export")
            dtype = _torch_dtype(trt, engine.get_tensor_dtype(t.name))
            self.buffers[t.name] = torch.empty(shape, dtype=dtype, device=backend.device)
        for name, buf in self.buffers.items():
            if not self.context.set_tensor_address(name, buf.data_ptr()):
                raise BitDanceError(f"stage {stage}: TensorRT refused the address of {name}")
        self.after = None  # extra work on the stream after the engine (captured with it)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_failed = False  # tried once, the engine cannot be captured: run eagerly
        self.key = (stage, tuple(sorted(dims.items())))
        self.calls = 0

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.backend.stream.cuda_stream):
            raise BitDanceError(f"stage {self.stage}: TensorRT execution failed (execute_async_v3)")
        if self.after is not None:
            self.after()

    def run(self) -> None:
        """Run with the inputs already in the buffers. The first call runs eagerly (it is also the
        warm-up enqueue TensorRT wants before a capture); right after it, graph-eligible stages are
        captured once, and every later call replays the graph."""
        b = self.backend
        with torch.cuda.stream(b.stream):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._enqueue()
                if (b.cuda_graphs and self.stage in GRAPH_STAGES and not self.host_shape_inputs
                        and not self.capture_failed):
                    self._capture()
        self.calls += 1

    def _capture(self) -> None:
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
            b.log(f"{self.stage}: TensorRT engine cannot be captured into a CUDA graph ({why}); it runs without one")
            return
        self.graph = graph
        b.captures.append(self.key)


class TrtBackend:
    name = "tensorrt"

    def __init__(self, export_dir, precision: str | None = None, workspace_mb=None, engine_root=None,
                 device: str | int = "cuda", cuda_graphs: bool = True, sampler: str = "auto", level: int = 3,
                 expect_config: ModelConfig | None = None, log=print):
        """Engines missing from the cache (or stale) are built first; `sampler` as OrtBackend's."""
        if not torch.cuda.is_available():
            raise BitDanceError("--backend tensorrt needs a CUDA GPU, and torch sees none here")
        from ..engines.build import TensorRT, build_engines

        if sampler not in SAMPLER_MODES:
            raise BitDanceError(f"sampler mode {sampler!r}: use one of {', '.join(SAMPLER_MODES)}")
        self.dir = Path(export_dir)
        self.sampler = sampler
        self.manifest = read_manifest(self.dir)
        self.config = manifest_config(self.manifest, self.dir)
        if expect_config is not None and _architecture(expect_config) != _architecture(self.config):
            raise BitDanceError(f"{self.dir / MANIFEST} was exported for model {self.config.name!r}, not "
                                f"{expect_config.name!r}; re-export {self.dir} for this model")
        self.specs = manifest_specs(self.manifest, self.dir)
        self.sampler_steps = self.manifest["key"]["sampler_steps"]
        missing = [s for s in REQUIRED if s not in self.specs]
        if missing or not (st.HEAD_STEP in self.specs or all(s in self.specs for s in st.SAMPLER_STAGES)):
            raise BitDanceError(f"{self.dir} lacks stage(s) {', '.join(missing) or 'head_step'} needed for generation")
        self.device = torch.device(device if not isinstance(device, int) else f"cuda:{device}")
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        toolkit = TensorRT(device=index)
        self.trt = toolkit.trt
        built = build_engines(self.dir, precision, workspace_mb, level, list(self.specs), engine_root, toolkit,
                              log=log or (lambda *_: None))
        self.precision = next(iter(built.values())).key.precision
        self.engine_paths = {s: b.path for s, b in built.items()}
        runtime = self.trt.Runtime(toolkit.logger)
        self.engines = {}
        for stage, path in self.engine_paths.items():
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise BitDanceError(f"{path}: TensorRT could not deserialize it (delete it to rebuild)")
            self.engines[stage] = engine
        self._runtime = runtime
        with torch.cuda.device(self.device):
            self.stream = torch.cuda.Stream(self.device)
            size = max(_device_memory_size(e) for e in self.engines.values())
            self.scratch = torch.empty(max(size, 256), dtype=torch.uint8, device=self.device)  # shared by all contexts
        self.cuda_graphs = bool(cuda_graphs)
        self.log = log or (lambda *_: None)
        self.captures: list = []
        self._calls: dict = {}
        self._kv: dict[int, torch.Tensor] = {}
        self._pos: dict[int, torch.Tensor] = {}
        self._rows = 0
        self._started = False

    # ---- plumbing ------------------------------------------------------------------------
    def _call(self, stage: str, dims: dict[str, int]) -> _Call:
        key = (stage, tuple(sorted(dims.items())))
        if key not in self._calls:
            bound = {}
            if stage == st.BACKBONE_STEP:
                kv = self._cache(dims["rows"])
                bound = {name: kv[i // 2, i % 2] for i, name in enumerate(st.cache_input_names(self.config))}
            call = _Call(self, stage, dims, bound)
            if stage == st.BACKBONE_STEP:
                kv, pos, new = self._kv[dims["rows"]], self._pos[dims["rows"]], call.buffers["kv_new"]
                call.after = lambda: kv.index_copy_(4, pos, new)  # cache write at [start, start+P), graph-safe
            self._calls[key] = call
        return self._calls[key]

    def _cache(self, rows: int) -> torch.Tensor:
        if rows not in self._kv:
            self._kv[rows] = torch.zeros(st.kv_shape(self.config, rows), dtype=torch.float32, device=self.device)
            self._pos[rows] = torch.zeros(self.config.parallel_num, dtype=torch.int64, device=self.device)
        return self._kv[rows]

    def _put(self, buf: torch.Tensor, value) -> None:
        buf.copy_(torch.as_tensor(value).reshape(buf.shape))

    def _begin(self) -> None:
        """Our stream waits for work queued on the caller's stream (inputs it produced)."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def _out(self, buf: torch.Tensor) -> torch.Tensor:
        """A copy of an output buffer, made on the caller's stream after our stream's work."""
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return buf.float().clone()

    @property
    def kv_cache(self) -> torch.Tensor | None:
        return self._kv.get(self._rows)

    @property
    def max_batch(self) -> int:
        return self.specs[st.PREFILL].dims["rows"].max // 2

    # ---- Backend calls ---------------------------------------------------------------------
    def prefill(self, labels: torch.Tensor) -> torch.Tensor:
        spec = self.specs[st.PREFILL]
        labels = torch.as_tensor(labels).to(torch.int64)
        dims = spec.match("labels", labels.shape)
        if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) <= self.config.num_classes):
            raise BitDanceError(f"labels must lie in [0, {self.config.num_classes}] (the last is the null class)")
        rows = dims["rows"]
        kv = self._cache(rows)
        call = self._call(st.PREFILL, dims)
        self._begin()
        with torch.cuda.stream(self.stream):
            kv.zero_()
            self._put(call.buffers["labels"], labels)
        call.run()
        with torch.cuda.stream(self.stream):
            new = call.buffers["kv_new"]
            kv[:, :, :, :, : new.shape[4]] = new
        self._rows, self._started = rows, True
        return self._out(call.buffers["cond"])

    def step(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        if not self._started:
            raise BitDanceError("step() before prefill(): start every generation with prefill")
        spec = self.specs[st.BACKBONE_STEP]
        dims = spec.match("tokens", tokens.shape)
        if dims["rows"] != self._rows:
            raise BitDanceError(f"step(): {dims['rows']} token rows, but the cache was prefilled with {self._rows}")
        start = st.step_start(self.config, int(step))
        call = self._call(st.BACKBONE_STEP, dims)
        p = self.config.parallel_num
        self._begin()
        with torch.cuda.stream(self.stream):
            self._put(call.buffers["tokens"], tokens)
            call.buffers["start"].fill_(start)
            self._pos[dims["rows"]].copy_(torch.arange(start, start + p, dtype=torch.int64))
        call.run()  # engine, then kv[..., start:start+P, :] = kv_new (both in the graph once captured)
        return self._out(call.buffers["cond"])

    def sample_tokens(self, cond: torch.Tensor, noise: torch.Tensor, cfg: float, guided: bool) -> torch.Tensor:
        steps = int(noise.shape[0]) - 1
        fused = st.HEAD_SAMPLER_GUIDED if guided else st.HEAD_SAMPLER_UNGUIDED
        have_fused = fused in self.engines and self.sampler_steps == steps
        self._begin()
        if self.sampler == "fused" or (self.sampler == "auto" and have_fused):
            if not have_fused:
                raise BitDanceError(f"{self.dir}: no fused head sampler for S={steps} (exported S={self.sampler_steps})")
            spec = self.specs[fused]
            dims = spec.match("cond", cond.shape)
            spec.match("noise", noise.shape, known=dims)
            call = self._call(fused, dims)
            with torch.cuda.stream(self.stream):
                self._put(call.buffers["cond"], cond)
                self._put(call.buffers["noise"], noise)
                if guided:
                    call.buffers["cfg"].fill_(float(cfg))
            call.run()
            return self._out(call.buffers["tokens"])
        if st.HEAD_STEP not in self.engines:
            raise BitDanceError(f"{self.dir}: the fused head sampler has S={self.sampler_steps}, this generation asks "
                                f"S={steps}, and there is no head_step engine; re-export with sampler steps {steps}")
        spec = self.specs[st.HEAD_STEP]
        dims = spec.match("cond", cond.shape)
        call = self._call(st.HEAD_STEP, dims)

        def net(x, t, _cond):  # runs on self.stream (inside the block below)
            self._put(call.buffers["x"], x)
            self._put(call.buffers["t"], t)
            call.run()
            return call.buffers["x_pred"].float().clone()

        with torch.no_grad(), torch.cuda.stream(self.stream):
            self._put(call.buffers["cond"], cond)
            tokens = sample_tokens(net, cond.to(self.device).float(), noise.to(self.device).float(), cfg, guided,
                                   self.config.time_shift)
        return self._out(tokens)

    def _simple(self, stage: str, in_name: str, out_name: str, x: torch.Tensor) -> torch.Tensor:
        if stage not in self.engines:
            raise BitDanceError(f"{self.dir} has no {stage} stage; re-export with it")
        dims = self.specs[stage].match(in_name, x.shape)
        call = self._call(stage, dims)
        self._begin()
        with torch.cuda.stream(self.stream):
            self._put(call.buffers[in_name], x)
        call.run()
        return self._out(call.buffers[out_name])

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self._simple(st.DECODER, "latent", "image", latent)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self._simple(st.ENCODER, "image", "latent", image)

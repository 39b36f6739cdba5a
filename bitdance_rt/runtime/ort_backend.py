"""The ONNX Runtime backend: runs an export directory (bitdance_rt.export) for the loop.

Implements the Backend calls (prefill, step, sample_tokens, decode) over per-stage sessions.
The KV cache is one preallocated torch tensor on the session's device, bound by address as the
`kv` input (IO binding, no copy); each backbone graph returns only its chunk's keys/values
(`kv_new`, also bound to a preallocated buffer), which the backend writes into the cache. Head sampling uses
the fused head_sampler graph when it was exported with the
requested S; otherwise the head_step graph is the `net` of bitdance_rt.sampling.sample_tokens,
so the sampler maths is the torch reference's in both cases.

The export directory is validated before ONNX Runtime sees a file (manifest, stage contracts,
sizes, sha256, graph signatures): a bad export is a BitDanceError naming the file, never a crash
inside ONNX Runtime. CPU EP by default; CUDA / TensorRT EP names are accepted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import stages as st
from ..config import ModelConfig
from ..errors import BitDanceError
from ..export.manifest import MANIFEST
from ..export.reader import open_export
from .core import SAMPLER_MODES, StageBackend
from .int8_kernels import configure as int8_configure
from .ort_session import graph_signature, make_session, trt_profile_options
from .int8_kernels import resolve as int8_kernels_resolve

OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _numpy(x: torch.Tensor, dtype) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to("cpu").numpy().astype(dtype, copy=False))


def normalize_providers(providers) -> list:
    """Provider names (or aliases cpu/cuda/tensorrt), optionally (name, options) pairs."""
    import onnxruntime as ort

    if providers is None:
        providers = ["CPUExecutionProvider"]
    if isinstance(providers, (str, tuple)):
        providers = [providers]
    available = ort.get_available_providers()
    out = []
    for p in providers:
        name, options = p if isinstance(p, tuple) else (p, {})
        name = PROVIDER_ALIASES.get(str(name).lower(), name)
        if name not in available:
            raise BitDanceError(
                f"ONNX Runtime execution provider {name} is not available here (available: {', '.join(available)}); "
                "install onnxruntime-gpu for CUDA/TensorRT"
            )
        out.append((name, dict(options)))
    return out


def lean_options(ort, opts) -> None:
    """Session options that hold the least: no graph optimiser, no arena, nodes run in priority order.

    On a CPU without FP16 GEMMs ONNX Runtime runs an FP16 graph's MatMuls in FP32, casting the weights.
    Optimised, it folds those casts into FP32 copies of every weight (2x the FP16 graph, anonymous
    memory); unoptimised in the default order, it runs every weight's cast first and holds them all at
    once; in priority order each cast runs just before its MatMul. One Qwen3-14B layer (0.67 GB of FP16
    weights, a [2, 64] step), 2-core EPYC, 2026-12-06: peak 1.84 GB optimised, 1.80 GB unoptimised,
    1.18 GB in priority order without an arena (0.67 GB of it the weight file's pages), 1.5x slower."""
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.enable_cpu_mem_arena = False
    opts.enable_mem_pattern = False
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED


class OrtBackend(StageBackend):
    name = "onnxruntime"

    def __init__(
        self,
        export_dir,
        threads: int | None = None,
        opt_level: str = "all",
        optimized_model_dir=None,
        providers=None,
        *,
        sampler: str = "auto",
        verify_hashes: bool = True,
        expect_config: ModelConfig | None = None,
        expect_source: str | None = None,
        int8_kernels: str | None = None,
        session_cache=None,
        lean: bool = False,
    ):
        """`sampler`: 'auto' (fused graph when its S matches, else head_step), 'fused' or 'step'.
        `expect_config` / `expect_source` refuse an export of another model or checkpoint.
        `int8_kernels`: 'auto' (exact U8U8 kernels where this CPU's U8S8 ones saturate), 'exact' or
        'fast'; see runtime/int8_kernels.py (default: $BITDANCE_RT_INT8_KERNELS, else auto).
        `session_cache`: a directory where ONNX Runtime's optimised graphs are kept between processes
        (runtime/ort_session.py; the backends module passes the cache root's); `optimized_model_dir`
        only writes them out, for inspection. `lean`: hold as little as ONNX Runtime can (see lean_options)."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise BitDanceError("the onnxruntime backend needs onnxruntime: pip install 'bitdance-rt[onnx]'") from None

        self.ort = ort
        self.dir = Path(export_dir)
        if sampler not in SAMPLER_MODES:
            raise BitDanceError(f"sampler mode {sampler!r}: use one of {', '.join(SAMPLER_MODES)}")
        if opt_level not in OPT_LEVELS:
            raise BitDanceError(f"ONNX Runtime optimisation level {opt_level!r}: use one of {', '.join(OPT_LEVELS)}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise BitDanceError(f"threads must be a positive integer, got {threads!r}")
        self.sampler = sampler
        self.lean = bool(lean)
        self.export = open_export(self.dir, expect_config, expect_source, generation=True)
        self.manifest, self.config, self.specs = self.export.manifest, self.export.config, self.export.specs
        self.sampler_steps = self.export.sampler_steps
        self.export.verify_files(hashes=verify_hashes)
        self.providers = normalize_providers(providers)
        # INT8 graphs: ONNX Runtime's exact U8U8 kernels where its U8S8 ones saturate (decided here,
        # from the CPU this runs on, not from where the graphs were derived)
        self.int8_exact = self.export.precision == "int8" and int8_kernels_resolve(int8_kernels)
        first = self.providers[0]
        self.device = ("cuda", int(first[1].get("device_id", 0))) if first[0] in GPU_PROVIDERS else ("cpu", 0)
        if optimized_model_dir is not None and session_cache is not None:
            raise BitDanceError(
                "give optimized_model_dir (write the optimised graphs out) or session_cache (reuse them), not both"
            )
        self._session_args = (threads, opt_level, optimized_model_dir, session_cache)
        # head_step waits until a sampler step count without a fused graph needs it (most runs never do)
        lazy = {st.HEAD_STEP} if sampler != "step" and st.HEAD_SAMPLER in self.specs else set()
        self.sessions = {name: self._session(name, *self._session_args) for name in self.specs if name not in lazy}
        self._out_buffers: dict = {}
        self._init_core(self.specs[st.BACKBONE].dims["rows"].max)

    def close(self) -> None:
        """Drop every ONNX Runtime session (and with it its thread pools) and the cache."""
        self.sessions.clear()
        self._out_buffers.clear()
        super().close()

    @property
    def concurrent_decode(self) -> bool:
        """Decode beside the AR steps on a GPU provider (ONNX Runtime's Run is thread-safe). On the CPU
        the decoder would take the cores the AR steps use: measured on 2 cores (BitDance-B-4x INT8,
        bench_serving), a decode thread made the half-load p50 1.71x batch-1 latency, inline 1.26x."""
        return self.device[0] == "cuda"

    # ---- setup -------------------------------------------------------------------------
    def _signature_check(self, name: str, path: Path) -> None:
        """The graph's inputs/outputs (read without its weights, runtime/ort_session.graph_signature)
        are the stage's, before ONNX Runtime parses the file."""
        try:
            got_in, got_out = graph_signature(path)
        except (ValueError, OSError) as exc:
            raise BitDanceError(
                f"{path}: not a readable ONNX file ({_first_line(exc)}); re-export {self.dir}"
            ) from None
        spec = self.specs[name]
        if got_in != spec.input_names or got_out != spec.output_names:
            raise BitDanceError(
                f"{path}: graph inputs {got_in} / outputs {got_out} are not those of stage {name} "
                f"in {MANIFEST}; re-export {self.dir}"
            )

    def _session(self, name: str, threads, opt_level: str, optimized_model_dir, session_cache=None):
        ort = self.ort
        files = self.export.stage_files(name)
        path = self.dir / files[0]
        self._signature_check(name, path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[opt_level])
        if threads is not None:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        if name == st.DECODER and self.device[0] == "cpu":
            # one call per image with the largest activations (B-4x: ~0.3 GB at 256 px): an arena would
            # keep that peak resident between images; freed after each call instead
            opts.enable_cpu_mem_arena = False
        opts.log_severity_level = 3
        # Each session has its own thread pool, whose idle threads spin for a while after a run. The loop
        # alternates sessions (26 head_step runs, then a backbone step), and the head's threads spinning on
        # both cores slowed the next backbone step from 30 to 54 ms (B-4x INT8, 2 cores). Spin within a
        # run, stop at its end:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        int8_configure(opts, self.int8_exact)
        # TensorRT's INT4 graphs (weight DequantizeLinear, precision/int4.py) run here too: ONNX Runtime fuses
        # each into MatMulNBits, by default at accuracy level 4 (activations quantised to int8); level 0
        # computes in the activations' float type, as the graph says (measured: the fused node then equals
        # DequantizeLinear + MatMul's product bit for bit)
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        if self.lean:
            lean_options(ort, opts)
        if optimized_model_dir is not None:
            out = Path(optimized_model_dir)
            out.mkdir(parents=True, exist_ok=True)
            opts.optimized_model_filepath = str(out / f"{name}.{opt_level}.onnx")
            if len(files) > 1:  # weights stay external in the optimised copy too
                opts.add_session_config_entry(
                    "session.optimized_model_external_initializers_file_name", f"{name}.{opt_level}.onnx.data"
                )
        providers = []
        for provider, options in self.providers:
            if provider == "TensorrtExecutionProvider" and "trt_profile_min_shapes" not in options:
                options = {**options, **trt_profile_options(self.specs[name])}
            providers.append((provider, options))
        # the optimised-graph cache is keyed by the graph's recorded sha256 (and, inside make_session, by
        # ONNX Runtime's version, the options that steer its optimisers, the providers and the CPU)
        key = "|".join([name, *(self.manifest["files"][f]["sha256"] for f in files)]) if session_cache else None
        try:
            return make_session(path, opts, providers, cache_dir=session_cache, key=key)
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise BitDanceError(
                f"{path}: ONNX Runtime cannot load it ({_first_line(exc)}); re-export {self.dir}"
            ) from None

    # ---- running (the rest is the shared core, runtime/core.py) ------------------------------
    def _alloc_cache(self, rows: int) -> torch.Tensor:
        device = torch.device(*self.device) if self.device[0] != "cpu" else torch.device("cpu")
        return torch.zeros(st.kv_shape(self.config, rows), dtype=torch.float32, device=device)

    def _bind_tensor(self, binding, name: str, tensor: torch.Tensor, output: bool = False) -> None:
        """Bind a contiguous float32 torch tensor by address (no copy), on its own device."""
        kind, index = ("cuda", tensor.device.index or 0) if tensor.is_cuda else ("cpu", 0)
        bind = binding.bind_output if output else binding.bind_input
        bind(name, kind, index, np.float32, list(tensor.shape), tensor.data_ptr())

    def _get_session(self, name: str):
        if name not in self.sessions:  # head_step: built only if a step count without fused graph asks for it
            if name not in self.specs:
                raise BitDanceError(f"{self.dir} has no {name} stage; re-export with it")
            self.sessions[name] = self._session(name, *self._session_args)
        return self.sessions[name]

    def _run(self, name: str, feeds: dict, phase: str | None = None) -> dict:
        """Run stage `name` on contract-named torch tensors: the cache views (and `kv_new`) bound by
        address, the rest as host arrays; outputs as torch tensors."""
        spec = self.specs[name]
        binding = self._get_session(name).io_binding()
        dims: dict = {}
        for t in spec.inputs:
            x = feeds[t.name]
            dims = spec.match(t.name, x.shape, known=dims)
            if t.name.startswith("cache."):
                self._bind_tensor(binding, t.name, x)  # contiguous: layer and part are outer dims
            else:
                binding.bind_cpu_input(t.name, _numpy(x, np.int64 if t.dtype == "int64" else np.float32))
        out_kv = None
        for t in spec.outputs:
            if t.name == "kv_new":
                key = (name, *sorted(dims.items()))
                if key not in self._out_buffers:  # one preallocated buffer per (stage, rows, seq)
                    self._out_buffers[key] = torch.empty(
                        spec.shape("kv_new", **dims), dtype=torch.float32, device=self._kv.device
                    )
                out_kv = self._out_buffers[key]
                self._bind_tensor(binding, "kv_new", out_kv, output=True)
            else:
                binding.bind_output(t.name, "cpu")
        try:
            self.sessions[name].run_with_iobinding(binding)
        except Exception as exc:
            raise BitDanceError(f"stage {name}: ONNX Runtime failed ({_first_line(exc)})") from None
        values = binding.get_outputs()  # in the order bound: the contract's
        return {
            t.name: out_kv if t.name == "kv_new" else torch.from_numpy(values[i].numpy())
            for i, t in enumerate(spec.outputs)
        }

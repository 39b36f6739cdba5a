"""The ONNX Runtime backend: runs an export directory (bitdance_rt.export) for the loop.

Implements the Backend calls (prefill, step, sample_tokens, decode) over per-stage sessions.
The KV cache is one preallocated torch tensor on the session's device, bound by address as the
`kv` input (IO binding, no copy); each backbone graph returns only its chunk's keys/values
(`kv_new`, also bound to a preallocated buffer), which the backend writes into the cache. Head sampling uses the fused head_sampler graph when it was exported with the
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
from ..export.manifest import (MANIFEST, manifest_config, manifest_specs, read_manifest, stage_files,
                               verify_files)
from ..sampling import sample_tokens
from .int8_kernels import configure as int8_configure
from .int8_kernels import resolve as int8_kernels_resolve

OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
              "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider"}
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
REQUIRED = (st.PREFILL, st.BACKBONE_STEP, st.DECODER)
SAMPLER_MODES = ("auto", "fused", "step")


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
        name, options = (p if isinstance(p, tuple) else (p, {}))
        name = PROVIDER_ALIASES.get(str(name).lower(), name)
        if name not in available:
            raise BitDanceError(
                f"ONNX Runtime execution provider {name} is not available here (available: {', '.join(available)}); "
                "install onnxruntime-gpu for CUDA/TensorRT"
            )
        out.append((name, dict(options)))
    return out


def _architecture(cfg: ModelConfig) -> dict:
    """What decides the graphs: the official class, its arguments and the VAE (not name or defaults)."""
    return {k: v for k, v in cfg.to_json_dict().items() if k in ("model_class", "constructor_args", "vae")}


def trt_profile_options(spec: st.StageSpec) -> dict[str, str]:
    """TensorRT EP provider options with the contract's min/opt/max shapes of the dynamic inputs."""
    from ..engines.profiles import shape_strings, stage_profile

    lo, opt, hi = shape_strings(stage_profile(spec))
    return {"trt_profile_min_shapes": lo, "trt_profile_opt_shapes": opt, "trt_profile_max_shapes": hi}


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, export_dir, threads: int | None = None, opt_level: str = "all",
                 optimized_model_dir=None, providers=None, *, sampler: str = "auto",
                 verify_hashes: bool = True, expect_config: ModelConfig | None = None,
                 expect_source: str | None = None, int8_kernels: str | None = None):
        """`sampler`: 'auto' (fused graph when its S matches, else head_step), 'fused' or 'step'.
        `expect_config` / `expect_source` refuse an export of another model or checkpoint.
        `int8_kernels`: 'auto' (exact U8U8 kernels where this CPU's U8S8 ones saturate), 'exact' or
        'fast'; see runtime/int8_kernels.py (default: $BITDANCE_RT_INT8_KERNELS, else auto)."""
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
        self.manifest = read_manifest(self.dir)
        key = self.manifest["key"]
        self.config = manifest_config(self.manifest, self.dir)
        self._check_expected(expect_config, expect_source)
        self.specs = manifest_specs(self.manifest, self.dir)
        self.sampler_steps = key["sampler_steps"]
        missing = [s for s in REQUIRED if s not in self.specs]
        if missing or not (st.HEAD_STEP in self.specs or all(s in self.specs for s in st.SAMPLER_STAGES)):
            raise BitDanceError(
                f"{self.dir} lacks stage(s) {', '.join(missing) or 'head_step (or both head samplers)'} needed "
                "for generation; re-export with all stages"
            )
        verify_files(self.dir, self.manifest, hashes=verify_hashes)
        self.providers = normalize_providers(providers)
        # INT8 graphs: ONNX Runtime's exact U8U8 kernels where its U8S8 ones saturate (decided here,
        # from the CPU this runs on, not from where the graphs were derived)
        self.int8_exact = self.manifest.get("precision") == "int8" and int8_kernels_resolve(int8_kernels)
        first = self.providers[0]
        self.device = ("cuda", int(first[1].get("device_id", 0))) if first[0] in GPU_PROVIDERS else ("cpu", 0)
        self.sessions = {name: self._session(name, threads, opt_level, optimized_model_dir) for name in self.specs}
        self._kv: torch.Tensor | None = None
        self._new: dict[str, torch.Tensor] = {}
        self._rows = 0
        self._started = False
        self._context: dict[str, np.ndarray] = {}

    # ---- setup -------------------------------------------------------------------------
    def _check_expected(self, cfg: ModelConfig | None, source: str | None) -> None:
        key = self.manifest["key"]
        where = self.dir / MANIFEST
        if cfg is not None and _architecture(cfg) != _architecture(self.config):
            raise BitDanceError(f"{where} was exported for model {self.config.name!r}, not {cfg.name!r} "
                                f"(another config); re-export {self.dir} for this model")
        if source is not None and source != key["checkpoint"]:
            raise BitDanceError(f"{where} was exported from {key['checkpoint']}, not {source} "
                                f"(another checkpoint); re-export {self.dir} from this checkpoint")

    def _signature_check(self, name: str, path: Path) -> None:
        """Read the graph's inputs/outputs with onnx (no weights) before ONNX Runtime parses it."""
        import onnx

        try:
            graph = onnx.load(str(path), load_external_data=False).graph
        except Exception as exc:  # protobuf DecodeError and friends
            raise BitDanceError(f"{path}: not a readable ONNX file ({_first_line(exc)}); re-export {self.dir}") from None
        spec = self.specs[name]
        inits = {t.name for t in graph.initializer}
        got_in = [v.name for v in graph.input if v.name not in inits]
        got_out = [v.name for v in graph.output]
        if got_in != spec.input_names or got_out != spec.output_names:
            raise BitDanceError(f"{path}: graph inputs {got_in} / outputs {got_out} are not those of stage {name} "
                                f"in {MANIFEST}; re-export {self.dir}")

    def _session(self, name: str, threads, opt_level: str, optimized_model_dir):
        ort = self.ort
        files = stage_files(self.manifest, self.dir, name)
        path = self.dir / files[0]
        self._signature_check(name, path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[opt_level])
        if threads is not None:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # Each session has its own thread pool, whose idle threads spin for a while after a run. The loop
        # alternates sessions (26 head_step runs, then a backbone step), and the head's threads spinning on
        # both cores slowed the next backbone step from 30 to 54 ms (B-4x INT8, 2 cores). Spin within a
        # run, stop at its end:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        int8_configure(opts, self.int8_exact)
        if optimized_model_dir is not None:
            out = Path(optimized_model_dir)
            out.mkdir(parents=True, exist_ok=True)
            opts.optimized_model_filepath = str(out / f"{name}.{opt_level}.onnx")
            if len(files) > 1:  # weights stay external in the optimised copy too
                opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                              f"{name}.{opt_level}.onnx.data")
        providers = []
        for provider, options in self.providers:
            if provider == "TensorrtExecutionProvider" and "trt_profile_min_shapes" not in options:
                options = {**options, **trt_profile_options(self.specs[name])}
            providers.append((provider, options))
        try:
            return ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise BitDanceError(f"{path}: ONNX Runtime cannot load it ({_first_line(exc)}); re-export {self.dir}") from None

    # ---- running -----------------------------------------------------------------------
    def _run(self, name: str, binding) -> None:
        try:
            self.sessions[name].run_with_iobinding(binding)
        except Exception as exc:
            raise BitDanceError(f"stage {name}: ONNX Runtime failed ({_first_line(exc)})") from None

    def _alloc_cache(self, rows: int) -> None:
        if self._rows == rows and self._kv is not None:
            return
        device = torch.device(*self.device) if self.device[0] != "cpu" else torch.device("cpu")
        self._kv = torch.zeros(st.kv_shape(self.config, rows), dtype=torch.float32, device=device)
        self._new = {name: torch.empty(self.specs[name].shape("kv_new", rows=rows), dtype=torch.float32, device=device)
                     for name in (st.PREFILL, st.BACKBONE_STEP)}
        self._rows = rows

    def _bind_tensor(self, binding, name: str, tensor: torch.Tensor, output: bool = False) -> None:
        """Bind a contiguous float32 torch tensor by address (no copy), on its own device."""
        kind, index = ("cuda", tensor.device.index or 0) if tensor.is_cuda else ("cpu", 0)
        bind = binding.bind_output if output else binding.bind_input
        bind(name, kind, index, np.float32, list(tensor.shape), tensor.data_ptr())

    def prefill(self, labels) -> torch.Tensor:
        """labels [R], or a dict of the prefill stage's named inputs (text-to-image: ids, pad)."""
        spec = self.specs[st.PREFILL]
        feeds = labels if isinstance(labels, dict) else {"labels": labels}
        missing = [n for n in spec.input_names if n not in feeds]
        if missing:
            raise BitDanceError(f"prefill(): stage {st.PREFILL} of {self.dir} needs input(s) {', '.join(missing)}")
        arrays = {n: _numpy(torch.as_tensor(feeds[n]), np.int64) for n in spec.input_names}
        dims: dict = {}
        for n, arr in arrays.items():
            dims = spec.match(n, arr.shape, known=dims)
        labels = arrays.get("labels")
        if labels is not None and labels.size and not (0 <= labels.min() and labels.max() <= self.config.num_classes):
            raise BitDanceError(f"labels must lie in [0, {self.config.num_classes}] (the last is the null class)")
        pad = arrays.get("pad")
        if pad is not None and pad.size and not (0 <= pad.min() and pad.max() <= self.config.max_text_tokens):
            raise BitDanceError(f"pad must lie in [0, {self.config.max_text_tokens}] (max_text_tokens)")
        self._alloc_cache(dims["rows"])
        self._kv.zero_()
        binding = self.sessions[st.PREFILL].io_binding()
        for n, arr in arrays.items():
            binding.bind_cpu_input(n, arr)
        self._context = {n: arrays[n] for n in st.step_context_names(self.config)}
        binding.bind_output("cond", "cpu")
        new = self._new[st.PREFILL]
        self._bind_tensor(binding, "kv_new", new, output=True)
        self._run(st.PREFILL, binding)
        self._kv[:, :, :, :, : new.shape[4]] = new
        self._started = True
        return torch.from_numpy(binding.get_outputs()[0].numpy())

    def step(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        if not self._started:
            raise BitDanceError("step() before prefill(): start every generation with prefill")
        spec = self.specs[st.BACKBONE_STEP]
        tokens = _numpy(tokens, np.float32)
        dims = spec.match("tokens", tokens.shape)
        if dims["rows"] != self._rows:
            raise BitDanceError(f"step(): {dims['rows']} token rows, but the cache was prefilled with {self._rows}")
        start = st.step_start(self.config, int(step))
        binding = self.sessions[st.BACKBONE_STEP].io_binding()
        binding.bind_cpu_input("tokens", tokens)
        binding.bind_cpu_input("start", np.array(start, dtype=np.int64))
        for n, arr in self._context.items():  # inputs fixed at prefill (text-to-image: pad)
            binding.bind_cpu_input(n, arr)
        for i, name in enumerate(st.cache_input_names(self.config)):
            self._bind_tensor(binding, name, self._kv[i // 2, i % 2])  # contiguous: layer and part are outer dims
        binding.bind_output("cond", "cpu")
        new = self._new[st.BACKBONE_STEP]
        self._bind_tensor(binding, "kv_new", new, output=True)
        self._run(st.BACKBONE_STEP, binding)
        self._kv[:, :, :, :, start : start + new.shape[4]] = new
        return torch.from_numpy(binding.get_outputs()[0].numpy())

    @property
    def max_batch(self) -> int:
        """Most images one generation may hold: the exported row range covers 2 CFG rows each."""
        return self.specs[st.PREFILL].dims["rows"].max // 2

    @property
    def kv_cache(self) -> torch.Tensor | None:
        """The cache tensor the graphs read (for inspection and tests)."""
        return self._kv

    def sample_tokens(self, cond: torch.Tensor, noise: torch.Tensor, cfg: float, guided: bool) -> torch.Tensor:
        steps = int(noise.shape[0]) - 1
        rows, cfg_ = int(cond.shape[0]), self.config
        want = (rows // 2 if guided else rows, cfg_.parallel_num, cfg_.token_dim)
        if steps < 1 or tuple(noise.shape[1:]) != want or (guided and rows % 2):
            raise BitDanceError(f"sample_tokens: noise {list(noise.shape)} does not fit cond {list(cond.shape)} "
                                f"({'guided' if guided else 'unguided'}): want [S+1, {', '.join(map(str, want))}]")
        fused = st.HEAD_SAMPLER_GUIDED if guided else st.HEAD_SAMPLER_UNGUIDED
        have_fused = fused in self.sessions and self.sampler_steps == steps
        if self.sampler == "fused" or (self.sampler == "auto" and have_fused):
            if not have_fused:
                raise BitDanceError(f"{self.dir}: no fused head sampler for S={steps} (exported S={self.sampler_steps}); "
                                    f"re-export with sampler steps {steps}")
            return self._sample_fused(fused, cond, noise, cfg, guided)
        if st.HEAD_STEP not in self.sessions:
            raise BitDanceError(f"{self.dir}: the fused head sampler has S={self.sampler_steps}, this generation asks "
                                f"S={steps}, and there is no head_step graph; re-export with sampler steps {steps}")
        return self._sample_stepwise(cond, noise, cfg, guided)

    def _sample_fused(self, name: str, cond, noise, cfg: float, guided: bool) -> torch.Tensor:
        spec = self.specs[name]
        cond = _numpy(cond, np.float32)
        noise = _numpy(noise, np.float32)
        dims = spec.match("cond", cond.shape)
        spec.match("noise", noise.shape, known=dims)
        binding = self.sessions[name].io_binding()
        binding.bind_cpu_input("cond", cond)
        binding.bind_cpu_input("noise", noise)
        if guided:
            binding.bind_cpu_input("cfg", np.array(cfg, dtype=np.float32))
        binding.bind_output("tokens", "cpu")
        self._run(name, binding)
        return torch.from_numpy(binding.get_outputs()[0].numpy())

    def _sample_stepwise(self, cond, noise, cfg: float, guided: bool) -> torch.Tensor:
        spec = self.specs[st.HEAD_STEP]
        session = self.sessions[st.HEAD_STEP]
        cond_np = _numpy(cond, np.float32)
        dims = spec.match("cond", cond_np.shape)

        def net(x: torch.Tensor, t: torch.Tensor, _cond: torch.Tensor) -> torch.Tensor:
            feed = {"x": _numpy(x, np.float32), "t": _numpy(t, np.float32), "cond": cond_np}
            spec.match("x", feed["x"].shape, known=dims)
            try:
                return torch.from_numpy(session.run(["x_pred"], feed)[0])
            except Exception as exc:
                raise BitDanceError(f"stage {st.HEAD_STEP}: ONNX Runtime failed ({_first_line(exc)})") from None

        with torch.no_grad():
            return sample_tokens(net, cond.detach().cpu().float(), noise.detach().cpu().float(), cfg, guided,
                                 self.config.time_shift)

    def _run_simple(self, name: str, in_name: str, out_name: str, x: torch.Tensor) -> torch.Tensor:
        if name not in self.sessions:
            raise BitDanceError(f"{self.dir} has no {name} stage; re-export with it")
        arr = _numpy(x, np.float32)
        self.specs[name].match(in_name, arr.shape)
        binding = self.sessions[name].io_binding()
        binding.bind_cpu_input(in_name, arr)
        binding.bind_output(out_name, "cpu")
        self._run(name, binding)
        return torch.from_numpy(binding.get_outputs()[0].numpy())

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self._run_simple(st.DECODER, "latent", "image", latent)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image [B, 3, H, W] in [-1, 1] -> +/-1 latent [B, C, h, w] (needs the encoder stage)."""
        return self._run_simple(st.ENCODER, "image", "latent", image)

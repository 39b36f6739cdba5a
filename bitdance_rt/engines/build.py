"""ONNX export -> TensorRT engines, one per stage and precision, through the engine cache.
(Over 400 lines: it is the one place engines are built, with the TensorRT API it calls listed, and
checked, beside the calls.)

This module must not import torch (Jetson recipe: build on the device in a lean process), and
imports tensorrt only when a build really happens, so everything up to the build (manifest and
file checks, precision plan, profiles, cache keys, stale detection) runs and is tested on CPU.

`build_engines` is the one place engines are built (its docstring lists what a build does): it
returns an `EngineSet`, which the callers hand to runtime.trt_backend.TrtBackend; the backend
deserialises and binds, it never builds. `TensorRT.build` calls the TensorRT Python API directly
(its docstring says why not through Polygraphy); the API it uses, and where each name was checked,
is listed above the TensorRT class.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .. import stages as st
from ..errors import BitDanceError
from ..export.reader import ExportInfo, open_export
from ..fileio import atomic_write
from . import cache as ec
from .options import PrecisionPlan, opt_level, plan_precision, streamable_plan, trt_major, workspace_bytes
from .profiles import Profile, stage_profiles

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "pip install 'bitdance-rt[tensorrt]' (or NVIDIA's tensorrt wheel for your CUDA; on Jetson, "
    "JetPack's python3-libnvinfer)"
)

# cuDeviceGetAttribute attribute ids (CUDA driver API, CUdevice_attribute enum):
# CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, ..._MINOR = 76.
_CC_MAJOR, _CC_MINOR = 75, 76


# ---- what this machine has --------------------------------------------------------------------
def require_tensorrt():
    """The tensorrt module, or a one-line error saying how to install it."""
    try:
        import tensorrt
    except ImportError:
        raise BitDanceError(
            f"building engines needs TensorRT's Python package, which is not installed: {INSTALL_HINT}"
        ) from None
    return tensorrt


def _load_libcuda():
    """The CUDA driver library (present wherever an NVIDIA driver is, Jetson included)."""
    for name in ("libcuda.so.1", "libcuda.so", ctypes.util.find_library("cuda")):
        if name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
    return None


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "8.7"


def gpu_info(device: int = 0) -> GpuInfo:
    """Name and compute capability of CUDA device `device`, via the driver API (no torch, no
    cuda-python needed), or a one-line error when there is no usable CUDA GPU."""
    lib = _load_libcuda()
    if lib is None:
        raise BitDanceError(
            "no CUDA GPU here: the NVIDIA driver (libcuda) is not installed; TensorRT engines are "
            "built on the GPU that will run them"
        )
    if lib.cuInit(0) != 0:
        raise BitDanceError(
            "no usable CUDA GPU here: the CUDA driver failed to initialise (cuInit); TensorRT "
            "engines are built on the GPU that will run them"
        )
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        raise BitDanceError(
            "no CUDA GPU visible (check CUDA_VISIBLE_DEVICES); TensorRT engines are built on the GPU that will run them"
        )
    if not 0 <= device < count.value:
        raise BitDanceError(f"CUDA device {device} does not exist (this machine has {count.value})")
    dev = ctypes.c_int(0)
    lib.cuDeviceGet(ctypes.byref(dev), device)
    name = ctypes.create_string_buffer(256)
    lib.cuDeviceGetName(name, 256, dev)
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    lib.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, dev)
    lib.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, dev)
    return GpuInfo(name.value.decode(errors="replace").strip(), f"{major.value}.{minor.value}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "gpu"


def timing_cache_path(root: Path, trt_version: str, gpu: GpuInfo) -> Path:
    return Path(root) / f"timing-trt{trt_version}-{_slug(gpu.name)}-sm{gpu.compute_capability}.cache"


# ---- the TensorRT side --------------------------------------------------------------------
# TensorRT Python API used (TensorRT 10.x; 11.x where noted), from NVIDIA's Python API reference
# (docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/*.html,
# Builder / BuilderConfig / Network / OnnxParser) and the "Optimizing Builder Performance" page
# (docs.nvidia.com/deeplearning/tensorrt/latest/performance/builder-performance.html, timing cache):
#   trt.Builder(logger).create_network(flags)   flags: 1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED on 10.x
#                                               (EXPLICIT_BATCH is the default since 10.0 and not passed;
#                                               11.x: 0, every network is strongly typed, the flag is ignored)
#   trt.OnnxParser(network, logger).parse_from_file(path)   (resolves <stage>.onnx.data beside it)
#   builder.create_builder_config(); config.set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes)
#   config.builder_optimization_level = 0..5; config.set_flag / clear_flag(BuilderFlag.FP16 / TF32)
#   builder.create_optimization_profile(); profile.set_shape(name, min, opt, max);
#   config.add_optimization_profile(profile) -> its index (0, 1, ... in call order; -1: invalid)
#   config.create_timing_cache(bytes); config.set_timing_cache(cache, ignore_mismatch=False);
#   cache.combine(other, ignore_mismatch=False); cache.serialize()
#   builder.build_serialized_network(network, config) -> IHostMemory or None
# Each name and signature above was checked against the Python bindings (python/src/infer/pyCore.cpp,
# python/src/parsers/pyOnnx.cpp) and headers at the v10.3.0 (JetPack 6) and v11.1 tags of
# github.com/NVIDIA/TensorRT: all exist in both; 11.x dropped BuilderFlag.FP16/INT8 and EXPLICIT_BATCH.
class TensorRT:
    """The real builder: tensorrt + this machine's GPU. `build_engines` takes any object with the
    same attributes (version, gpu) and build(...) method, which is how it is tested on CPU."""

    def __init__(self, device: int = 0, verbose: bool = False):
        """`device`: the CUDA device whose model and compute capability key the engines. TensorRT builds
        on the thread's CURRENT CUDA device, so the caller makes `device` current (TrtBackend.from_export
        and backends._trt_backend do, with torch.cuda.device; this module has no torch)."""
        self.trt = require_tensorrt()  # first: without TensorRT there is nothing to do on any machine
        self.device = device
        self.gpu = gpu_info(device)
        self.version = str(self.trt.__version__)
        self.logger = self.trt.Logger(self.trt.Logger.VERBOSE if verbose else self.trt.Logger.WARNING)

    def _network_flags(self, plan: PrecisionPlan) -> int:
        # 10.x: strong typing is opt-in (kSTRONGLY_TYPED = 1); kEXPLICIT_BATCH is deprecated and ignored
        # since 10.0, so it is never passed. 11.x: every network is strongly typed and kSTRONGLY_TYPED
        # (now = 0) is "deprecated ... retained for API compatibility but is ignored" (NvInfer.h,
        # NetworkDefinitionCreationFlag, TensorRT v10.3.0 / v11.1 tags of github.com/NVIDIA/TensorRT),
        # so 11.x gets no flag at all.
        if not plan.strongly_typed or trt_major(self.version) >= 11:
            return 0
        flag = getattr(self.trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if flag is None:
            raise BitDanceError(f"TensorRT {self.version} has no strongly typed networks; use 10.x or newer")
        return 1 << int(flag)

    def _parse_errors(self, parser) -> str:
        """The parser's first error (str(ParserError): "In node N with name: ... (func): CODE: desc"), one line."""
        errors = []
        for i in range(parser.num_errors):
            lines = str(parser.get_error(i)).strip().splitlines()
            errors.append(lines[0] if lines else "unknown error")
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        return f"{errors[0] if errors else 'no error recorded'}{more}"

    def _attach_timing_cache(self, config, path: Path):
        """The timing cache of `path` attached to `config` (a fresh one if the file is missing, corrupt or
        from another TensorRT/GPU). create_timing_cache may give None for a blob it cannot read, and
        set_timing_cache(cache, ignore_mismatch=False) returns False for another device's cache
        (IBuilderConfig::createTimingCache / setTimingCache, NvInfer.h)."""
        old = path.read_bytes() if path.is_file() else b""
        cache = config.create_timing_cache(old) if old else None
        if cache is None or not config.set_timing_cache(cache, False):
            cache = config.create_timing_cache(b"")
            if cache is None or not config.set_timing_cache(cache, False):
                return None  # build without a timing cache rather than fail
        return cache

    def build(
        self,
        onnx_path: Path,
        plan: PrecisionPlan,
        profiles: list[Profile],
        workspace: int | None,
        level: int,
        timing_cache: Path | None,
    ) -> bytes:
        """A serialized engine; `profiles[k]` becomes optimisation profile k (the runtime selects it by index).

        Why the TensorRT API directly and not Polygraphy's network_from_onnx_path / CreateConfig /
        engine_from_network (checked against Polygraphy 0.53, polygraphy/backend/trt/config.py, loader.py),
        which would otherwise do this job:
        - profiles: CreateConfig ignores the index add_optimization_profile returns (-1 for a refused
          profile); the runtime selects profile k for phase k by index, so a refused one must fail here;
        - timing cache: CreateConfig ignores set_timing_cache(cache, False) refusing another TensorRT's or
          GPU's cache (the build then keeps none of the file's timings), and engine_from_network merges the
          file with combine(..., ignore_mismatch=True) and rewrites it in place (util.save_file); we replace
          a foreign or unreadable cache by a fresh one, never mix devices' timings, and write atomically
          (fileio.atomic_write), as the engine cache writes engines;
        - errors: Polygraphy reports through G_LOGGER.critical (a multi-line PolygraphyException); the CLI
          wants one BitDanceError line naming the parser's first error;
        - tests: this method runs on CPU against fakes of the 10.3 / 11.1 bindings (tests/test_trt_api_fakes.py)
          handed in as `self.trt`; Polygraphy imports the real `tensorrt` module itself, so with it none of
          this could be exercised without a GPU.
        The engine cache around it (keyed on hashes, one engine per stage with one profile per phase) is ours
        either way: Polygraphy has none. Polygraphy stays what `check` compares backends with (bitdance_rt.check).
        """
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(self._network_flags(plan))
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):
            raise BitDanceError(
                f"{onnx_path}: TensorRT {self.version}'s ONNX parser refused it: {self._parse_errors(parser)}"
            )
        config = builder.create_builder_config()
        if workspace is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
        config.builder_optimization_level = level
        for name in plan.builder_flags:
            flag = getattr(trt.BuilderFlag, name, None)
            if flag is None:
                raise BitDanceError(f"TensorRT {self.version} has no BuilderFlag.{name}")
            config.set_flag(flag)
        if plan.clear_tf32 and hasattr(trt.BuilderFlag, "TF32"):
            # FP32 engines compute in FP32 (kTF32 is "Enabled by default", NvInfer.h). Clearing it is allowed on
            # strongly typed networks too: trtexec --stronglyTyped only drops FP16/INT8/BF16/FP8/INT4 and still
            # honours --noTF32 (samples/common/sampleOptions.cpp, sampleEngines.cpp, TensorRT v10.3.0).
            config.clear_flag(trt.BuilderFlag.TF32)
        for k, profile in enumerate(p for p in profiles if p):  # a fully static stage needs none
            opt = builder.create_optimization_profile()
            for name, lo, mid, hi in profile:
                opt.set_shape(name, lo, mid, hi)
            index = config.add_optimization_profile(opt)  # -1: "the input profile is invalid" (NvInfer.h)
            if index != k:
                raise BitDanceError(
                    f"{onnx_path}: TensorRT {self.version} refused optimisation profile {k} "
                    f"{[(n, lo, mid, hi) for n, lo, mid, hi in profile]} (min <= opt <= max per input?)"
                )
        cache = self._attach_timing_cache(config, timing_cache) if timing_cache is not None else None
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BitDanceError(
                f"{onnx_path}: TensorRT {self.version} could not build an engine (see the TensorRT "
                "log above; a small --workspace-mb can cause this)"
            )
        if cache is not None:
            self._save_timing_cache(timing_cache, config, cache)
        return bytes(serialized)  # IHostMemory has the buffer protocol

    def _save_timing_cache(self, path: Path, config, cache) -> None:
        """Merge this build's timings (the cache attached to `config`, which the build updated) into the
        file under its lock, so concurrent builders keep both. ITimingCache.combine returns False for
        a cache of another TensorRT version (then ours replaces it)."""
        with ec.build_lock(path):
            merged = cache
            if path.is_file():
                on_disk = config.create_timing_cache(path.read_bytes())
                if on_disk is not None and on_disk.combine(cache, False):
                    merged = on_disk
            data = bytes(merged.serialize())
            atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


# ---- one export -----------------------------------------------------------------------------
@dataclass(frozen=True)
class BuiltEngine:
    stage: str
    path: Path
    status: str  # "cached", "built" or "rebuilt"
    key: ec.EngineKey


def lint_for(export_dir: Path, trt_version: str) -> None:
    """Refuse graphs the ONNX-TensorRT parser of this version cannot import (needs the onnx package;
    skipped without it, since parsing will then say the same at build time)."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        return
    from .lint import lint_export

    target = "11" if trt_major(trt_version) >= 11 else "10.3"
    errors = [f for f in lint_export(export_dir, target) if f.severity == "error"]
    if errors:
        more = f" (+{len(errors) - 1} more; run bitdance_rt.engines.lint_export)" if len(errors) > 1 else ""
        raise BitDanceError(f"TensorRT {target} lint: {errors[0]}{more}")


@dataclass(frozen=True, eq=False)
class EngineSet(Mapping):
    """What a build hands to the TensorRT backend: every built engine of one export, ready to deserialise.

    A Mapping stage -> BuiltEngine (what build_engines returned before it was a class: `built[stage].status`);
    besides: the export the engines were built from (ExportInfo: manifest, config, stage contracts), the
    engine precision, the toolkit that built them (its `trt` module and `logger` deserialise them) and the
    CUDA device index they were built on (None: the current one). Every stage is built eagerly; a
    backend may still deserialise one only on first use (head_step behind the fused sampler) through
    `serialized(stage)`, which reads the file built here."""

    export: ExportInfo
    engines: dict[str, BuiltEngine]
    precision: str
    toolkit: object
    device: int | None = None

    def __getitem__(self, stage: str) -> BuiltEngine:
        return self.engines[stage]

    def __iter__(self):
        return iter(self.engines)

    def __len__(self) -> int:
        return len(self.engines)

    @property
    def directory(self) -> Path:
        return self.export.directory

    @property
    def paths(self) -> dict[str, Path]:
        """stage -> engine file."""
        return {stage: built.path for stage, built in self.engines.items()}

    def serialized(self, stage: str) -> bytes:
        """The engine file of `stage`, or a one-line error (not built, or removed since the build)."""
        if stage not in self.engines:
            raise BitDanceError(f"no {stage} engine was built for {self.directory}; re-export and build with it")
        path = self.engines[stage].path
        try:
            return path.read_bytes()
        except OSError as exc:
            raise BitDanceError(
                f"{path}: the {stage} engine cannot be read ({exc.strerror or exc}); it was removed after the "
                "build? Restart to rebuild it"
            ) from None


def export_stages_to_build(manifest: dict, directory: Path, stages=None) -> list[str]:
    have = list(manifest.get("stage_files", {}))
    order = {s: i for i, s in enumerate(st.ALL_STAGES)}
    if stages is None:
        return sorted(have, key=lambda s: order.get(s, len(order)))
    missing = [s for s in stages if s not in have]
    if missing:
        raise BitDanceError(f"{directory} has no stage(s) {', '.join(missing)} (it has {', '.join(have)})")
    return list(stages)


def build_engines(
    export_dir,
    precision: str | None = None,
    workspace_mb=None,
    level: int = 3,
    stages=None,
    root=None,
    toolkit=None,
    lint: bool = True,
    verify_hashes: bool = True,
    lock_timeout: float | None = None,
    device: int | None = None,
    weight_streaming: bool = False,
) -> EngineSet:
    """Engines for the stages of an export (all by default): cached ones reused, others built.
    `weight_streaming`: the backbone's engine is built streamable (`streamable_plan`).

    What a build does, per stage:
      1. the export is validated (manifest, contract, file sizes and sha256) and linted against the
         ONNX-TensorRT operator list of the TensorRT major version in use (engines.lint);
      2. the precision plan comes from the graphs' precision and the request (engines.options);
      3. the optimisation profiles come from the stage contract (engines.profiles): one (batch
         min/opt/max) per stage, and one per phase for a stage with phases (the backbone: prefill,
         step), all in ONE engine so its weights are held once;
      4. the engine-cache key (ONNX sha256, precision, profiles, GPU name + compute capability,
         TensorRT version, optimisation level, workspace cap, plan flags) is looked up: a hit is used,
         a stale engine is rebuilt with a message naming what changed, a miss is built;
      5. builds run under a per-engine file lock (a second process waits, then finds a hit); the
         engine and its sidecar are written atomically; a persistent timing cache per (TensorRT
         version, GPU) speeds up rebuilds and is merged under its own lock.

    `export_dir`: an export directory, or its ExportInfo already opened (and checked) by the caller.
    `toolkit`: a TensorRT(device) (default: TensorRT(device or 0)) or any object with .version, .gpu
    (GpuInfo) and .build(onnx_path, plan, profiles, workspace_bytes, level, timing_cache_path) -> bytes;
    with a toolkit, its own .device (if any) is the EngineSet's. TensorRT builds on the current CUDA device:
    the caller makes `device` current (TensorRT.__init__).
    """
    # contract written by this version, or a one-line refusal
    export = export_dir if isinstance(export_dir, ExportInfo) else open_export(export_dir)
    export.verify_files(hashes=verify_hashes)
    directory, manifest, specs, graphs = export.directory, export.manifest, export.specs, export.precision
    workspace = workspace_bytes(workspace_mb)
    level = opt_level(level)
    names = export_stages_to_build(manifest, directory, stages)
    if toolkit is None:
        toolkit = TensorRT(device=device or 0)
    device = getattr(toolkit, "device", device)
    plan = plan_precision(graphs, precision, toolkit.version, manifest.get("int4_format"))
    if plan.precision == "bf16" and int(str(toolkit.gpu.compute_capability).split(".")[0]) < 8:
        raise BitDanceError(
            f"BF16 engines need an Ampere or later GPU (compute capability 8.0+); {toolkit.gpu.name} is "
            f"{toolkit.gpu.compute_capability}: use --precision fp16"
        )
    if lint:
        lint_for(directory, toolkit.version)
    root = Path(root) if root is not None else ec.engine_root()
    timing = timing_cache_path(root, toolkit.version, toolkit.gpu)
    out = {}
    base = plan
    for stage in names:
        plan = streamable_plan(base) if weight_streaming and stage == st.BACKBONE else base
        profiles = stage_profiles(specs[stage])
        key = ec.engine_key(
            manifest,
            stage,
            plan.precision,
            profiles,
            toolkit.gpu.name,
            toolkit.gpu.compute_capability,
            toolkit.version,
            level,
            workspace,
            plan.key_flags,
        )
        found = ec.lookup(key, root)
        if found.hit:
            logger.info("%s: engine up to date (%s)", stage, found.path)
            out[stage] = BuiltEngine(stage, found.path, "cached", key)
            continue
        onnx_path = directory / export.stage_files(stage)[0]
        if found.status == "stale":
            logger.info("%s: rebuilding: %s", stage, found.reason)
        else:
            logger.info(
                "%s: building %s engine with TensorRT %s on %s (sm %s)",
                stage,
                plan.precision,
                toolkit.version,
                toolkit.gpu.name,
                toolkit.gpu.compute_capability,
            )
        built = []

        def build(onnx_path=onnx_path, profiles=profiles, plan=plan):
            built.append(True)
            return toolkit.build(onnx_path, plan, profiles, workspace, level, timing)

        path = ec.get_or_build(key, build, root, timeout=lock_timeout)
        status = ("rebuilt" if found.status == "stale" else "built") if built else "cached"
        if not built:
            logger.info("%s: another process built it meanwhile (%s)", stage, path)
        else:
            logger.info("%s: wrote %s", stage, path)
        out[stage] = BuiltEngine(stage, path, status, key)
    return EngineSet(export, out, base.precision, toolkit, device)

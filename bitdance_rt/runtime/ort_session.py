"""Make ONNX Runtime sessions quickly and safely: a cache of ONNX Runtime's optimised graphs (and,
from graph_signature.py, a graph's signature without its weights).

`make_session` has ONNX Runtime save the graph it optimised on the first call and loads that graph
with graph optimisation disabled on later ones, which skips the expensive part of session creation
(docs/serving.md "Start-up"). The optimised graph is what ONNX Runtime would run anyway, so outputs
are bit-identical (tested, and measured on a B-4x export). ONNX Runtime documents limits on saved
optimised graphs: they are specific to its version, settings, providers and the CPU, so all of
these name a cache entry (`full_key`), and only CPU-EP sessions are cached (CACHEABLE_PROVIDERS).
An entry is checked as strongly as an export before it is loaded (`_read_meta`) and written
atomically (`_create_and_save`); a bad entry or an unwritable cache costs a warning, never the
session.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
from pathlib import Path

from .. import paths
from ..fileio import cached_sha256, file_sha256, make_work_dir, warn_once
from .graph_signature import graph_signature  # noqa: F401  (re-exported: the backends' one import place)

MODEL = "model.onnx"
DATA = "model.onnx.data"
META = "meta.json"
META_FORMAT = "bitdance-rt-ort-optimized/2"  # /2: files' sha256 recorded
TMP_PREFIX = ".tmp-"
# Graphs with nodes compiled by an execution provider (TensorRT, OpenVINO, ...) cannot be saved, and
# graphs optimised for one EP may hold nodes another EP cannot run: only sessions whose providers are
# all here use the cache; others are made directly (the TensorRT EP has its own engine cache).
CACHEABLE_PROVIDERS = ("CPUExecutionProvider",)
EXTERNAL_DATA_ENTRY = "session.optimized_model_external_initializers_file_name"
MAX_ENTRIES = 24  # least recently used entries beyond this are deleted when a new one is installed

# Session config entries that change what the graph optimisers produce: part of the cache name.
GRAPH_CONFIG_ENTRIES = (
    "session.x64quantprecision",
    "session.qdqisint8allowed",
    "session.disable_quant_qdq",
    "session.enable_quant_qdq_cleanup",
    "session.disable_double_qdq_remover",
    "session.disable_aot_function_inlining",
    "session.qdq_matmulnbits_accuracy_level",
    "optimization.enable_gelu_approximation",
    "optimization.disable_specified_optimizers",
    "optimization.minimal_build_optimizations",
    "optimization.enable_cast_chain_elimination",
    "mlas.enable_gemm_fastmath_arm64_bfloat16",
    "session.optimized_model_external_initializers_min_size_in_bytes",
)


def trt_profile_options(spec, per_phase: bool = False) -> dict[str, str]:
    """TensorRT EP provider options with the contract's min/opt/max shapes of the dynamic inputs.

    A stage with phases (the backbone) gets, by default, ONE profile spanning them, tuned for the
    step: the EP parses several profiles (each input listed once per profile, ParseProfileShapes in
    tensorrt_execution_provider_utils.h) and builds them into its engine, but keeps the execution
    context on profile 0, so a call outside profile 0 fails (onnxruntime PR #31624, still open when
    this was written, adds runtime switching). `per_phase=True` lists one profile per phase, for an EP that
    switches."""
    from ..engines.profiles import multi_shape_strings, shape_strings, spanning_profile, stage_profiles

    lo, opt, hi = multi_shape_strings(stage_profiles(spec)) if per_phase else shape_strings(spanning_profile(spec))
    return {"trt_profile_min_shapes": lo, "trt_profile_opt_shapes": opt, "trt_profile_max_shapes": hi}


# ---- the optimised-graph cache --------------------------------------------------------------------
def default_cache_dir() -> Path:
    """<cache root>/ort-optimized ($BITDANCE_RT_CACHE, else ~/.cache/bitdance-rt): bitdance_rt.paths."""
    return paths.ort_optimized_root()


def _cpu_fingerprint() -> str:
    """The CPU features the running code can use (numpy's cpuid probe), and the machine type."""
    try:
        try:
            from numpy._core._multiarray_umath import __cpu_features__ as found
        except ImportError:  # numpy < 2
            from numpy.core._multiarray_umath import __cpu_features__ as found
        feats = sorted(k for k, v in found.items() if v)
    except ImportError:
        feats = []
    return f"{platform.machine().lower()}:{','.join(feats)}"


def _config_entries(options) -> dict[str, str]:
    out = {}
    for name in GRAPH_CONFIG_ENTRIES:
        try:
            out[name] = options.get_session_config_entry(name)
        except Exception:  # onnxruntime raises RuntimeError (no such entry)
            pass
    return out


def full_key(options, providers, key: str) -> dict:
    """Everything that decides the optimised graph: the caller's key (source graph hash etc.), ONNX
    Runtime's version, the optimisation level, the providers, the graph-steering config entries,
    the CPU. ONNX Runtime documents saved optimised graphs as specific to its version, the
    optimisation level, the session settings that steer optimisers (e.g. session.x64quantprecision
    rewrites int8 weights to uint8) and the CPU (layout optimisations such as NCHWc pick a block
    size from the ISA)."""
    import onnxruntime as ort

    return {
        "key": key,
        "onnxruntime": ort.__version__,
        "opt_level": str(options.graph_optimization_level),
        "providers": [[p, {str(k): str(v) for k, v in o.items()}] for p, o in _provider_pairs(providers)],
        "config": _config_entries(options),
        "cpu": _cpu_fingerprint(),
    }


def entry_name(full: dict) -> str:
    return hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:24]


def _provider_pairs(providers) -> list[tuple[str, dict]]:
    pairs = []
    for p in providers or ["CPUExecutionProvider"]:
        if isinstance(p, (tuple, list)):
            pairs.append((str(p[0]), dict(p[1]) if len(p) > 1 and p[1] else {}))
        else:
            pairs.append((str(p), {}))
    return pairs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _warn(msg: str) -> None:
    print(f"bitdance-rt: warning: {msg}", file=sys.stderr)


def _read_meta(entry: Path, full: dict) -> str | None:
    """None when the entry is complete and belongs to `full`, else why not.

    An entry is a directory <cache_dir>/<name>/ with model.onnx, model.onnx.data and meta.json (the
    full key, the file sizes and sha256s), checked as strongly as an export: sizes, then sha256
    through fileio.cached_sha256 (memoised by path, size, mtime and inode; a change that keeps all
    of these, e.g. bit rot with the mtime restored, is the blind spot it shares with export checks)."""
    try:
        meta = json.loads((entry / META).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{entry / META} unreadable ({type(exc).__name__})"
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT or meta.get("full_key") != full:
        return f"{entry / META} holds another key or format"
    for name, size in (meta.get("bytes") or {}).items():
        try:
            got = (entry / name).stat().st_size
        except OSError:
            return f"{entry / name} is missing"
        if got != size:
            return f"{entry / name} has {got} bytes, {META} records {size}"
    if not (entry / MODEL).is_file():
        return f"{entry / MODEL} is missing"
    digests = meta.get("sha256") or {}
    for name in meta.get("bytes") or {}:  # what ONNX Runtime would run must be what was written
        try:
            ok = cached_sha256(entry / name) == digests.get(name)
        except OSError as exc:
            return f"{entry / name} unreadable ({exc.strerror or exc})"
        if not ok:
            return f"{entry / name} does not match the sha256 in {META} (corrupt)"
    return None


def _dead_writer(p: Path) -> bool:
    """An unlocked temporary directory (an older version's, or a trash directory) whose pid is gone:
    names are <TMP_PREFIX><entry>-<pid>-..., entry names have no '-'."""
    if not p.name.startswith(TMP_PREFIX):
        return False
    try:
        os.kill(int(p.name[len(TMP_PREFIX) :].split("-")[1]), 0)
    except ProcessLookupError:
        return True
    except (ValueError, IndexError, OSError):
        return False
    return False


def _cache_unwritable(cache_dir: Path, why: str) -> None:
    """One line per process: a read-only or full cache would otherwise warn for every session."""
    warn_once(
        f"warning: cannot write the optimised-graph cache in {cache_dir} ({why}); making sessions without it",
        key=("ort-cache-unwritable", str(cache_dir)),
    )


class _Restore:
    """Put back the SessionOptions fields make_session changes, so the caller's object is as given."""

    def __init__(self, options):
        self.options = options
        self.level = options.graph_optimization_level
        self.path = options.optimized_model_filepath

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.options.graph_optimization_level = self.level
        self.options.optimized_model_filepath = self.path
        return False


def make_session(
    path: str | Path,
    options,
    providers,
    *,
    cache_dir: str | Path | None = None,
    key: str | None = None,
    max_entries: int | None = MAX_ENTRIES,
):
    """An onnxruntime.InferenceSession for the graph at `path` with the caller's `options` (threads,
    config entries, int8 kernel switch: all kept) and `providers` (names or (name, options) pairs).

    With `cache_dir` (and `key`: a string naming the source graph, e.g. its sha256, plus anything
    else the caller's settings change: free-dimension overrides added to `options` cannot be read
    back, so include them in `key`): the optimised graph is saved on the first call and loaded
    with graph optimisation disabled on later ones. The cache is bypassed with optimisation disabled
    or a provider outside CACHEABLE_PROVIDERS. An entry that fails the checks (`_read_meta`) or fails
    to load is deleted, the session is made from the original graph (re-creating the entry), and one
    warning line says so. A hit marks its entry used; installing a new entry deletes the least recently used
    ones beyond `max_entries` (None: keep all). `options` is returned to its given state
    (optimisation level, optimized_model_filepath); the external-initializers config entry stays
    on it (inert without optimized_model_filepath). ONNX Runtime's exceptions propagate."""
    import onnxruntime as ort

    path = Path(path)
    providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
    if cache_dir is None:
        return ort.InferenceSession(str(path), options, providers=providers)
    if not key:
        raise ValueError("make_session: a cache_dir needs a key naming the source graph")
    if options.optimized_model_filepath:
        raise ValueError("make_session: options.optimized_model_filepath is set; pass either it or cache_dir")
    if options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL or any(
        p not in CACHEABLE_PROVIDERS for p, _ in _provider_pairs(providers)
    ):
        return ort.InferenceSession(str(path), options, providers=providers)

    cache_dir = Path(cache_dir)
    full = full_key(options, providers, key)
    entry = cache_dir / entry_name(full)
    with _Restore(options) as given:
        if entry.is_dir():
            why = _read_meta(entry, full)
            if why is None:
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                try:
                    session = ort.InferenceSession(str(entry / MODEL), options, providers=providers)
                    _touch(entry)
                    return session
                except Exception as exc:  # onnxruntime's pybind exception types
                    why = f"ONNX Runtime cannot load it ({_first_line(exc)})"
                finally:
                    options.graph_optimization_level = given.level
            _warn(f"discarding the cached optimised graph {entry} ({why}); re-optimising {path.name}")
            _discard(entry)
        session = _create_and_save(path, options, providers, cache_dir, entry, full, ort)
    if max_entries is not None:
        prune(cache_dir, max_entries, keep=entry)
    return session


def _touch(entry: Path) -> None:
    try:
        os.utime(entry / META)
    except OSError:
        pass


def prune(cache_dir: str | Path, max_entries: int, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used entries (by their meta.json's mtime) beyond `max_entries`;
    returns the deleted ones. `keep` is never deleted."""

    def used(p: Path) -> float:
        try:
            return (p / META).stat().st_mtime
        except OSError:
            return 0.0

    try:
        entries = [p for p in Path(cache_dir).iterdir() if p.is_dir() and not p.name.startswith(TMP_PREFIX)]
    except OSError:
        return []
    entries.sort(key=used, reverse=True)
    doomed = [p for p in entries[max_entries:] if p != keep]
    for p in doomed:
        _discard(p)
    return doomed


def _discard(entry: Path) -> None:
    """Move the entry aside first (a rename is atomic), then delete it."""
    trash = entry.with_name(f"{TMP_PREFIX}{entry.name}-{os.getpid()}-{os.urandom(4).hex()}-trash")
    try:
        os.replace(entry, trash)
    except OSError:
        trash = entry
    shutil.rmtree(trash, ignore_errors=True)


def _create_and_save(path: Path, options, providers, cache_dir: Path, entry: Path, full: dict, ort):
    """The session from the original graph, its optimised graph saved into `entry` on the way.

    The entry is written in a locked temporary directory (fileio.make_work_dir) and renamed into
    place (`_install`), so a crashed run leaves no half entry that is later loaded, and its leftovers
    are swept by the next run. Saving can fail where loading would not (read-only, or a full disk:
    ONNX Runtime fails to write the external initializers): the session is then made without saving,
    with one warning per process, and only a failure of that is raised."""
    try:
        work = make_work_dir(cache_dir, prefix=f"{TMP_PREFIX}{entry.name}-{os.getpid()}-", legacy=_dead_writer)
    except OSError as exc:
        _cache_unwritable(cache_dir, exc.strerror or str(exc))
        return ort.InferenceSession(str(path), options, providers=providers)
    tmp = work.path
    try:
        options.optimized_model_filepath = str(tmp / MODEL)
        try:
            current = options.get_session_config_entry(EXTERNAL_DATA_ENTRY)
        except Exception:
            current = None
        if current != DATA:  # weights always external: an optimised graph may pass protobuf's 2 GB
            options.add_session_config_entry(EXTERNAL_DATA_ENTRY, DATA)
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime's pybind exception types
            options.optimized_model_filepath = ""
            session = ort.InferenceSession(str(path), options, providers=providers)  # fails: a real load error
            _cache_unwritable(cache_dir, _first_line(exc))
            return session
        try:
            _install(path, tmp, entry, full, work)
        except OSError as exc:  # full disk, read-only: the session is good, the cache is not written
            _cache_unwritable(cache_dir, exc.strerror or str(exc))
        return session
    finally:
        work.remove()


def _install(path: Path, tmp: Path, entry: Path, full: dict, work) -> None:
    """Record sizes and sha256s of what ONNX Runtime saved in `tmp`, and rename it to `entry`."""
    files = [f for f in (MODEL, DATA) if (tmp / f).is_file()]
    if MODEL not in files:
        _warn(f"ONNX Runtime saved no optimised graph for {path.name}; not cached")
        return
    meta = {
        "format": META_FORMAT,
        "full_key": full,
        "source": str(path),
        "bytes": {f: (tmp / f).stat().st_size for f in files},
        "sha256": {f: file_sha256(tmp / f) for f in files},
    }
    (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like an export directory
    for f in files:
        fd = os.open(tmp / f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    work.unlock_file()  # an entry holds no lock file (still locked until the work directory is released)
    try:
        os.rename(tmp, entry)  # atomic; fails if another process installed the entry first
    except OSError:
        if _read_meta(entry, full) is not None:  # what is there is not a complete entry: replace it
            _discard(entry)
            try:
                os.rename(tmp, entry)
            except OSError as exc:
                _warn(f"cannot install the optimised graph in {entry} ({exc.strerror or exc}); not cached")

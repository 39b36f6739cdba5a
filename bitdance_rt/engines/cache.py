"""The engine cache: which TensorRT engine file belongs to which graph, GPU and build settings.

A serialized engine is valid only for the exact graph (sha256 of the ONNX file and its external
data, from the export manifest), precision, optimisation profiles (all of them, in order: the
runtime selects profile k for phase k), GPU model and compute capability, TensorRT version,
builder optimisation level and workspace cap it was built with.
All of these form the key; its hash names the file
    <root>/<stage>-<precision>-<16 hex>.engine   (root: bitdance_rt.paths.engines_root(),
                                                  $BITDANCE_RT_CACHE/engines or ~/.cache/bitdance-rt/engines)
and a JSON sidecar (<same>.json) holds the full key plus the engine's size and sha256. The
engine is written first and the sidecar last (both atomically), so an engine without a matching
sidecar is never used. `lookup` says hit / miss / stale, and for stale which key fields differ
(so a rebuild can say "TensorRT version changed"). `build_lock` serialises processes building
the same engine (fcntl.flock on <engine>.lock): the second waits, then finds a hit.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..fileio import atomic_write, file_sha256
from ..errors import BitDanceError
from ..paths import engines_root
from .profiles import Profile, profile_json

FORMAT = "bitdance-rt-engine/2"  # 2: `profiles` (one per phase) replaced `profile`
# Engine precisions a cache key may name (TensorRT builder precisions), not the graph precisions of an
# export (precision/policy.py PRECISIONS): an FP32 export may give an FP16 engine (engines/options.py).
ENGINE_PRECISIONS = ("fp32", "tf32", "fp16", "bf16", "int8", "int4", "fp8")
OPT_LEVELS = range(0, 6)  # IBuilderConfig.builder_optimization_level


def engine_root() -> Path:
    """The default engine cache (bitdance_rt.paths.engines_root)."""
    return engines_root()


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on. Equal keys <=> the cached engine may be used."""

    stage: str
    onnx_sha256: str
    data_sha256: str | None  # external weights (<stage>.onnx.data), if any
    precision: str
    profiles: tuple  # per profile, profile_json(...) as nested tuples: (((name, min, opt, max), ...), ...)
    gpu_name: str
    compute_capability: str  # "9.0"
    trt_version: str
    opt_level: int = 3
    workspace_bytes: int | None = None  # None: no cap
    flags: tuple = field(default_factory=tuple)  # other builder switches, e.g. ("strongly_typed",)

    def __post_init__(self):
        if self.precision not in ENGINE_PRECISIONS:
            raise BitDanceError(f"engine precision {self.precision!r}: use one of {', '.join(ENGINE_PRECISIONS)}")
        if self.opt_level not in OPT_LEVELS:
            raise BitDanceError(f"builder optimisation level {self.opt_level!r}: use 0..5 (TensorRT's default is 3)")
        cap = self.workspace_bytes
        if cap is not None and not (isinstance(cap, int) and cap > 0):
            raise BitDanceError(f"workspace cap must be a positive number of bytes or None, got {cap!r}")

    def to_json(self) -> dict:
        data = asdict(self)
        data["profiles"] = [[[n, list(a), list(b), list(c)] for n, a, b, c in p] for p in self.profiles]
        data["flags"] = list(self.flags)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "EngineKey":
        data = dict(data)
        data["profiles"] = _freeze(data["profiles"])
        data["flags"] = tuple(data.get("flags", ()))
        return cls(**data)

    def digest(self) -> str:
        text = json.dumps({"format": FORMAT, **self.to_json()}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def filename(self) -> str:
        return f"{self.stage}-{self.precision}-{self.digest()[:16]}.engine"

    def differences(self, other: "EngineKey") -> list[str]:
        """Names of the fields whose values differ."""
        a, b = self.to_json(), other.to_json()
        return [k for k in a if a[k] != b.get(k)]


def _is_entry(x) -> bool:
    """(name, min, opt, max): one profile entry, where a profile (a list of entries) belongs."""
    return isinstance(x, (list, tuple)) and bool(x) and isinstance(x[0], str)


def _freeze(x):
    return tuple(_freeze(v) for v in x) if isinstance(x, (list, tuple)) else x


def engine_key(
    manifest: dict,
    stage: str,
    precision: str,
    profiles: list[Profile],
    gpu_name: str,
    compute_capability: str,
    trt_version: str,
    opt_level: int = 3,
    workspace_bytes: int | None = None,
    flags=(),
) -> EngineKey:
    """The key of `stage` of an export (its manifest: bitdance_rt.export.manifest.read_manifest);
    `profiles`: the engine's optimisation profiles in index order (profiles.stage_profiles)."""
    if not isinstance(profiles, (list, tuple)) or any(_is_entry(p) for p in profiles):
        raise BitDanceError(
            f"engine key of {stage}: give the list of its profiles (profiles.stage_profiles), not one profile"
        )
    try:
        files = [str(f) for f in manifest["stage_files"][stage]]
        hashes = [manifest["files"][f]["sha256"] for f in files]
    except (KeyError, TypeError):
        raise BitDanceError(f"the export manifest records no files for stage {stage}; re-export it") from None
    return EngineKey(
        stage,
        hashes[0],
        hashes[1] if len(hashes) > 1 else None,
        precision,
        _freeze([profile_json(p) for p in profiles]),
        gpu_name,
        str(compute_capability),
        trt_version,
        opt_level,
        workspace_bytes,
        tuple(flags),
    )


# ---- paths and lookup -----------------------------------------------------------------------
def engine_path(key: EngineKey, root: str | Path | None = None) -> Path:
    return Path(root if root is not None else engine_root()) / key.filename()


def sidecar_path(engine: Path) -> Path:
    return Path(engine).with_suffix(".json")


@dataclass(frozen=True)
class Lookup:
    status: str  # "hit", "miss" or "stale"
    path: Path  # where the engine for this key lives (or will)
    reason: str = ""
    differs: tuple = ()  # key fields that differ from the stale engine's
    stale_path: Path | None = None

    @property
    def hit(self) -> bool:
        return self.status == "hit"


def _read_sidecar(engine: Path) -> dict | None:
    try:
        data = json.loads(sidecar_path(engine).read_text())
        return data if isinstance(data, dict) else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def check_engine(engine: str | Path, key: EngineKey, hashes: bool = False) -> Lookup:
    """Compare an existing engine file (and its sidecar) with `key`."""
    engine = Path(engine)
    if not engine.is_file():
        return Lookup("miss", engine, f"{engine} does not exist")
    side = _read_sidecar(engine)
    if side is None:
        return Lookup(
            "stale",
            engine,
            f"{sidecar_path(engine)} is missing or unreadable (interrupted build?)",
            ("sidecar",),
            engine,
        )
    if side.get("format") != FORMAT:  # e.g. /1: one profile per engine, before the backbone had two phases
        return Lookup(
            "stale",
            engine,
            f"{sidecar_path(engine)} is of engine format {side.get('format')!r}, this version writes {FORMAT!r}",
            ("format",),
            engine,
        )
    try:
        stored = EngineKey.from_json(side["key"])
    except (KeyError, TypeError, BitDanceError) as exc:
        return Lookup("stale", engine, f"{sidecar_path(engine)} holds a malformed key ({exc})", ("sidecar",), engine)
    differs = tuple(key.differences(stored))
    if differs:
        detail = (
            "; ".join(
                f"{k}: {stored.to_json()[k]!r} -> {key.to_json()[k]!r}" for k in differs if k not in ("profiles",)
            )
            or "optimisation profiles changed"
        )
        return Lookup(
            "stale", engine, f"{engine} was built for another {', '.join(differs)} ({detail})", differs, engine
        )
    size = engine.stat().st_size
    if size != side.get("bytes") or (hashes and file_sha256(engine) != side.get("sha256")):
        return Lookup(
            "stale",
            engine,
            f"{engine} does not match the size/sha256 in its sidecar (truncated or replaced)",
            ("engine file",),
            engine,
        )
    return Lookup("hit", engine)


def lookup(key: EngineKey, root: str | Path | None = None, hashes: bool = False) -> Lookup:
    """hit: the key's engine is there and intact; stale: only engines of this stage built with other
    settings (the newest is named, with the differing fields); miss: none for this stage."""
    path = engine_path(key, root)
    found = check_engine(path, key, hashes)
    if found.status != "miss":
        return found
    others = sorted(path.parent.glob(f"{key.stage}-*.engine"), key=lambda p: p.stat().st_mtime, reverse=True)
    for other in others:
        old = check_engine(other, key, hashes)
        if old.status == "stale":
            return Lookup("stale", path, old.reason, old.differs, other)
    return Lookup("miss", path, f"no engine for stage {key.stage} in {path.parent}")


def store(key: EngineKey, engine: bytes, root: str | Path | None = None) -> Path:
    """Write the engine, then its sidecar (both atomically); returns the engine path."""
    path = engine_path(key, root)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(engine))
    side = {
        "format": FORMAT,
        "key": key.to_json(),
        "bytes": len(engine),
        "sha256": hashlib.sha256(engine).hexdigest(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write(sidecar_path(path), lambda tmp: Path(tmp).write_text(json.dumps(side, indent=1, sort_keys=True)))
    return path


# ---- builders of the same engine --------------------------------------------------------------
@contextlib.contextmanager
def build_lock(engine: str | Path, timeout: float | None = None, poll: float = 0.1):
    """Hold an exclusive cross-process lock for building `engine` (flock on <engine>.lock).

    Blocks until the lock is free, or raises BitDanceError after `timeout` seconds.
    """
    lock = Path(str(engine) + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if deadline is None else fcntl.LOCK_NB))
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BitDanceError(
                        f"another process has been building {engine} for over {timeout:g} s "
                        f"(lock {lock}; flock ends with its holder, so that builder still runs)"
                    ) from None
                time.sleep(poll)
        try:
            yield lock
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def get_or_build(key: EngineKey, build, root: str | Path | None = None, timeout: float | None = None) -> Path:
    """The cached engine of `key`, building it with build() -> bytes under the lock if needed."""
    path = engine_path(key, root)
    if lookup(key, root).hit:
        return path
    with build_lock(path, timeout):
        if lookup(key, root).hit:  # another process built it while we waited
            return path
        return store(key, build(), root)

"""File helpers that import nothing heavy (no torch): hashing, the hash cache and atomic writes.

The TensorRT build path (bitdance_rt.engines.build) runs on devices such as Jetson in a process
that must not import torch, so what it shares with the rest of the package lives here.
`bitdance_rt.checkpoint` re-exports file_sha256 and atomic_write. Two digests: `file_sha256`
reads the file (to verify content right after writing), `cached_sha256` memoises it on disk by
path, size, mtime and inode (identity checks of large files written earlier). `warn_once` prints a
warning once per process. Temporary work directories (`make_work_dir`) hold an flock while in
use, so what a killed process left behind is recognised and swept (`sweep_work_dirs`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

try:
    import fcntl
except ImportError:  # pragma: no cover  (not POSIX: no locks, no sweeping)
    fcntl = None

from . import paths
from .paths import cache_root  # noqa: F401  (re-exported)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of the whole file, read now: use it where content must be verified right
    after writing (cached_sha256 is for identity checks of files written earlier)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def current_umask() -> int:
    """The process umask, read without changing it where Linux tells it (/proc), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:  # os.umask has no read-only form: threads of this module at least do not race
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_umask_lock = threading.Lock()


def atomic_write(path: str | Path, write) -> Path:
    """Call write(tmp_path) and rename the temp file onto `path`: no half-written file remains.

    mkstemp makes the temp file 0600; it is given the mode an ordinary open() would (0666 less the
    umask), so PNGs, token files and converted checkpoints are as readable as the user's other files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # after: some writers replace the file (safetensors)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def os_error_text(exc: OSError) -> str:
    """`strerror: filename` of an OSError, for one-line messages that name the file."""
    text = exc.strerror or str(exc) or type(exc).__name__
    return f"{text}: {exc.filename}" if exc.filename else text


# ---- warnings once per process ----------------------------------------------------------------
_warned: set = set()
_warned_lock = threading.Lock()


def warn_once(message: str, key=None) -> bool:
    """Print `bitdance-rt: <message>` to stderr the first time `key` (default: the message) is seen
    in this process; True if printed. A condition that holds for every file or session (a read-only
    or full cache) is then one line, not one per file."""
    key = message if key is None else key
    with _warned_lock:
        if key in _warned:
            return False
        _warned.add(key)
    print(f"bitdance-rt: {message}", file=sys.stderr)
    return True


# ---- locked work directories ------------------------------------------------------------------
WORK_LOCK = ".bitdance-rt-work.lock"
LEGACY_AGE_S = 24 * 3600  # unlocked work directories (older versions) older than this are litter


class WorkDir:
    """A temporary directory this process works in, locked (flock) until `remove` or `release`."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self._fd = path, fd

    def unlock_file(self) -> None:
        """Delete the lock file (the directory is about to become something else, e.g. a cache
        entry); the lock is still held until release(). Sweepers skip a directory without one."""
        try:
            (self.path / WORK_LOCK).unlink()
        except OSError:
            pass

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        """Delete the directory (while still holding its lock), then drop the lock."""
        try:
            shutil.rmtree(self.path, ignore_errors=True)
        finally:
            self.release()

    def __enter__(self) -> WorkDir:
        return self

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False


def _hold_lock(directory: Path) -> int | None:
    """Create directory/WORK_LOCK already locked: it is written under another name, locked, then
    renamed, so a sweeper never finds the lock file free while its creator is alive."""
    if fcntl is None:  # pragma: no cover
        return None
    staging = directory / (WORK_LOCK + ".new")
    fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())  # for people looking; the lock is what counts
        os.rename(staging, directory / WORK_LOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_work_dir(
    parent: str | Path, prefix: str, suffix: str = "", legacy: Callable[[Path], bool] | None = None
) -> WorkDir:
    """A new locked work directory in `parent` (created if needed), after sweeping `parent` of the
    work directories of dead processes (see sweep_work_dirs). Exports, precision variants,
    calibration sets and optimised graphs are written in one and renamed into place."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    sweep_work_dirs(parent, legacy)
    path = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    try:
        fd = _hold_lock(path)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return WorkDir(path, fd)


def sweep_work_dirs(parent: str | Path, legacy: Callable[[Path], bool] | None = None) -> list[Path]:
    """Remove the hidden directories in `parent` holding a WORK_LOCK that nobody holds (their
    creator died: kill -9, SIGTERM, OOM); returns them. A locked one (a live writer, in this process
    or another) is left alone. A hidden directory without a lock file is removed only if
    `legacy(path)` says it is an unlocked work directory of a dead writer. Never raises. The kernel
    drops an flock when its process dies, so a reused PID cannot keep litter alive."""
    removed: list[Path] = []
    if fcntl is None:  # pragma: no cover
        return removed
    try:
        candidates = [p for p in Path(parent).iterdir() if p.name.startswith(".")]
    except OSError:
        return removed
    for p in candidates:
        if p.is_symlink():  # a link is nobody's work directory (and rmtree refuses it)
            continue
        try:
            fd = os.open(p / WORK_LOCK, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            try:
                if legacy is not None and legacy(p) and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
            except OSError:
                pass
            continue
        except OSError:  # not a directory, unreadable: not ours to judge
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its writer is alive
            os.close(fd)
            continue
        try:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        finally:
            os.close(fd)
    return removed


def older_than(path: Path, seconds: float = LEGACY_AGE_S) -> bool:
    """`path` was last modified more than `seconds` ago (for unlocked leftovers of older versions)."""
    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False


# ---- the persistent hash cache ------------------------------------------------------------------
# The cache root and the file's place come from bitdance_rt.paths (stdlib-only, like this module).
HASH_CACHE_FILE = paths.HASH_CACHE_FILE
HASH_CACHE_FORMAT = "bitdance-rt-file-hashes/1"
HASH_CACHE_MAX_ENTRIES = 4096
RACY_NS = 2_000_000_000  # files modified less than this ago are hashed but not cached (coarse mtimes)
_hash_cache_lock = threading.Lock()


def hash_cache_path() -> Path:
    """<cache root>/file-hashes.json (cache root: $BITDANCE_RT_CACHE, else ~/.cache/bitdance-rt)."""
    return paths.hash_cache_file()


def _file_key(path: Path) -> tuple[str, dict]:
    resolved = path.resolve()
    st = resolved.stat()
    return str(resolved), {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "dev": st.st_dev}


def _read_hash_cache(path: Path, quiet: bool = False) -> dict:
    """The cache's entries, or {} when it is missing, unreadable or malformed (then it is rebuilt)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        if not quiet:
            warn_once(
                f"ignoring unreadable hash cache {path} ({type(exc).__name__}); hashes will be recomputed",
                key=("hash-cache-unreadable", str(path)),
            )
        return {}
    if not isinstance(data, dict) or data.get("format") != HASH_CACHE_FORMAT or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def _valid_entry(entry, stat: dict) -> bool:
    return (
        isinstance(entry, dict)
        and all(entry.get(k) == v for k, v in stat.items())
        and isinstance(entry.get("sha256"), str)
        and len(entry["sha256"]) == 64
    )


def cached_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file, memoised in <cache root>/file-hashes.json: for identity checks of
    large files written earlier (checkpoints, exports, the optimised-graph cache), so a second
    process does not re-read a 2.9 GB checkpoint.

    Keyed by (resolved path, size, mtime_ns, inode, device): a file whose size or mtime changed
    (or that was replaced by another file) is re-hashed, as is a file rewritten in place (new mtime,
    usually new size); what it cannot see is a change that keeps size and mtime (bit rot, or a tool
    that restores mtime), the usual trade-off of build caches. A missing, corrupt or unwritable cache
    never fails the call: the digest is computed and returned. The cache keeps the
    HASH_CACHE_MAX_ENTRIES most recently used entries and is rewritten atomically."""
    path = Path(path)
    name, stat = _file_key(path)
    cache_file = hash_cache_path()
    with _hash_cache_lock:
        entry = _read_hash_cache(cache_file).get(name)
    if _valid_entry(entry, stat):
        return entry["sha256"]
    digest = file_sha256(path)
    if _file_key(path)[1] != stat:  # changed while being read: do not remember a digest of a moving target
        return digest
    if time.time_ns() - stat["mtime_ns"] < RACY_NS:
        # Modified just now: a same-size rewrite within the file system's timestamp granularity
        # would keep this mtime, so the digest is not remembered yet (git's "racy" rule).
        return digest
    with _hash_cache_lock:
        files = _read_hash_cache(cache_file, quiet=True)  # re-read: another process may have added entries meanwhile
        files[name] = {**stat, "sha256": digest, "used": time.time()}
        if len(files) > HASH_CACHE_MAX_ENTRIES:
            newest = sorted(files.items(), key=lambda kv: _used(kv[1]), reverse=True)[:HASH_CACHE_MAX_ENTRIES]
            files = dict(newest)
        text = json.dumps({"format": HASH_CACHE_FORMAT, "files": files}, sort_keys=True)
        try:
            atomic_write(cache_file, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        except OSError as exc:  # read-only home, full disk: the digest is still right (said once)
            warn_once(
                f"cannot write hash cache {cache_file} ({exc.strerror or exc}); continuing without it",
                key=("hash-cache-unwritable", str(cache_file)),
            )
    return digest


def _used(entry) -> float:
    try:
        return float(entry.get("used", 0.0))
    except (AttributeError, TypeError, ValueError):
        return 0.0

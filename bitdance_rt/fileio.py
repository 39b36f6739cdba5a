"""File helpers that import nothing heavy (no torch): hashing, the hash cache and atomic writes.

The TensorRT build path (bitdance_rt.engines.build) runs on devices such as Jetson in a process
that must not import torch, so what it shares with the rest of the package lives here.
`bitdance_rt.checkpoint` re-exports file_sha256 and atomic_write.

`file_sha256` reads the whole file; use it where content must be verified right after writing.
`cached_sha256` is for identity checks of large files that were written earlier (checkpoints,
exports): it memoises the digest on disk, keyed by the file's resolved path, size, mtime_ns and
inode, so a second process does not re-read a 2.9 GB checkpoint. A file rewritten in place gets a
new mtime (and usually size) and is re-hashed; what it cannot see is a change that keeps size and
mtime (bit rot, or a tool that restores mtime), which is the usual trade-off of build caches.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import paths
from .paths import cache_root  # noqa: F401  (re-exported)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: str | Path, write) -> Path:
    """Call write(tmp_path) and rename the temp file onto `path`: no half-written file remains."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
            print(f"bitdance-rt: ignoring unreadable hash cache {path} ({type(exc).__name__}); "
                  "hashes will be recomputed", file=sys.stderr)
        return {}
    if not isinstance(data, dict) or data.get("format") != HASH_CACHE_FORMAT or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def _valid_entry(entry, stat: dict) -> bool:
    return (isinstance(entry, dict) and all(entry.get(k) == v for k, v in stat.items())
            and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64)


def cached_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file, memoised in <cache root>/file-hashes.json.

    Keyed by (resolved path, size, mtime_ns, inode, device): a file whose size or mtime changed
    (or that was replaced by another file) is re-hashed. A missing, corrupt or unwritable cache
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
        except OSError as exc:  # read-only home, full disk: the digest is still right
            print(f"bitdance-rt: cannot write hash cache {cache_file} ({exc.strerror or exc}); "
                  "continuing without it", file=sys.stderr)
    return digest


def _used(entry) -> float:
    try:
        return float(entry.get("used", 0.0))
    except (AttributeError, TypeError, ValueError):
        return 0.0

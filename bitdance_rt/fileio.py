"""File helpers that import nothing heavy (no torch): hashing and atomic writes.

The TensorRT build path (bitdance_rt.engines.build) runs on devices such as Jetson in a process
that must not import torch, so what it shares with the rest of the package lives here.
`bitdance_rt.checkpoint` re-exports both names.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


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

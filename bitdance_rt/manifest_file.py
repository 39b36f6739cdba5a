"""Reading the JSON manifest of a directory this package wrote (exports, calibration sets)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import BitDanceError


def read_manifest_file(directory: str | Path, name: str, fmt: str, kind: str, fix: str) -> dict:
    """directory/name as JSON whose key.format is `fmt`, or a one-line error saying what is wrong
    with the `kind` of directory (e.g. "export directory") and what to do (`fix`)."""
    directory = Path(directory)
    path = directory / name
    if not directory.is_dir():
        raise BitDanceError(f"{kind} not found: {directory} ({fix})")
    if not path.is_file():
        raise BitDanceError(f"{path} is missing: {directory} is not a complete {kind}; {fix}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BitDanceError(f"{path}: unreadable manifest ({exc}); {fix}") from None
    if not isinstance(data, dict) or not isinstance(data.get("key"), dict) or data["key"].get("format") != fmt:
        raise BitDanceError(f"{path}: not a {fmt} manifest (another tool or version wrote it); {fix}")
    return data

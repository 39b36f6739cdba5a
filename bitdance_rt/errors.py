"""User-facing errors.

Anything the user can fix (a bad flag, a missing file, a checkpoint of the wrong model) raises
`BitDanceError` with one actionable line. The CLI prints that line and exits non-zero, without a
traceback; every other exception is a bug and keeps its traceback.
"""


class BitDanceError(Exception):
    """An error the user can act on; its message is a single line that names what to fix."""


class ConfigError(BitDanceError):
    """A model config (preset name, JSON file or argument value) is invalid."""


class CheckpointError(BitDanceError):
    """A checkpoint file is missing, unreadable, or does not fit the model."""

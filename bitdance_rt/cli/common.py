"""What the commands share once the options are parsed: the model they name, the typed run
options, the Pipeline, and output paths checked before any work.

Heavy modules (torch, the Pipeline) are imported inside the functions, when a command runs.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import BitDanceError


def _model(args):
    """The model of --model / --checkpoint / --vae (and --height / --width for text-to-image): its
    config only, no weights read yet."""
    from ..backends import resolve_model

    t2i = _t2i_checkpoint(args.checkpoint)
    size = (getattr(args, "height", None), getattr(args, "width", None), getattr(args, "max_text_tokens", None))
    return resolve_model(
        args.model, args.checkpoint, getattr(args, "vae", None), *(size if t2i else (None, None, None))
    )


def _options(args, **extra):
    """The run options of the command line, typed (backends.BackendOptions)."""
    from ..backends import BackendOptions

    fields = {
        "backend": "backend",
        "precision": "precision",
        "device": "device",
        "threads": "threads",
        "max_batch": "batch_size",
        "export_dir": "export_dir",
        "ort_provider": "ort_provider",
        "engine_dir": "engine_dir",
        "workspace_mb": "workspace_mb",
        "calibration": "calibration",
        "calib_method": "calib_method",
        "keep_float": "keep_float",
        "cfg_scale": "cfg",
        "cfg_schedule": "cfg_schedule",
    }
    values = {k: getattr(args, a) for k, a in fields.items() if getattr(args, a, None) is not None}
    if "keep_float" in values:
        values["keep_float"] = tuple(values["keep_float"])
    if getattr(args, "weight_streaming_budget", None) is not None:
        from ..plan.machines import parse_size

        values["weight_streaming_budget"] = parse_size(args.weight_streaming_budget)
    values["cuda_graphs"] = not getattr(args, "no_cuda_graphs", False)
    values["allow_pickle"] = args.unsafe_allow_pickle
    values["progress"] = not getattr(args, "quiet", False)
    values.update(extra)
    return BackendOptions(**values)


def _t2i_checkpoint(checkpoint) -> bool:
    """A text-to-image checkpoint: a directory (official, diffusers, ComfyUI files) or a ComfyUI main-model file."""
    from ..t2i.layouts import is_t2i_checkpoint

    return is_t2i_checkpoint(checkpoint)


def _is_t2i(args) -> bool:
    return getattr(args, "prompt", None) is not None or _t2i_checkpoint(args.checkpoint)


def _pipeline(args, source, steps: int, **extra):
    """The Pipeline of the command's options (export, variant and engines cached)."""
    from ..pipeline import Pipeline

    pipe = Pipeline.load(source, steps, _options(args, **extra))
    print(f"model: {pipe.description}")
    if source.checkpoint is None:
        print(
            f"note: no --checkpoint given for {source.config.name}, so it runs with RANDOM weights: the images are "
            "noise patterns, not pictures (omit --model for the embedded trained model)"
        )
    return pipe


def default_labels(cfg) -> list[int]:
    """One image per class for small models (the embedded digits: 0..9), else classes 0..7."""
    return list(range(cfg.num_classes if cfg.num_classes <= 16 else 8))


def _check_output(path, flag: str, directory: bool) -> None:
    """Refuse, before any work, an output path that cannot be written: a directory where a file is
    wanted, a file where a directory is wanted, or a path under a file."""
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        want = "a directory" if directory else "a file path"
        raise BitDanceError(f"{flag} {path}: it is {'a directory' if path.is_dir() else 'a file'}; give {want}")
    for parent in (path, *path.parents) if directory else path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise BitDanceError(f"{flag} {path}: {parent} is a file, so nothing can be written under it")
            import os

            if not os.access(parent, os.W_OK | os.X_OK):
                raise BitDanceError(f"{flag} {path}: {parent} is not writable")
            return

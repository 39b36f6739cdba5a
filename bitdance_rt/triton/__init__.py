"""Serving with Triton Inference Server: a model repository whose one decoupled Python-backend model
runs a bitdance_rt Pipeline in-process (docs/triton.md).

    from bitdance_rt.triton import write_repository
    write_repository("exports/digits", "triton-repo")   # = bitdance-rt triton-repo --export-dir ... --out ...

repository.py writes the repository; requests.py is what the model does, without Triton (its
tensors, parameters, request parsing, previews, streaming); model.py is the model's Triton shell
(copied into the repository; it imports triton_python_backend_utils, so it is not imported here).
"""

from .repository import DEFAULT_NAME, check_export, write_repository

__all__ = ["DEFAULT_NAME", "check_export", "write_repository"]

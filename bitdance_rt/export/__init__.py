"""torch -> ONNX export of the stages of the contract (bitdance_rt.stages), with a manifest.

Names are resolved lazily (PEP 562), so `import bitdance_rt.export.manifest` (what the TensorRT
engine builder reads) does not import torch through onnx_export.
"""

from __future__ import annotations

import importlib

_NAMES = {
    "MANIFEST": "manifest",
    "read_manifest": "manifest",
    "verify_files": "manifest",
    "DEFAULT_OPSET": "manifest",
    "MAX_OPSET": "manifest",
    "MIN_OPSET": "manifest",
    "ExportResult": "onnx_export",
    "checkpoint_source": "onnx_export",
    "export_files": "onnx_export",
    "export_stage": "stage_graph",
    "export_stages": "onnx_export",
    "random_source": "onnx_export",
}

__all__ = list(_NAMES)


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    globals()[name] = value
    return value

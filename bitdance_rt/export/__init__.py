"""torch -> ONNX export of the stages of the contract (bitdance_rt.stages), with a manifest."""

from .manifest import MANIFEST, read_manifest, verify_files
from .onnx_export import (DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, ExportResult, checkpoint_source, export_files,
                          export_stage, export_stages, random_source)

__all__ = ["MANIFEST", "read_manifest", "verify_files", "DEFAULT_OPSET", "MAX_OPSET", "MIN_OPSET", "ExportResult",
           "checkpoint_source", "export_files", "export_stage", "export_stages", "random_source"]

"""ONNX -> TensorRT: what can be checked without a GPU.

`lint` says whether an export's graphs are importable by a TensorRT version's ONNX parser,
`profiles` turns the stage contract into optimisation profiles, and `cache` names, finds and
locks engine files. The builder and runtime that need TensorRT itself live beside these and
import them; nothing here imports tensorrt.
"""

from .cache import EngineKey, Lookup, build_lock, engine_key, lookup
from .lint import TARGETS, Finding, lint_export, lint_graph
from .profiles import Profile, stage_profile, stage_profiles, trtexec_shapes

__all__ = [
    "EngineKey",
    "Lookup",
    "build_lock",
    "engine_key",
    "lookup",
    "TARGETS",
    "Finding",
    "lint_export",
    "lint_graph",
    "Profile",
    "stage_profile",
    "stage_profiles",
    "trtexec_shapes",
]

"""Calibration data for reduced-precision engines, captured from real sampling trajectories."""

from .capture import Capture, RecordingBackend, capture
from .dataset import CAPTURED_STAGES, MANIFEST, CalibrationSet, Sample, feed, load_calibration, save_calibration
from .policy import CapturePolicy
from .producer import (
    CAPTURE_BACKENDS,
    CAPTURE_PRECISIONS,
    capture_choice,
    describe_producer,
    ort_capture_backend,
    torch_capture_backend,
)
from .reader import StageDataReader

__all__ = [
    "Capture",
    "RecordingBackend",
    "capture",
    "CAPTURED_STAGES",
    "MANIFEST",
    "CalibrationSet",
    "Sample",
    "feed",
    "load_calibration",
    "save_calibration",
    "CapturePolicy",
    "CAPTURE_BACKENDS",
    "CAPTURE_PRECISIONS",
    "capture_choice",
    "describe_producer",
    "ort_capture_backend",
    "torch_capture_backend",
    "StageDataReader",
]

"""Reduced precision: FP16 and INT8 (Q/DQ) variants of exported stage graphs, and their accuracy."""

from .policy import CALIBRATION_METHODS, DEFAULT_PRECISION, PRECISIONS

__all__ = ["CALIBRATION_METHODS", "DEFAULT_PRECISION", "PRECISIONS"]

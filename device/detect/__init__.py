"""Held-item detection: a learned background, the item's box, and the held-item state machine."""

from __future__ import annotations

from device.detect.detector import (
    Box,
    Detection,
    DetectorPort,
    DetectState,
    ForcedSteadyDetector,
    HeldItemDetector,
    crop_with_margin,
    iou,
)

__all__ = [
    "Box",
    "DetectState",
    "Detection",
    "DetectorPort",
    "ForcedSteadyDetector",
    "HeldItemDetector",
    "crop_with_margin",
    "iou",
]

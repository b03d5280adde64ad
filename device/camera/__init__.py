"""Camera capture: a cv2.VideoCapture-shaped port, its adapters, the grab stage and a synthetic fake."""

from __future__ import annotations

from device.camera.buffer import END, BoundedQueue, Frame, OverflowPolicy
from device.camera.grab import CameraState, GrabStage
from device.camera.port import CameraError, CameraOpenError, CameraPort, Image

__all__ = [
    "END",
    "BoundedQueue",
    "CameraError",
    "CameraOpenError",
    "CameraPort",
    "CameraState",
    "Frame",
    "GrabStage",
    "Image",
    "OverflowPolicy",
]

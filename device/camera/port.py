"""The camera port: shaped like ``cv2.VideoCapture`` so the real capture and the fakes are interchangeable."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy.typing as npt

Image = npt.NDArray[Any]  # HxWx3 uint8 BGR (typed loosely: OpenCV's stubs return integer|floating arrays)


class CameraError(Exception):
    """Base of the camera package's errors."""


class CameraOpenError(CameraError):
    """A source could not be opened (device missing, URL refused, file unreadable)."""


@runtime_checkable
class CameraPort(Protocol):
    """One frame source. ``read`` returns (False, None) on a timeout, a lost device, or end of file."""

    @property
    def live(self) -> bool:
        """True for cameras and streams (keep the freshest frame), False for files (keep every frame)."""
        ...

    def open(self) -> bool:
        """Open (or reopen) the source; False when it cannot be opened now."""
        ...

    def read(self) -> tuple[bool, Image | None]:
        """The next frame, blocking at most the source's read timeout."""
        ...

    def release(self) -> None:
        """Close the source; safe to call twice."""
        ...

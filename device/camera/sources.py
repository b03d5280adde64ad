"""Camera adapters: OpenCV (USB index, RTSP/HTTP URL, video file), an image folder, and a synthetic fake."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from device.camera.port import CameraOpenError, CameraPort, Image

_LOGGER = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_URL = re.compile(r"^(rtsp|rtsps|http|https|rtmp|udp|tcp)://", re.IGNORECASE)
_REDACT = re.compile(r"(//[^:/@]+:)[^@]+@")


def redact(spec: str) -> str:
    """Hide the password of ``rtsp://user:pass@host`` style URLs in logs."""
    return _REDACT.sub(r"\1***@", spec)


class OpenCVSource:
    """``cv2.VideoCapture`` over a USB index, a stream URL (FFmpeg with timeouts) or a video file."""

    def __init__(
        self,
        spec: int | str,
        *,
        open_timeout_ms: int = 5000,
        read_timeout_ms: int = 5000,
        width: int | None = None,
        height: int | None = None,
        fps: float | None = None,
    ) -> None:
        self._spec = spec
        self._open_timeout_ms = open_timeout_ms
        self._read_timeout_ms = read_timeout_ms
        self._size = (width, height)
        self._fps = fps
        self._cap: cv2.VideoCapture | None = None
        self._is_url = isinstance(spec, str) and bool(_URL.match(spec))
        self._live = isinstance(spec, int) or self._is_url

    @property
    def live(self) -> bool:
        return self._live

    def open(self) -> bool:
        self.release()
        if self._is_url:
            # Timeouts only apply with the FFmpeg backend chosen explicitly (opencv#23207); the defaults
            # are 30 s, far too long for a kiosk that must say "camera lost" within a few seconds.
            params = [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, self._open_timeout_ms,
                cv2.CAP_PROP_READ_TIMEOUT_MSEC, self._read_timeout_ms,
            ]
            cap = cv2.VideoCapture(str(self._spec), cv2.CAP_FFMPEG, params)
        else:
            cap = cv2.VideoCapture(self._spec)
        if not cap.isOpened():
            cap.release()
            _LOGGER.warning("cannot open camera source %s", redact(str(self._spec)))
            return False
        if self._live:
            # Driver buffering (33-100 ms) is the largest latency term once inference is fast.
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        if self._size[0] and self._size[1]:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self._size[0])
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self._size[1])
        if self._fps and isinstance(self._spec, int):
            cap.set(cv2.CAP_PROP_FPS, self._fps)
        self._cap = cap
        return True

    def read(self) -> tuple[bool, Image | None]:
        if self._cap is None:
            return False, None
        ok, frame = self._cap.read()
        if not ok or frame is None:
            return False, None
        return True, frame

    def release(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class ImageFolderSource:
    """Every image of a folder in name order, once; unreadable files are logged and skipped."""

    def __init__(self, folder: Path, *, max_bytes: int = 20 << 20) -> None:
        self._folder = Path(folder)
        self._max_bytes = max_bytes
        self._files: list[Path] = []
        self._pos = 0
        self.skipped = 0

    @property
    def live(self) -> bool:
        return False

    def open(self) -> bool:
        if not self._folder.is_dir():
            return False
        self._files = sorted(p for p in self._folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        self._pos = 0
        return True

    def read(self) -> tuple[bool, Image | None]:
        while self._pos < len(self._files):
            path = self._files[self._pos]
            self._pos += 1
            try:
                data = path.read_bytes()[: self._max_bytes + 1]
            except OSError as exc:
                _LOGGER.warning("skipping unreadable image %s: %s", path, exc)
                self.skipped += 1
                continue
            img = None if len(data) > self._max_bytes else cv2.imdecode(np.frombuffer(data, np.uint8), 1)
            if img is None:
                _LOGGER.warning("skipping undecodable image %s", path)
                self.skipped += 1
                continue
            return True, img
        return False, None

    def release(self) -> None:
        self._files = []
        self._pos = 0


class SyntheticSource:
    """The shipped fake camera: frames from a generator factory (a generated scene, a test script)."""

    def __init__(self, frames: Callable[[], Iterator[Image]], *, live: bool = False) -> None:
        self._factory = frames
        self._live = live
        self._it: Iterator[Image] | None = None

    @property
    def live(self) -> bool:
        return self._live

    def open(self) -> bool:
        self._it = self._factory()
        return True

    def read(self) -> tuple[bool, Image | None]:
        frame = next(self._it, None) if self._it is not None else None
        return (False, None) if frame is None else (True, frame)

    def release(self) -> None:
        self._it = None


class PacedSource:
    """Delivers another source's frames no faster than ``fps``, like a camera (files, synthetic scenes)."""

    def __init__(
        self,
        inner: CameraPort,
        fps: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._inner = inner
        self._period_s = 1.0 / fps
        self._clock = clock
        self._sleep = sleep
        self._next_due = 0.0

    @property
    def live(self) -> bool:
        return self._inner.live

    def open(self) -> bool:
        self._next_due = self._clock()
        return self._inner.open()

    def read(self) -> tuple[bool, Image | None]:
        delay = self._next_due - self._clock()
        if delay > 0:
            self._sleep(delay)
        # Late frames do not bunch up: the schedule never runs more than one period behind.
        self._next_due = max(self._next_due + self._period_s, self._clock() - self._period_s)
        return self._inner.read()

    def release(self) -> None:
        self._inner.release()


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """A parsed ``camera.source`` string."""

    kind: str  # "usb" | "url" | "file" | "folder" | "synthetic"
    target: str


def parse_source(source: str) -> SourceSpec:
    """``0``/``usb:0`` -> USB, ``rtsp://``/``http://`` -> stream, a folder, a video file, or ``synthetic``."""
    s = source.strip()
    if s.isdigit():
        return SourceSpec("usb", s)
    if s.lower().startswith("usb:") and s[4:].isdigit():
        return SourceSpec("usb", s[4:])
    if _URL.match(s):
        return SourceSpec("url", s)
    if s.lower() == "synthetic" or s.lower().startswith("synthetic:"):
        return SourceSpec("synthetic", s.partition(":")[2])
    if Path(s).is_dir():
        return SourceSpec("folder", s)
    return SourceSpec("file", s)


def source_is_live(source: str) -> bool:
    """Cameras and streams are live (drop-oldest); files and folders are not (every frame)."""
    return parse_source(source).kind in ("usb", "url", "synthetic")


def open_source_factory(
    source: str,
    *,
    open_timeout_ms: int = 5000,
    read_timeout_ms: int = 5000,
    width: int | None = None,
    height: int | None = None,
    fps: float | None = None,
    synthetic: Callable[[], Iterator[Image]] | None = None,
) -> Callable[[], CameraPort]:
    """A factory making a fresh adapter for each (re)open of the configured source.

    ``fps`` asks a USB camera for that rate, and paces files, folders and synthetic scenes to it.
    """
    spec = parse_source(source)
    if spec.kind == "usb":
        return lambda: OpenCVSource(int(spec.target), open_timeout_ms=open_timeout_ms,
                                    read_timeout_ms=read_timeout_ms, width=width, height=height, fps=fps)
    if spec.kind == "url":
        return lambda: OpenCVSource(spec.target, open_timeout_ms=open_timeout_ms,
                                    read_timeout_ms=read_timeout_ms)
    make: Callable[[], CameraPort]
    if spec.kind == "file":
        if not Path(spec.target).is_file():
            raise CameraOpenError(f"video file {spec.target} does not exist")
        make = lambda: OpenCVSource(spec.target)  # noqa: E731
    elif spec.kind == "folder":
        make = lambda: ImageFolderSource(Path(spec.target))  # noqa: E731
    else:
        if synthetic is None:
            raise CameraOpenError("synthetic source requested without a frame generator")
        gen = synthetic
        make = lambda: SyntheticSource(gen, live=True)  # noqa: E731
        fps = fps or 30.0
    if fps:
        inner, rate = make, fps
        return lambda: PacedSource(inner(), rate)
    return make

"""The grab stage: reads a camera into a bounded queue, detects stalls and reopens with backoff + jitter."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Final

from device.camera.buffer import BoundedQueue, Frame
from device.camera.port import CameraPort

_LOGGER = logging.getLogger(__name__)

# A live source that answers read() with False at once (unplugged USB) would spin; this pause bounds the
# spin at ~50 tries/s while costing at most 20 ms of extra latency when the camera comes back.
_READ_RETRY_S: Final = 0.02


class CameraState(StrEnum):
    STOPPED = "stopped"
    OPENING = "opening"
    STREAMING = "streaming"
    STALLED = "stalled"  # opened, but no frame for stall_s: released and reopened after a backoff
    ERROR = "error"  # could not open: retried after a backoff
    ENDED = "ended"  # a file or folder reached its end


ALLOWED: Final[dict[CameraState, frozenset[CameraState]]] = {
    CameraState.STOPPED: frozenset({CameraState.OPENING}),
    CameraState.OPENING: frozenset({CameraState.STREAMING, CameraState.ERROR, CameraState.STOPPED}),
    CameraState.STREAMING: frozenset({CameraState.STALLED, CameraState.ENDED, CameraState.STOPPED,
                                      CameraState.OPENING}),
    CameraState.STALLED: frozenset({CameraState.OPENING, CameraState.STOPPED}),
    CameraState.ERROR: frozenset({CameraState.OPENING, CameraState.STOPPED}),
    CameraState.ENDED: frozenset({CameraState.STOPPED, CameraState.OPENING}),
}

HEALTHY: Final = frozenset({CameraState.OPENING, CameraState.STREAMING, CameraState.ENDED})


class InvalidTransition(RuntimeError):
    """A state change the table above does not allow (a bug, not a camera problem)."""


class GrabStage:
    """Owns one camera: open, read into ``queue``, report state, reopen on loss. ``run(stop)`` in a thread."""

    def __init__(
        self,
        factory: Callable[[], CameraPort],
        queue: BoundedQueue[Frame],
        *,
        stall_s: float = 5.0,
        backoff_min_s: float = 1.0,
        backoff_max_s: float = 30.0,
        loop: bool = False,
        on_state: Callable[[CameraState, CameraState], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._factory = factory
        self.queue = queue
        self._stall_s = stall_s
        self._backoff = (backoff_min_s, backoff_max_s)
        self._loop = loop
        self._on_state = on_state
        self._clock = clock
        self._rng = rng or random.Random()
        self._state = CameraState.STOPPED
        self._lock = threading.Lock()
        self.frames_in = 0
        self.reopens = 0
        self.last_frame_t: float | None = None

    @property
    def state(self) -> CameraState:
        return self._state

    @property
    def frames_dropped(self) -> int:
        return self.queue.dropped

    def _set(self, new: CameraState) -> None:
        with self._lock:
            old = self._state
            if new is old:
                return
            if new not in ALLOWED[old]:
                raise InvalidTransition(f"camera {old} -> {new}")
            self._state = new
        _LOGGER.info("camera %s -> %s", old.value, new.value)
        if self._on_state is not None:
            try:
                self._on_state(old, new)
            except Exception:
                _LOGGER.exception("camera on_state callback failed")

    def backoff_s(self, attempt: int) -> float:
        """Full-jitter exponential backoff: uniform in [min, min(max, min * 2**attempt)]."""
        lo, hi = self._backoff
        return self._rng.uniform(lo, min(hi, lo * (2 ** min(attempt, 16))))

    def run(self, stop: threading.Event) -> None:
        """Grab until ``stop`` (or the end of a file source); always ends with END in the queue."""
        attempt = 0
        try:
            while not stop.is_set():
                self._set(CameraState.OPENING)
                src = self._factory()
                try:
                    opened = src.open()
                except Exception:
                    _LOGGER.exception("camera open raised")
                    opened = False
                if not opened:
                    src.release()
                    self._set(CameraState.ERROR)
                    attempt += 1
                    stop.wait(self.backoff_s(attempt - 1))
                    continue
                self._set(CameraState.STREAMING)
                try:
                    outcome = self._stream(src, stop)
                finally:
                    src.release()
                if outcome == "stall_after_frames":
                    attempt = 0  # the camera worked: restart the backoff from its minimum
                if outcome == "stop":
                    break
                if outcome == "eof":
                    self._set(CameraState.ENDED)
                    if self._loop:
                        continue
                    return
                self._set(CameraState.STALLED)
                self.reopens += 1
                attempt += 1
                stop.wait(self.backoff_s(attempt - 1))
        finally:
            self.queue.close()
            if self._state is not CameraState.ENDED:
                self._set(CameraState.STOPPED)

    def _stream(self, src: CameraPort, stop: threading.Event) -> str:
        """Read until stop/eof/stall; return which ("frames" first if a stall followed good frames)."""
        live = src.live
        last_ok = self._clock()
        got_any = False
        seq = self.frames_in
        while not stop.is_set():
            t0 = self._clock()
            try:
                ok, image = src.read()
            except Exception:
                _LOGGER.exception("camera read raised")
                ok, image = False, None
            t1 = self._clock()
            if ok and image is not None:
                got_any = True
                last_ok = t1
                self.last_frame_t = t1
                self.frames_in += 1
                frame = Frame(seq=seq, t_capture=t1, image=image, read_ms=(t1 - t0) * 1000.0)
                seq += 1
                if not self.queue.put(frame, stop):
                    return "stop"
                continue
            if not live:
                return "eof"
            if t1 - last_ok >= self._stall_s:
                _LOGGER.warning("camera stalled: no frame for %.1f s", t1 - last_ok)
                return "stall_after_frames" if got_any else "stall"
            stop.wait(_READ_RETRY_S)
        return "stop"

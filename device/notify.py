"""systemd's notify protocol for the kiosk (``Type=notify``, ``WatchdogSec``), without libsystemd.

READY=1 once the kiosk serves; WATCHDOG=1 at half the watchdog period, but only while frames flow (the
pipeline processed a frame since the last ping) or while the camera is between attempts on its own (it
retries a dead camera with backoff: that loop is alive). A camera read or a pipeline that hangs stops
the pings, and systemd restarts the kiosk. Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

from device.camera.grab import CameraState

_LOGGER = logging.getLogger(__name__)

# The camera loop is alive and retrying on its own in these states: no frames expected, watchdog fed.
CAMERA_RETRYING = frozenset({CameraState.ERROR, CameraState.STALLED, CameraState.ENDED})


class Notifier:
    """Sends sd_notify datagrams to ``socket_path``; ``tick`` decides when the watchdog is fed."""

    def __init__(
        self,
        socket_path: str | None,
        watchdog_usec: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = socket_path
        self.watchdog_interval_s = None if not watchdog_usec else watchdog_usec / 2e6  # systemd: ping at half
        self._clock = clock
        self._last_progress: int | None = None
        self._next_ping = 0.0
        self._warned = False
        self.pings = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """From ``$NOTIFY_SOCKET`` / ``$WATCHDOG_USEC`` (``$WATCHDOG_PID``, when set, must be us)."""
        env = os.environ if environ is None else environ
        usec: int | None = None
        try:
            usec = int(env.get("WATCHDOG_USEC", "0")) or None
            if env.get("WATCHDOG_PID") and int(env["WATCHDOG_PID"]) != os.getpid():
                usec = None  # meant for another process (a wrapper that exec'd us keeps the pid)
        except ValueError:
            _LOGGER.warning("ignoring a malformed WATCHDOG_USEC/WATCHDOG_PID")
            usec = None
        return cls(env.get("NOTIFY_SOCKET") or None, usec)

    @property
    def enabled(self) -> bool:
        return self._path is not None

    def send(self, message: str) -> bool:
        """One datagram; never raises (a kiosk must not die because systemd went away)."""
        if self._path is None:
            return False
        addr = "\0" + self._path[1:] if self._path.startswith("@") else self._path
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(addr)
                s.sendall(message.encode())
            return True
        except OSError as exc:
            if not self._warned:
                self._warned = True
                _LOGGER.warning("sd_notify to %s failed: %s", self._path, exc)
            return False

    def ready(self, status: str = "serving") -> None:
        """The kiosk serves: systemd's start job completes (Type=notify)."""
        self.send(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")

    def stopping(self) -> None:
        self.send("STOPPING=1\nSTATUS=stopping")

    def tick(self, progress: int, *, idle_ok: bool = False) -> bool:
        """Feed the watchdog when due, if ``progress`` (frames processed) moved or ``idle_ok`` (the camera
        is retrying by itself); True when a ping was sent."""
        if self.watchdog_interval_s is None or self._path is None:
            return False
        now = self._clock()
        if now < self._next_ping:
            return False
        if progress == self._last_progress and not idle_ok:
            return False
        self._last_progress = progress
        self._next_ping = now + self.watchdog_interval_s
        if self.send("WATCHDOG=1"):
            self.pings += 1
            return True
        return False

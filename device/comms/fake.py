"""An in-memory transport that ships with the kiosk: bench runs without a broker, and tests."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from device.comms.port import OnConnect, OnMessage

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Published:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class InMemoryTransport:
    """Records publishes and keeps retained messages like a broker; can be taken offline and back.

    ``set_online(False)`` models an abrupt loss: the last will (if any) becomes the retained message.
    Subscribers get retained messages on subscribe and on every reconnect, as with a real broker.
    """

    def __init__(self, *, online: bool = True) -> None:
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._want_online = online
        self._started = False
        self._will: tuple[str, bytes] | None = None
        self._on_connect: OnConnect | None = None
        self._subs: dict[str, list[OnMessage]] = {}
        self.published: list[Published] = []
        self.retained: dict[str, bytes] = {}

    # -- Transport --
    def connect(
        self, *, will: tuple[str, bytes] | None, timeout_s: float, on_connect: OnConnect | None = None
    ) -> None:
        """Remember the will; connect at once if online."""
        with self._lock:
            self._will, self._on_connect, self._started = will, on_connect, True
        if self._want_online:
            self._fire_connect()

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool, timeout_s: float) -> bool:
        """Record the message; False while offline."""
        with self._lock:
            if not self.connected:
                return False
            self.published.append(Published(topic, bytes(payload), qos, retain))
            if retain:
                self.retained[topic] = bytes(payload)
            handlers = list(self._subs.get(topic, ()))
            self._cond.notify_all()
        for h in handlers:
            h(topic, bytes(payload), False)
        return True

    def subscribe(self, topic: str, on_message: OnMessage) -> None:
        """Register an exact-topic handler; a retained message is delivered at once if connected."""
        with self._lock:
            self._subs.setdefault(topic, []).append(on_message)
            retained = self.retained.get(topic) if self.connected else None
        if retained is not None:
            on_message(topic, retained, True)

    @property
    def connected(self) -> bool:
        return self._started and self._want_online

    def close(self) -> None:
        """Disconnect cleanly (no will)."""
        with self._lock:
            self._started = False

    # -- test and bench controls --
    def set_online(self, online: bool) -> None:
        """Go offline abruptly (the will is retained) or come back (on_connect, retained re-delivered)."""
        with self._lock:
            was = self.connected
            self._want_online = online
            if was and not online and self._will is not None:
                self.retained[self._will[0]] = self._will[1]
            self._cond.notify_all()
        if online and not was and self._started:
            self._fire_connect()

    def inject(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Deliver a message from "the broker" to this transport's subscribers."""
        with self._lock:
            if retain:
                self.retained[topic] = payload
            handlers = list(self._subs.get(topic, ()))
        for h in handlers:
            h(topic, payload, False)

    def wait_for(self, pred: Callable[[], bool], timeout_s: float = 5.0) -> bool:
        """Block until ``pred()`` is true (re-checked after every publish and state change)."""
        with self._cond:
            return self._cond.wait_for(pred, timeout_s)

    def messages(self, topic: str) -> list[bytes]:
        """Payloads published on ``topic``, in order."""
        with self._lock:
            return [p.payload for p in self.published if p.topic == topic]

    def _fire_connect(self) -> None:
        with self._lock:
            cb = self._on_connect
            deliveries = [
                (t, self.retained[t], list(hs)) for t, hs in self._subs.items() if t in self.retained
            ]
        if cb is not None:
            cb()
        for topic, payload, handlers in deliveries:
            for h in handlers:
                h(topic, payload, True)

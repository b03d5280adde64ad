"""Helpers of the composition root for connection hooks: the transport wrapper that adds an on-connect hook,
and the queue of work deferred off network threads (what is re-sent after every reconnect)."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Final

from device.comms.port import OnConnect, OnMessage, Transport
from storelens.ha_discovery import HaDiscovery
from storelens.protocol import Topics

_LOGGER = logging.getLogger(__name__)

_DEFERRED_MAX: Final = 64  # pending tasks; past this the oldest goes (each is re-created on the next connect)
_RESEND_TIMEOUT_S: Final = 5.0  # PUBACK wait for what is re-sent after a reconnect


class Deferred:
    """Work that must not run on a transport thread (it waits for a PUBACK), run later by ``run_pending``
    on a thread that may block (the kiosk's health loop)."""

    def __init__(self) -> None:
        self._q: deque[Callable[[], object]] = deque(maxlen=_DEFERRED_MAX)
        self._lock = threading.Lock()

    def put(self, fn: Callable[[], object]) -> None:
        """Queue ``fn``; never blocks."""
        with self._lock:
            self._q.append(fn)

    def run_pending(self) -> int:
        """Run what is queued, in order; returns how many ran."""
        n = 0
        while True:
            with self._lock:
                if not self._q:
                    return n
                fn = self._q.popleft()
            try:
                fn()
            except Exception:
                _LOGGER.exception("deferred task failed")
            n += 1


class HookedTransport:
    """A Transport whose every (re)connect also calls ``on_connected`` (after the owner's own hook)."""

    def __init__(self, inner: Transport, on_connected: OnConnect) -> None:
        self.inner = inner
        self._on_connected = on_connected

    def connect(
        self, *, will: tuple[str, bytes] | None, timeout_s: float, on_connect: OnConnect | None = None
    ) -> None:
        def both() -> None:
            if on_connect is not None:
                on_connect()
            self._on_connected()

        self.inner.connect(will=will, timeout_s=timeout_s, on_connect=both)

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool, timeout_s: float) -> bool:
        return self.inner.publish(topic, payload, qos=qos, retain=retain, timeout_s=timeout_s)

    def subscribe(self, topic: str, on_message: OnMessage) -> None:
        self.inner.subscribe(topic, on_message)

    @property
    def connected(self) -> bool:
        return self.inner.connected

    def close(self) -> None:
        self.inner.close()


class ConnectTasks:
    """What the kiosk re-sends after every (re)connect: Home Assistant discovery (also when HA announces
    itself) and any ``extra`` task (the updater's last progress). The transport thread only queues them;
    ``run_pending`` sends them from a thread allowed to wait for PUBACKs (the health loop)."""

    def __init__(
        self,
        transport: Transport,
        topics: Topics,
        *,
        app_version: str,
        health_interval_s: float,
        extra: list[Callable[[], object]] | None = None,
    ) -> None:
        self._transport = transport
        self._topics = topics
        self._app_version = app_version
        self._health_interval_s = health_interval_s
        self.extra = list(extra or [])
        self.deferred = Deferred()
        self.ha = self._discovery(None)

    def _discovery(self, model: str | None) -> HaDiscovery:
        return HaDiscovery(self._publish, self._topics, app_version=self._app_version, model=model,
                           health_interval_s=self._health_interval_s)

    def set_model(self, model_id: str) -> None:
        """The serving model changed: a new discovery config (HA shows the model), sent at the next tick."""
        self.ha = self._discovery(model_id or None)
        if self._transport.connected:
            self.ha.publish()

    def on_connected(self) -> None:
        """Transport thread: queue the re-sends."""
        self.ha.publish()
        for fn in self.extra:
            self.deferred.put(fn)

    def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        """Transport thread: Home Assistant's birth message re-sends discovery (queued, never blocks)."""
        self.ha.on_message(topic, payload)

    def run_pending(self) -> int:
        return self.deferred.run_pending()

    def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        def send() -> None:
            if not self._transport.publish(topic, payload, qos=1, retain=retain, timeout_s=_RESEND_TIMEOUT_S):
                _LOGGER.debug("%s not acknowledged (re-sent on the next connect)", topic)

        self.deferred.put(send)

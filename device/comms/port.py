"""The transport port: what Comms needs from an MQTT client, nothing more."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

OnMessage = Callable[[str, bytes, bool], None]
"""Inbound message callback: (topic, payload, retained). Runs on the transport's thread: do not block."""

OnConnect = Callable[[], None]
"""Called on the transport's thread after every successful (re)connect. Do not block."""


class TransportError(Exception):
    """A transport is misconfigured (bad URL, unreadable certificate): not a connection loss."""


@runtime_checkable
class Transport(Protocol):
    """An MQTT connection that reconnects by itself (backoff with jitter) and re-subscribes after it."""

    def connect(
        self, *, will: tuple[str, bytes] | None, timeout_s: float, on_connect: OnConnect | None = None
    ) -> None:
        """Start background networking; wait up to ``timeout_s`` for the first connection (never raises
        for an unreachable broker, only TransportError for bad configuration). ``will`` is retained."""

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool, timeout_s: float) -> bool:
        """True once the PUBACK (QoS 1) arrived / the packet was written (QoS 0) within ``timeout_s``."""

    def subscribe(self, topic: str, on_message: OnMessage) -> None:
        """Subscribe (QoS 1) now if connected and again after every reconnect."""

    @property
    def connected(self) -> bool:
        """True while a session with the broker is up."""

    def close(self) -> None:
        """Disconnect cleanly (no last will) and stop background networking."""

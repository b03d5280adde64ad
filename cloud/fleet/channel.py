"""The rollout channel port, and its MQTT adapter (the store broker).

MQTT: kiosks are discovered from their retained status; a stage publishes one retained DesiredRelease per
kiosk on cmd/storelens/{store}/{kiosk}/desired (QoS 1, PUBACK awaited); progress is read from the retained
update, status and health topics of each kiosk.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from storelens.protocol import (
    DesiredRelease,
    Health,
    ProtocolError,
    Status,
    Topics,
    UpdateProgress,
    decode,
    parse_kiosk_topic,
    store_telemetry_filter,
)

_LOGGER = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
PUBACK_TIMEOUT_S = 10.0
SETTLE_S = 0.5  # retained messages arrive right after SUBACK; this long without one means we have them all


class ChannelError(Exception):
    """The channel cannot reach the fleet (broker down, AWS call refused)."""


@dataclass(frozen=True, slots=True)
class KioskView:
    """What the fleet knows about one kiosk."""

    store: str
    kiosk: str
    state: str | None = None  # status state: online, degraded, updating, offline...
    model: str | None = None
    snapshot: int | None = None
    release: str | None = None  # of the last update report
    step: str | None = None
    ok: bool | None = None
    detail: str = ""
    frames_dropped: int | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.store, self.kiosk)


class RolloutChannel(Protocol):
    """How a rollout reaches kiosks and hears back (MQTT store broker, or AWS IoT Jobs)."""

    def discover(self, stores: Sequence[str], *, timeout_s: float) -> list[KioskView]:
        """Kiosks known in these stores, with their latest state."""

    def stage(self, kiosks: Sequence[KioskView], desired: DesiredRelease, *, stage: int) -> None:
        """Ask these kiosks to run ``desired`` (kiosk and store fields are filled per kiosk)."""

    def poll(self, kiosks: Sequence[KioskView]) -> list[KioskView]:
        """The latest view of each kiosk, in order."""

    def halt(self, reason: str) -> None:
        """A stage failed: stop anything the channel would still deliver on its own."""

    def close(self) -> None:
        """Release connections."""


def broker_address(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in ("mqtt", "tcp"):
        raise ChannelError(f"unsupported broker URL {url!r} (mqtt://host:port)")
    return parts.hostname or "127.0.0.1", parts.port or 1883


class MqttChannel:
    """The store-broker channel (paho, one connection, retained desired messages)."""

    def __init__(self, broker: str, *, client_id: str | None = None) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self._host, self._port = broker_address(broker)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._views: dict[tuple[str, str], KioskView] = {}
        self._last_msg_s = time.monotonic()
        self._connected = threading.Event()
        self._subscribed: set[str] = set()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or f"storelens-fleet-{uuid.uuid4().hex[:8]}"
        )
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        try:
            self._client.connect(self._host, self._port, keepalive=30)
        except OSError as exc:
            raise ChannelError(f"cannot reach broker {self._host}:{self._port}: {exc}") from exc
        self._client.loop_start()
        if not self._connected.wait(CONNECT_TIMEOUT_S):
            self.close()
            raise ChannelError(f"broker {self._host}:{self._port} did not accept the connection")

    # -- port --
    def discover(self, stores: Sequence[str], *, timeout_s: float = 5.0) -> list[KioskView]:
        """Subscribe to each store's telemetry and wait until the retained messages have settled."""
        for s in stores:
            topic = store_telemetry_filter(s)
            if topic not in self._subscribed:
                self._subscribed.add(topic)
                self._client.subscribe(topic, qos=1)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._last_msg_s = time.monotonic()
            while (now := time.monotonic()) < deadline and (quiet_s := now - self._last_msg_s) < SETTLE_S:
                self._cond.wait(min(SETTLE_S - quiet_s, deadline - now))
            return sorted(
                (v for v in self._views.values() if v.store in stores and v.state is not None),
                key=lambda v: v.key,
            )

    def stage(self, kiosks: Sequence[KioskView], desired: DesiredRelease, *, stage: int) -> None:
        infos = []
        for k in kiosks:
            msg = desired.model_copy(update={"kiosk": k.kiosk, "store": k.store})
            infos.append(
                (
                    k,
                    self._client.publish(
                        Topics(k.store, k.kiosk).desired, msg.to_bytes(), qos=1, retain=True
                    ),
                )
            )
        for k, info in infos:
            info.wait_for_publish(timeout=PUBACK_TIMEOUT_S)
            if not info.is_published():
                raise ChannelError(f"no PUBACK for the desired release of {k.store}/{k.kiosk}")
        _LOGGER.info("stage %d: desired %s published to %d kiosk(s)", stage, desired.release, len(kiosks))

    def poll(self, kiosks: Sequence[KioskView]) -> list[KioskView]:
        with self._lock:
            return [self._views.get(k.key, k) for k in kiosks]

    def halt(self, reason: str) -> None:
        _LOGGER.warning("rollout halted: %s (kiosks not yet staged keep their desired release)", reason)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    # -- paho callbacks (network thread) --
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            for topic in self._subscribed:
                client.subscribe(topic, qos=1)
            self._connected.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            store, kiosk, rest = parse_kiosk_topic(msg.topic)
        except ProtocolError:
            return
        if not msg.payload:
            return
        try:
            with self._cond:
                self._last_msg_s = time.monotonic()
                self._cond.notify_all()
                v = self._views.get((store, kiosk)) or KioskView(store, kiosk)
                self._views[(store, kiosk)] = _merge(v, rest, bytes(msg.payload))
        except ProtocolError as exc:
            _LOGGER.debug("ignoring %s: %s", msg.topic, exc)


def _merge(v: KioskView, rest: str, payload: bytes) -> KioskView:
    if rest == "status":
        s = decode(payload, Status)
        return replace(v, state=s.state.value, model=s.model or v.model, snapshot=s.snapshot or v.snapshot)
    if rest == "update":
        u = decode(payload, UpdateProgress)
        return replace(
            v,
            release=u.release,
            step=u.step,
            ok=u.ok,
            detail=u.detail,
            model=u.model or v.model,
            snapshot=u.snapshot or v.snapshot,
        )
    if rest == "health":
        h = decode(payload, Health)
        return replace(
            v, frames_dropped=h.frames_dropped, model=h.model or v.model, snapshot=h.snapshot or v.snapshot
        )
    return v

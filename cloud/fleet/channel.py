"""The rollout channel port, and its MQTT adapter (the store broker).

MQTT: kiosks are discovered from their retained status; a stage publishes one retained DesiredRelease per
kiosk on cmd/storelens/{store}/{kiosk}/desired (QoS 1, PUBACK awaited); progress is read from the retained
update, status and health topics of each kiosk.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

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

if TYPE_CHECKING:
    from cloud.mqtt import BrokerSettings

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
    """(host, port) of an MQTT broker URL; ChannelError for one the cloud client cannot use."""
    from cloud.mqtt import BrokerError, BrokerSettings

    try:
        host, port, _, _, _ = BrokerSettings(url if "://" in url else f"mqtt://{url}").endpoint()
    except BrokerError as exc:
        raise ChannelError(str(exc)) from exc
    return host, port


class MqttChannel:
    """The store-broker channel (the cloud MQTT client, one connection, retained desired messages)."""

    def __init__(self, broker: str | BrokerSettings, *, client_id: str | None = None) -> None:
        from cloud.mqtt import BrokerError, BrokerSettings, CloudClient, check

        settings = broker if isinstance(broker, BrokerSettings) else BrokerSettings(
            broker if "://" in broker else f"mqtt://{broker}")  # fmt: skip
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._views: dict[tuple[str, str], KioskView] = {}
        self._last_msg_s = time.monotonic()
        self._subscribed: set[str] = set()
        try:
            check(settings)
            self._cc = CloudClient(settings, client_id=client_id or f"storelens-fleet-{uuid.uuid4().hex[:8]}",
                                   on_connected=self._on_connect)  # fmt: skip
            self._client = self._cc.client
            self._client.on_message = self._on_message
            self._cc.connect(CONNECT_TIMEOUT_S)
        except BrokerError as exc:
            raise ChannelError(str(exc)) from exc

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
        from cloud.mqtt import BrokerError

        for k in kiosks:
            msg = desired.model_copy(update={"kiosk": k.kiosk, "store": k.store})
            try:
                self._cc.publish(Topics(k.store, k.kiosk).desired, msg.to_bytes(), qos=1, retain=True,
                                 timeout_s=PUBACK_TIMEOUT_S)  # fmt: skip
            except BrokerError as exc:
                raise ChannelError(f"desired release of {k.store}/{k.kiosk} not delivered: {exc}") from exc
        _LOGGER.info("stage %d: desired %s published to %d kiosk(s)", stage, desired.release, len(kiosks))

    def poll(self, kiosks: Sequence[KioskView]) -> list[KioskView]:
        with self._lock:
            return [self._views.get(k.key, k) for k in kiosks]

    def halt(self, reason: str) -> None:
        _LOGGER.warning("rollout halted: %s (kiosks not yet staged keep their desired release)", reason)

    def close(self) -> None:
        self._cc.close()

    # -- paho callbacks (network thread) --
    def _on_connect(self, client: Any, session_present: bool) -> None:
        for topic in self._subscribed:
            client.subscribe(topic, qos=1)

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

"""Home Assistant MQTT device discovery for one kiosk, built from the topics in storelens.protocol.

One retained ``homeassistant/device/{kiosk}/config`` message (device-based discovery, HA >= 2024.11)
declares the kiosk as a device with a few sensors read straight from its JSON telemetry, and makes
the kiosk's retained status (with its last will) the availability of every sensor. Home Assistant
publishes ``online`` on ``homeassistant/status`` when it starts; the kiosk then re-sends the config,
because HA may have started with an empty broker (no persistence) or after the config was cleared.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from storelens import __version__
from storelens.protocol import APP, HA_STATUS_TOPIC, KioskState, Topics

_LOGGER = logging.getLogger(__name__)

# A health message older than this many intervals means the kiosk stopped reporting: HA then shows
# the health sensors as unavailable (the dashboard uses the same factor for "stale"). Lower flags a
# single late message; higher leaves dead numbers on screen longer.
STALE_FACTOR = 2.5

PublishFn = Callable[[str, bytes, bool], None]
"""``publish_fn(topic, payload, retain)``: QoS 1, must not block the MQTT network thread."""

_AVAILABILITY_TEMPLATE = (
    "{{ 'offline' if value_json.state == '" + KioskState.OFFLINE.value + "' else 'online' }}"
)
_LAST_MATCH_TEMPLATE = (
    "{{ value_json.results[0].title if value_json.matched and value_json.results else 'no match' }}"
)


def _latency_template(stage: str, quantile: str) -> str:
    # "None" is what HA's MQTT sensor reads as unknown; a kiosk without that stage reports no number.
    return (
        f"{{{{ value_json.latency_ms['{stage}'].{quantile} "
        f"if '{stage}' in value_json.latency_ms else None }}}}"
    )


def device_id(topics: Topics) -> str:
    """The HA device identifier of a kiosk: unique across stores."""
    return f"{APP}_{topics.store}_{topics.kiosk}"


def discovery_config(
    topics: Topics,
    *,
    app_version: str = "",
    model: str | None = None,
    health_interval_s: float = 30.0,
    latency_stage: str = "total",
) -> dict[str, Any]:
    """The device-discovery payload (dict) for one kiosk."""
    dev = device_id(topics)
    expire_after_s = max(1, math.ceil(STALE_FACTOR * health_interval_s))

    def sensor(key: str, name: str, state_topic: str, template: str, **extra: Any) -> tuple[str, Any]:
        cmp: dict[str, Any] = {
            "p": "sensor",
            "name": name,
            "unique_id": f"{dev}_{key}",
            "state_topic": state_topic,
            "value_template": template,
        }
        cmp.update(extra)
        return key, cmp

    health = {"expire_after": expire_after_s}
    components = dict(
        [
            sensor("status", "Status", topics.status, "{{ value_json.state }}", icon="mdi:tablet-dashboard"),
            sensor(
                "fps", "Camera FPS", topics.health, "{{ value_json.fps }}",
                unit_of_measurement="fps", state_class="measurement", suggested_display_precision=1,
                **health,
            ),
            sensor(
                "latency_p50", f"Latency p50 ({latency_stage})", topics.health,
                _latency_template(latency_stage, "p50"),
                unit_of_measurement="ms", device_class="duration", state_class="measurement",
                suggested_display_precision=1, **health,
            ),
            sensor(
                "outbox_depth", "Outbox depth", topics.health, "{{ value_json.outbox_depth }}",
                state_class="measurement", icon="mdi:tray-full", **health,
            ),
            sensor("camera", "Camera", topics.health, "{{ value_json.camera }}", icon="mdi:cctv", **health),
            sensor(
                "snapshot", "Catalog snapshot", topics.status, "{{ value_json.snapshot }}",
                icon="mdi:database-check",
            ),
            sensor("last_match", "Last match", topics.match, _LAST_MATCH_TEMPLATE, icon="mdi:magnify"),
        ]
    )
    device: dict[str, Any] = {
        "ids": [dev],
        "name": f"StoreLens kiosk {topics.kiosk}",
        "mf": "StoreLens",
        "mdl": "Visual search kiosk",
        "sw": app_version or None,
        "suggested_area": topics.store,
    }
    if model:
        device["hw"] = model  # the embedding model, the closest thing a kiosk has to a hardware revision
    return {
        "dev": {k: v for k, v in device.items() if v is not None},
        "o": {"name": APP, "sw": __version__},
        "cmps": components,
        "availability": [{"topic": topics.status, "value_template": _AVAILABILITY_TEMPLATE}],
        "qos": 1,
    }


def discovery_payload(topics: Topics, **kwargs: Any) -> bytes:
    """The retained discovery message body: compact UTF-8 JSON of :func:`discovery_config`."""
    return json.dumps(discovery_config(topics, **kwargs), separators=(",", ":")).encode()


def should_resend(topic: str, payload: bytes) -> bool:
    """True when Home Assistant announced it (re)started: ``online`` on ``homeassistant/status``."""
    return topic == HA_STATUS_TOPIC and payload.strip().lower() == b"online"


# A retained config survives HA restarts; the re-send only covers a broker that lost it. One per this many
# seconds is plenty, and anyone who may publish 'online' (HA's user) cannot make a kiosk flood the broker.
RESEND_MIN_INTERVAL_S = 30.0


class HaDiscovery:
    """Publishes one kiosk's discovery config and re-sends it when Home Assistant comes online."""

    subscriptions: tuple[str, ...] = (HA_STATUS_TOPIC,)

    def __init__(
        self,
        publish_fn: PublishFn,
        topics: Topics,
        *,
        app_version: str = "",
        model: str | None = None,
        health_interval_s: float = 30.0,
        latency_stage: str = "total",
        resend_min_interval_s: float = RESEND_MIN_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._publish_fn = publish_fn
        self._resend_min_interval_s = resend_min_interval_s
        self._clock = clock
        self._last_resend: float | None = None
        self._topics = topics
        self._payload = discovery_payload(
            topics, app_version=app_version, model=model, health_interval_s=health_interval_s,
            latency_stage=latency_stage,
        )
        self.sent = 0

    @property
    def topic(self) -> str:
        """Where the config goes: ``homeassistant/device/{kiosk}/config``."""
        return self._topics.ha_discovery

    def publish(self) -> None:
        """Send the retained config (call after every (re)connect)."""
        self._publish_fn(self._topics.ha_discovery, self._payload, True)
        self.sent += 1
        _LOGGER.debug("published HA discovery for %s", self._topics.kiosk)

    def remove(self) -> None:
        """Clear the retained config so HA forgets the device (kiosk decommissioned)."""
        self._publish_fn(self._topics.ha_discovery, b"", True)

    def on_message(self, topic: str, payload: bytes) -> bool:
        """Feed every received message; re-sends and returns True on HA's birth message."""
        if not should_resend(topic, payload):
            return False
        now = self._clock()
        if self._last_resend is not None and now - self._last_resend < self._resend_min_interval_s:
            _LOGGER.debug("Home Assistant 'online' again within %.0f s; discovery not re-sent",
                          self._resend_min_interval_s)
            return False
        self._last_resend = now
        _LOGGER.info("Home Assistant came online; re-sending discovery for %s", self._topics.kiosk)
        self.publish()
        return True

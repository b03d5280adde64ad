"""Home Assistant device discovery: payload shape, templates against real payloads, and a real broker."""

from __future__ import annotations

import json
from typing import Any

import pytest

from storelens.ha_discovery import HaDiscovery, discovery_config, should_resend
from storelens.protocol import (
    HA_STATUS_TOPIC,
    Health,
    KioskState,
    MatchEvent,
    MatchItem,
    Status,
    Topics,
)
from tests.deploy.mqtt_peer import Peer
from tests.support.mosquitto import Mosquitto

T = Topics("s042", "k01")


def _render(template: str, payload: bytes) -> str:
    """Render an HA value_template the way HA does: ``value_json`` is the parsed payload."""
    sandbox = pytest.importorskip("jinja2.sandbox", reason="jinja2 (HA's template engine) not installed")
    env = sandbox.ImmutableSandboxedEnvironment()
    return str(env.from_string(template).render(value_json=json.loads(payload), value=payload.decode()))


def _health(**kw: Any) -> bytes:
    base: dict[str, Any] = dict(
        kiosk="k01", store="s042", uptime_s=5, camera="ok", frames_in=10, frames_processed=9,
        frames_dropped=1, fps=14.5, latency_ms={"total": {"p50": 21.5, "p99": 40.0}}, outbox_depth=3,
    )
    base.update(kw)
    return Health(**base).to_bytes()


def test_config_is_one_device_whose_sensors_read_protocol_topics() -> None:
    """A renamed protocol topic or field must not silently leave HA sensors reading nothing."""
    cfg = discovery_config(T, app_version="1.2.3", model="m@1", health_interval_s=10)
    assert cfg["dev"]["ids"] == ["storelens_s042_k01"] and cfg["dev"]["sw"] == "1.2.3"
    assert cfg["o"]["name"] == "storelens"
    assert cfg["availability"][0]["topic"] == T.status
    cmps = cfg["cmps"]
    assert set(cmps) >= {"status", "fps", "latency_p50", "outbox_depth", "snapshot", "last_match"}
    assert {c["state_topic"] for c in cmps.values()} <= {T.status, T.health, T.match}
    assert len({c["unique_id"] for c in cmps.values()}) == len(cmps)
    assert all(c["p"] == "sensor" for c in cmps.values())
    assert cmps["fps"]["expire_after"] == 25  # 2.5 x health interval: dead numbers go unavailable


def test_templates_render_real_protocol_payloads() -> None:
    """Templates are evaluated against payloads built by storelens.protocol, not hand-written JSON."""
    cmps = discovery_config(T)["cmps"]
    online = Status(kiosk="k01", store="s042", state=KioskState.DEGRADED, snapshot=7).to_bytes()
    will = Status(kiosk="k01", store="s042", state=KioskState.OFFLINE, reason="lwt").to_bytes()
    avail = discovery_config(T)["availability"][0]["value_template"]
    assert _render(avail, online) == "online" and _render(avail, will) == "offline"
    assert _render(cmps["status"]["value_template"], online) == "degraded"
    assert _render(cmps["snapshot"]["value_template"], online) == "7"
    assert _render(cmps["fps"]["value_template"], _health()) == "14.5"
    assert _render(cmps["latency_p50"]["value_template"], _health()) == "21.5"
    assert _render(cmps["latency_p50"]["value_template"], _health(latency_ms={})) == "None"
    assert _render(cmps["outbox_depth"]["value_template"], _health()) == "3"
    hit = MatchEvent(kiosk="k01", store="s042", matched=True, threshold=0.5, frames=3, model="m", snapshot=7,
                     results=[MatchItem(rank=1, sku="A1", title="Oat milk 1 l", score=0.9)]).to_bytes()
    miss = MatchEvent(kiosk="k01", store="s042", matched=False, threshold=0.5, frames=3, model="m",
                      snapshot=7, results=[]).to_bytes()
    assert _render(cmps["last_match"]["value_template"], hit) == "Oat milk 1 l"
    assert _render(cmps["last_match"]["value_template"], miss) == "no match"


@pytest.mark.parametrize(
    ("topic", "payload", "want"),
    [(HA_STATUS_TOPIC, b"online", True), (HA_STATUS_TOPIC, b"online\n", True),
     (HA_STATUS_TOPIC, b"offline", False), (T.status, b"online", False)],
)
def test_should_resend(topic: str, payload: bytes, want: bool) -> None:
    """Only HA's birth message triggers a re-send (not its will, not a kiosk's own status)."""
    assert should_resend(topic, payload) is want


@pytest.mark.integration
def test_retained_config_and_resend_on_ha_birth(broker: Mosquitto) -> None:
    """HA restarting with an empty broker must get every kiosk's config again, without a kiosk restart."""
    t = Topics("s042", "ha-disc-test")  # the broker is shared by the session: a topic of our own
    kiosk = Peer("127.0.0.1", broker.port, "ha-kiosk").connect()
    ha = Peer("127.0.0.1", broker.port, "ha-core").connect()
    try:
        disc = HaDiscovery(kiosk.publish_nowait, t, app_version="1.0", health_interval_s=10)
        kiosk.on_message_fn = disc.on_message
        assert kiosk.subscribe(disc.subscriptions[0]).value < 128
        assert kiosk.subscribe(disc.topic).value < 128
        disc.publish()
        assert kiosk.wait_for(disc.topic) is not None  # the broker has it (and retained it)
        # A late subscriber (HA starting) gets the config as a retained message.
        assert ha.subscribe(disc.topic).value < 128
        first = ha.wait_for(disc.topic)
        assert first is not None and first.retain
        assert json.loads(first.payload) == discovery_config(t, app_version="1.0", health_interval_s=10)
        # HA's birth message: the kiosk re-sends.
        ha.publish(HA_STATUS_TOPIC, b"online")
        assert ha.wait_count(disc.topic, 2), "discovery was not re-sent on homeassistant/status online"
        assert disc.sent == 2
        ha.publish(HA_STATUS_TOPIC, b"offline")
        disc.remove()
        assert ha.wait_count(disc.topic, 3)
        assert ha.messages[-1].payload == b""
    finally:
        kiosk.close()
        ha.close()


def test_ha_online_flood_resends_at_most_once_per_interval() -> None:
    """201 'online' messages re-sent all discovery 201 times: one is re-sent per interval, then again."""
    sent: list[str] = []
    now = [1000.0]
    disc = HaDiscovery(lambda topic, _p, _r: sent.append(topic), Topics("s042", "k01"),
                       resend_min_interval_s=30.0, clock=lambda: now[0])
    assert [disc.on_message(HA_STATUS_TOPIC, b"online") for _ in range(201)].count(True) == 1
    assert len(sent) == 1
    now[0] += 29.9
    assert not disc.on_message(HA_STATUS_TOPIC, b"online")
    now[0] += 0.2
    assert disc.on_message(HA_STATUS_TOPIC, b"online")
    assert len(sent) == 2

"""Comms over the shipped in-memory transport: ordering, status on reconnect, health, shutdown."""

from __future__ import annotations

import json
import time
from pathlib import Path

from device.comms import Comms, InMemoryTransport, LatencyStats, Outbox
from device.comms.port import Transport
from storelens.protocol import Health, KioskState, Status, Topics, decode

TOPICS = Topics("store1", "kiosk1")


def _status(state: KioskState = KioskState.ONLINE) -> Status:
    return Status(kiosk="kiosk1", store="store1", state=state, app="1.0")


def _state(t: InMemoryTransport) -> KioskState | None:
    raw = t.retained.get(TOPICS.status)
    return decode(raw, Status).state if raw is not None else None


def test_fake_satisfies_the_port() -> None:
    """Guards: the shipped fake drifting from the Transport protocol."""
    assert isinstance(InMemoryTransport(), Transport)


def test_events_flow_in_order_and_offline_buffers(tmp_path: Path) -> None:
    """Guards: events lost or reordered across an offline period; status not re-sent on reconnect."""
    t = InMemoryTransport()
    box = Outbox(tmp_path / "o.db")
    comms = Comms(t, box, TOPICS, app_version="1.0", replay_rate_per_s=1000)
    comms.start(_status())
    for i in range(10):
        comms.publish_event(TOPICS.match, b'{"seq":%d}' % i)
    assert t.wait_for(lambda: len(t.messages(TOPICS.match)) == 10)
    t.set_online(False)
    assert decode(t.retained[TOPICS.status], Status).reason == "lwt"
    for i in range(10, 30):
        comms.publish_event(TOPICS.match, b'{"seq":%d}' % i)
    assert comms.outbox_depth == 20
    t.set_online(True)
    assert t.wait_for(lambda: len(t.messages(TOPICS.match)) == 30)
    seqs = [json.loads(p)["seq"] for p in t.messages(TOPICS.match)]
    assert seqs == list(range(30))
    assert t.wait_for(lambda: _state(t) == KioskState.ONLINE)
    comms.stop()
    assert comms.outbox_depth == 0
    assert _state(t) == KioskState.OFFLINE
    box.close()


def test_replay_rate_is_bounded(tmp_path: Path) -> None:
    """Guards: a flood of replayed events after an outage (IoT Core caps 100 publishes/s)."""
    t = InMemoryTransport(online=False)
    box = Outbox(tmp_path / "o.db")
    for i in range(40):
        box.put(TOPICS.match, b"%d" % i)
    comms = Comms(t, box, TOPICS, app_version="1.0", replay_rate_per_s=100)
    comms.start(_status())
    t0 = time.monotonic()
    t.set_online(True)
    assert t.wait_for(lambda: len(t.messages(TOPICS.match)) == 40)
    elapsed = time.monotonic() - t0
    assert elapsed >= 0.35, f"40 rows at 100/s took {elapsed:.3f} s"
    comms.stop()
    assert comms.outbox_depth == 0
    box.close()


def test_set_status_and_health(tmp_path: Path) -> None:
    """Guards: status changes not retained; health missing the outbox figures."""
    t = InMemoryTransport()
    box = Outbox(tmp_path / "o.db", max_rows=2)
    comms = Comms(t, box, TOPICS, app_version="1.0")
    comms.start(_status())
    comms.set_status(_status(KioskState.UPDATING))
    assert t.wait_for(lambda: _state(t) == KioskState.UPDATING)
    t.set_online(False)
    for i in range(5):
        comms.publish_event(TOPICS.match, b"%d" % i)
    t.set_online(True)
    stats = LatencyStats()
    for v in range(100):
        stats.add("infer", float(v))
    health = Health(
        kiosk="kiosk1",
        store="store1",
        uptime_s=1,
        camera="ok",
        frames_in=1,
        frames_processed=1,
        frames_dropped=0,
        fps=1.0,
        latency_ms=stats.percentiles(),
    )
    comms.publish_health(health)
    h = decode(t.retained[TOPICS.health], Health)
    assert h.outbox_dropped == 3
    assert h.latency_ms["infer"]["p50"] == 49.5
    assert t.wait_for(lambda: any(b"outbox_dropping" in p for p in t.messages(TOPICS.alert)))
    comms.stop()
    box.close()

"""A full outbox disk (real ENOSPC on a tmpfs): events wait in memory, nothing is lost, nothing raises."""

from __future__ import annotations

import json

import pytest

from device.comms import Comms, InMemoryTransport, Outbox
from device.comms.paho_transport import PahoTransport
from storelens.protocol import Alert, Health, KioskState, MatchEvent, Status, Topics, decode
from tests.device.comms.helpers import Collector
from tests.support.mosquitto import Mosquitto
from tests.support.tinydisk import TinyDisk, tiny_disk

__all__ = ["tiny_disk"]  # the fixture, imported for pytest

TOPICS = Topics("store1", "kiosk1")
STATUS = Status(kiosk="kiosk1", store="store1", state=KioskState.ONLINE, app="1.0")


def _event(seq: int) -> bytes:
    pad = "x" * 400  # a realistic event size, so the disk fills in a few rows
    return MatchEvent(kiosk="kiosk1", store="store1", matched=True, results=[], threshold=0.5, frames=3,
                      model=pad, snapshot=1, seq=seq).to_bytes()


def _health() -> Health:
    return Health(kiosk="kiosk1", store="store1", uptime_s=1, camera="ok", frames_in=1,
                  frames_processed=1, frames_dropped=0, fps=1.0)


def _publish_until_held(comms: Comms, start: int) -> int:
    """Publish events until one is held in memory (the WAL may take a few first); return the next seq."""
    seq = start
    while comms.outbox_memory == 0:
        comms.publish_event(TOPICS.match, _event(seq))
        assert comms.flush()
        seq += 1
        assert seq - start < 5000, "the outbox never reported the disk full"
    return seq


@pytest.mark.integration
def test_full_disk_holds_events_and_writes_them_when_space_returns(
    broker: Mosquitto, tiny_disk: TinyDisk
) -> None:
    """Guards: a full outbox disk raising into the pipeline and losing the events (21 in one run)."""
    watch = Collector(broker.port, [TOPICS.match, TOPICS.alert, TOPICS.health])
    box = Outbox(tiny_disk.path / "outbox.db")
    comms = Comms(PahoTransport(broker.url, "kiosk1"), box, TOPICS, app_version="1.0")
    comms.start(STATUS)
    try:
        assert comms.connected
        tiny_disk.fill()
        n = _publish_until_held(comms, 0)
        for seq in range(n, n + 30):  # keeps answering: no exception while the disk stays full
            comms.publish_event(TOPICS.match, _event(seq))
        n += 30
        assert comms.flush()
        assert comms.outbox_memory > 0
        comms.publish_health(_health())
        assert watch.wait_for(lambda m: any(t == TOPICS.health for t, _, _ in m))
        health = decode(watch.payloads(TOPICS.health)[-1], Health)
        assert health.outbox_memory > 0 and health.outbox_dropped == 0
        assert watch.wait_for(lambda m: any(t == TOPICS.alert and b"outbox_full" in p for t, p, _ in m))
        alert = decode(watch.payloads(TOPICS.alert)[0], Alert)
        assert alert.kind == "outbox_full" and "full" in alert.detail

        tiny_disk.drain()

        def all_seen(m: list[tuple[str, bytes, bool]]) -> bool:
            return {json.loads(p)["seq"] for t, p, _ in m if t == TOPICS.match} >= set(range(n))

        assert watch.wait_for(all_seen, timeout_s=20), "events lost after space returned"
        assert comms.outbox_memory == 0 and comms.outbox_dropped == 0
    finally:
        comms.stop()
        box.close()
        watch.close()


def test_past_the_memory_cap_the_oldest_are_dropped_counted_and_alerted(tiny_disk: TinyDisk) -> None:
    """Guards: a long disk-full episode growing memory without bound, or dropping events silently."""
    transport = InMemoryTransport()
    box = Outbox(tiny_disk.path / "outbox.db")
    comms = Comms(transport, box, TOPICS, app_version="1.0", memory_cap=5)
    comms.start(STATUS)
    try:
        tiny_disk.fill()
        first_held = _publish_until_held(comms, 0) - 1
        for seq in range(first_held + 1, first_held + 12):
            comms.publish_event(TOPICS.match, _event(seq))
        assert comms.flush()
        assert comms.outbox_memory == 5
        assert comms.outbox_dropped == 7, "every event past the cap is counted"
        alerts = lambda: transport.messages(TOPICS.alert)  # noqa: E731
        assert transport.wait_for(lambda: any(b"outbox_dropping" in p for p in alerts()))
        comms.publish_health(_health())
        assert decode(transport.retained[TOPICS.health], Health).outbox_dropped == 7
        tiny_disk.drain()
        newest = set(range(first_held + 7, first_held + 12))
        assert transport.wait_for(
            lambda: {json.loads(p)["seq"] for p in transport.messages(TOPICS.match)} >= newest, timeout_s=10
        )
    finally:
        comms.stop()
        box.close()

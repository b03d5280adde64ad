"""Soak: a kiosk's comms publishing while the broker cycles down/up and the outbox disk fills and drains.

An independent subscriber (persistent session) counts events by id: 0 lost after de-duplication.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from device.comms import Comms, Outbox
from device.comms.paho_transport import PahoTransport
from storelens.protocol import KioskState, MatchEvent, Status, Topics
from tests.adversarial.conftest import Tally
from tests.conftest import _need_mosquitto
from tests.device.comms.helpers import Collector
from tests.device.comms.test_comms_broker import PersistentMosquitto
from tests.support.tinydisk import TinyDisk, tiny_disk

__all__ = ["tiny_disk"]  # the fixture, imported for pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TOPICS = Topics("store1", "kiosk1")
RATE_PER_S = 40.0  # events produced per second (a busy kiosk makes ~1)
PHASE_S = 2.0  # each phase of the schedule lasts this long (12 phases: 24 s)
# (broker up, disk has room) per phase: both faults alone, together, and overlapping in both orders.
SCHEDULE = [(True, True), (False, True), (True, True), (True, False), (True, True), (False, False),
            (True, False), (False, False), (False, True), (True, True), (True, False), (True, True)]


class _SoakMosquitto(PersistentMosquitto):
    def _config(self) -> str:  # queue without limit for the subscriber while it reconnects
        return super()._config() + "max_queued_messages 0\n"


def test_soak_broker_cycling_and_disk_filling_loses_no_event(
    tmp_path: Path, tiny_disk: TinyDisk, tally: Tally
) -> None:
    """Guards: events lost when broker outages and a full outbox disk come and go, alone or together."""
    _need_mosquitto()
    broker = _SoakMosquitto(tmp_path / "mosq").start()
    box = Outbox(tiny_disk.path / "outbox.db")
    transport = PahoTransport(broker.url, "kiosk1", reconnect_min_s=0.1, reconnect_max_s=0.5)
    comms = Comms(transport, box, TOPICS, app_version="1.0", replay_rate_per_s=500)
    sub = Collector(broker.port, [TOPICS.match], client_id="soak-counter", clean=False)
    stop = threading.Event()
    produced: list[str] = []

    def emit() -> None:
        ev = MatchEvent(kiosk="kiosk1", store="store1", matched=True, results=[], threshold=0.5,
                        frames=3, model="m" * 64, snapshot=1, seq=len(produced))
        comms.publish_event(TOPICS.match, ev.to_bytes())  # must never raise
        produced.append(ev.id)

    def produce() -> None:
        while not stop.wait(1.0 / RATE_PER_S):
            emit()

    def until_full(max_events: int = 20_000) -> None:
        """SQLite reuses free pages and WAL space, so a full disk bites only once they are used up: a
        burst of real (counted) events gets it there, so every no-room phase tests what it names."""
        for _ in range(max_events):
            if comms.flush() and comms.outbox_memory > 0:
                return
            emit()

    producer = threading.Thread(target=produce, name="soak-producer")
    held_max = 0
    try:
        comms.start(Status(kiosk="kiosk1", store="store1", state=KioskState.ONLINE, app="1.0"))
        producer.start()
        up, room = True, True
        for want_up, want_room in SCHEDULE:
            if want_up != up:
                broker.start() if want_up else broker.stop()
                up = want_up
            if want_room != room:
                tiny_disk.drain() if want_room else tiny_disk.fill()
                room = want_room
            if not room:
                until_full()
            phase_end = threading.Event()
            for _ in range(int(PHASE_S / 0.25)):
                phase_end.wait(0.25)
                held_max = max(held_max, comms.outbox_memory)
        stop.set()
        producer.join(10)
        ids = set(produced)

        def counted(m: list[tuple[str, bytes, bool]]) -> bool:
            return {json.loads(p)["id"] for t, p, _ in m if t == TOPICS.match} >= ids

        assert sub.wait_for(counted, timeout_s=60)
    finally:
        stop.set()
        if producer.is_alive():
            producer.join(10)
        comms.stop()
        box.close()
        sub.close()
        broker.stop()
    received = [json.loads(p)["id"] for p in sub.payloads(TOPICS.match)]
    lost = len(ids - set(received))
    dups = len(received) - len(set(received))
    print(f"\nsoak: produced {len(produced)}, delivered {len(received)} ({dups} duplicates), lost {lost}, "
          f"dropped {comms.outbox_dropped}, held in memory at most {held_max}")
    tally.record("soak:outbox", "lost" if lost else "survived")
    assert lost == 0 and comms.outbox_dropped == 0
    assert held_max > 0, "the disk never filled: the soak did not test what it names"

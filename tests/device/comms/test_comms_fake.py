"""Comms over the shipped in-memory transport: ordering, status on reconnect, health, shutdown."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
    assert comms.flush()
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
    assert comms.flush()  # all five in the outbox (3 dropped by max_rows) before the drain can send any
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


class _SlowDisk(Outbox):
    """An outbox whose commits wait for ``go`` (a disk stalled in fsync); records each commit's size."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.go = threading.Event()
        self.entered = threading.Event()
        self.commits: list[int] = []

    def put_many(self, rows: list[tuple[str, bytes, int]]) -> list[int]:
        self.entered.set()
        assert self.go.wait(10), "the test never released the disk"
        self.commits.append(len(rows))
        return super().put_many(rows)


@contextmanager
def _stalled(tmp_path: Path, first: bytes, **kw: Any) -> Iterator[tuple[InMemoryTransport, _SlowDisk, Comms]]:
    """An offline Comms whose writer is stalled inside the commit of ``first``; released and stopped at
    the end."""
    t = InMemoryTransport(online=False)
    box = _SlowDisk(tmp_path / "o.db")
    comms = Comms(t, box, TOPICS, app_version="1.0", **kw)
    comms.start(_status())
    try:
        comms.publish_event(TOPICS.match, first)
        assert box.entered.wait(5)  # the writer is inside the first commit, stalled
        yield t, box, comms
    finally:
        box.go.set()
        comms.stop()
        box.close()


def test_a_stalled_disk_never_blocks_publish_event_and_the_writer_group_commits(tmp_path: Path) -> None:
    """Guards: the frame path waiting on the outbox's fsync (one per event, on the caller's thread), and
    events handed in during a commit lost or reordered instead of committed together in the next one."""
    with _stalled(tmp_path, b'{"seq":0}', replay_rate_per_s=1000) as (t, box, comms):
        done = threading.Event()

        def more() -> None:
            for i in range(1, 6):
                comms.publish_event(TOPICS.match, b'{"seq":%d}' % i)
            done.set()

        threading.Thread(target=more, name="frame-path").start()
        assert done.wait(5), "publish_event waited for the disk"
        assert not comms.flush(timeout_s=0.2) and box.depth == 0  # nothing durable while the disk stalls
        box.go.set()
        assert comms.flush()
        assert box.commits == [1, 5] and box.depth == 6
        t.set_online(True)
        assert t.wait_for(lambda: len(t.messages(TOPICS.match)) == 6)
        assert [json.loads(p)["seq"] for p in t.messages(TOPICS.match)] == list(range(6))


def test_events_handed_in_up_to_stop_are_committed_and_later_ones_inline(tmp_path: Path) -> None:
    """Guards: events handed to the writer lost at stop, or events after stop going nowhere."""
    t = InMemoryTransport(online=False)
    box = Outbox(tmp_path / "o.db")
    comms = Comms(t, box, TOPICS, app_version="1.0")
    comms.start(_status())
    for i in range(20):
        comms.publish_event(TOPICS.match, b"%d" % i)
    comms.stop()
    assert box.depth == 20
    comms.publish_event(TOPICS.match, b"20")  # not started: committed before it returns
    assert box.depth == 21 and comms.flush(timeout_s=0)
    box.close()


def test_a_disk_hung_in_a_commit_bounds_the_waiting_events_and_counts_the_dropped(tmp_path: Path) -> None:
    """Guards: events piling up without bound behind a commit that never returns (the frame path no
    longer waits for the disk, so nothing else holds them back)."""
    with _stalled(tmp_path, b"0", memory_cap=4) as (_, box, comms):
        for i in range(1, 11):
            comms.publish_event(TOPICS.match, b"%d" % i)
        assert comms.outbox_dropped == 6  # 10 handed in while stuck, 4 kept: the newest
        box.go.set()
        assert comms.flush()
        assert [r.payload for r in box.peek(20)] == [b"0", b"7", b"8", b"9", b"10"]
        assert comms.outbox_dropped == 6

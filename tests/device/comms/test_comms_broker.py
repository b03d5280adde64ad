"""Comms + PahoTransport against a real mosquitto: last will, broker outage, kiosk restart."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from device.comms import Comms, Outbox
from device.comms.paho_transport import PahoTransport
from storelens.protocol import KioskState, MatchEvent, Status, Topics, decode
from tests.device.comms.helpers import Collector
from tests.support.mosquitto import Mosquitto, free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]
TOPICS = Topics("store1", "kiosk1")

_KIOSK_STUB = """
import sys
from pathlib import Path
from device.comms import Comms, Outbox
from device.comms.paho_transport import PahoTransport
from storelens.protocol import KioskState, Status, Topics
topics = Topics("store1", "kiosk1")
comms = Comms(PahoTransport(sys.argv[1], "kiosk1"), Outbox(Path(sys.argv[2])), topics, app_version="1.0")
comms.start(Status(kiosk="kiosk1", store="store1", state=KioskState.ONLINE))
print("up" if comms.connected else "down", flush=True)
sys.stdin.read()
"""


class PersistentMosquitto(Mosquitto):
    """Saves sessions on every change, so a subscriber's session survives a SIGKILL of the broker."""

    def _config(self) -> str:
        persist = f"persistence true\npersistence_location {self.workdir}/\n"
        return (
            super()
            ._config()
            .replace("persistence false", persist + "autosave_interval 1\nautosave_on_changes true")
        )


def _event(seq: int) -> bytes:
    return MatchEvent(
        kiosk="kiosk1",
        store="store1",
        matched=True,
        results=[],
        threshold=0.5,
        frames=3,
        model="m",
        snapshot=1,
        seq=seq,
    ).to_bytes()


def _status(state: KioskState = KioskState.ONLINE) -> Status:
    return Status(kiosk="kiosk1", store="store1", state=state, app="1.0")


def _states(c: Collector) -> list[tuple[str, str | None]]:
    out = []
    for p in c.payloads(TOPICS.status):
        s = decode(p, Status)
        out.append((s.state.value, s.reason))
    return out


def test_retained_status_and_lwt_when_the_kiosk_process_dies(broker: Mosquitto, tmp_path: Path) -> None:
    """Guards: dashboards showing a SIGKILLed kiosk as online (no retained last will)."""
    watch = Collector(broker.port, [TOPICS.status])
    proc = subprocess.Popen(
        [sys.executable, "-c", _KIOSK_STUB, broker.url, str(tmp_path / "o.db")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        assert watch.wait_for(lambda m: ("online", None) in _states(watch)), "online status"
        late = Collector(broker.port, [TOPICS.status])
        assert late.wait_for(lambda m: bool(m))
        assert _states(late) == [("online", None)] and late.messages[0][2] is True, "status is retained"
        late.close()
        proc.kill()
        proc.wait(timeout=10)
        assert watch.wait_for(lambda m: ("offline", "lwt") in _states(watch)), "last will seen"
        newcomer = Collector(broker.port, [TOPICS.status])
        assert newcomer.wait_for(lambda m: bool(m))
        assert _states(newcomer) == [("offline", "lwt")] and newcomer.messages[0][2] is True
        newcomer.close()
    finally:
        watch.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()


def test_graceful_stop_publishes_offline(broker: Mosquitto, tmp_path: Path) -> None:
    """Guards: a clean shutdown leaving 'online' retained (the will is not sent on DISCONNECT)."""
    topics = Topics("store1", "kiosk-stop")
    comms = Comms(PahoTransport(broker.url, "kiosk-stop"), Outbox(tmp_path / "o.db"), topics, app_version="1")
    c = Collector(broker.port, [topics.status])
    comms.start(Status(kiosk="kiosk-stop", store="store1", state=KioskState.ONLINE))
    assert c.wait_for(lambda m: len(m) >= 1)
    comms.stop()
    assert c.wait_for(lambda m: any(b'"shutdown"' in p for _, p, _ in m))
    c.close()


def test_broker_killed_mid_stream_loses_nothing(tmp_path: Path) -> None:
    """Guards: events lost or reordered when the broker is SIGKILLed and comes back."""
    b = PersistentMosquitto(tmp_path / "mosq").start()
    box = Outbox(tmp_path / "o.db")
    transport = PahoTransport(b.url, "kiosk1", reconnect_min_s=0.1, reconnect_max_s=0.5)
    comms = Comms(transport, box, TOPICS, app_version="1.0", replay_rate_per_s=200)
    sub = Collector(b.port, [TOPICS.match], client_id="dashboard", clean=False)
    try:
        comms.start(_status())
        assert comms.connected
        for i in range(100):
            comms.publish_event(TOPICS.match, _event(i))
        assert sub.wait_for(lambda m: len(m) >= 20)
        b.stop(kill=True)
        for i in range(100, 200):
            comms.publish_event(TOPICS.match, _event(i))
        assert comms.flush()
        assert comms.outbox_depth > 0
        t0 = time.monotonic()
        b.start()
        assert sub.wait_for(lambda m: len({json.loads(p)["id"] for _, p, _ in m}) == 200, timeout_s=30), (
            f"received {len(sub.messages)}"
        )
        recovered_s = time.monotonic() - t0
        seqs = [json.loads(p)["seq"] for p in sub.payloads(TOPICS.match)]
        first = list(dict.fromkeys(seqs))
        assert first == list(range(200)), "order by seq after de-dup"
        print(f"broker outage: 200 delivered, {len(seqs) - 200} duplicates, all in {recovered_s:.2f} s")
    finally:
        comms.stop()
        sub.close()
        box.close()
        b.stop()
    assert Outbox(tmp_path / "o.db").depth == 0


def test_new_comms_on_the_same_outbox_replays_unacked(broker: Mosquitto, tmp_path: Path) -> None:
    """Guards: events accepted while offline lost when the kiosk restarts before the broker returns."""
    db = tmp_path / "o.db"
    dead = PahoTransport(f"mqtt://127.0.0.1:{free_port()}", "kiosk-r", reconnect_min_s=5.0)
    box = Outbox(db)
    topics = Topics("store1", "kiosk-r")
    first = Comms(dead, box, topics, app_version="1.0", connect_timeout_s=0.2)
    first.start(Status(kiosk="kiosk-r", store="store1", state=KioskState.ONLINE))
    for i in range(50):
        first.publish_event(topics.match, _event(i))
    first.stop()
    box.close()
    sub = Collector(broker.port, [topics.match])
    box = Outbox(db)
    assert box.depth == 50
    second = Comms(
        PahoTransport(broker.url, "kiosk-r"), box, topics, app_version="1.0", replay_rate_per_s=500
    )
    second.start(Status(kiosk="kiosk-r", store="store1", state=KioskState.ONLINE))
    try:
        assert sub.wait_for(lambda m: len(m) >= 50)
        assert [json.loads(p)["seq"] for p in sub.payloads(topics.match)] == list(range(50))
    finally:
        second.stop()
        sub.close()
    assert box.depth == 0
    box.close()


def test_password_auth_and_qos1_ack_latency(tmp_path: Path) -> None:
    """Guards: credentials ignored, the password leaking into repr, Nagle delaying PUBACKs."""
    b = Mosquitto(tmp_path / "mosq", passwords={"kiosk": "s3cret"}).start()
    try:
        bad = PahoTransport(b.url, "k-bad", username="kiosk", password="wrong", reconnect_min_s=5.0)
        bad.connect(will=None, timeout_s=0.5)
        assert not bad.connected
        bad.close()
        t = PahoTransport(b.url, "k-good", username="kiosk", password="s3cret")
        assert "s3cret" not in repr(t)
        got = threading.Event()
        t.connect(will=None, timeout_s=5)
        assert t.connected
        t.subscribe("x/echo", lambda topic, payload, retained: got.set())
        lat = []
        for _ in range(200):
            t0 = time.perf_counter()
            assert t.publish("x/lat", b"y" * 256, qos=1, retain=False, timeout_s=2)
            lat.append((time.perf_counter() - t0) * 1000)
        assert t.publish("x/echo", b"1", qos=1, retain=False, timeout_s=2)
        assert got.wait(5)
        t.close()
        p50, p99 = statistics.median(lat), sorted(lat)[int(len(lat) * 0.99) - 1]
        print(f"paho QoS1 publish->PUBACK p50 {p50:.2f} ms p99 {p99:.2f} ms")
        assert p50 < 20, "Nagle/delayed-ACK back? (TCP_NODELAY)"
    finally:
        b.stop()

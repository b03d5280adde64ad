"""Fleet on one machine: a real mosquitto, six kiosks in two stores, staged rollouts over MQTT.

Kiosks are in-process stand-ins (real Updater, Comms, PahoTransport, Outbox; frame loop at 10 fps). Order
matters inside the module: factory install of release 10, good rollout of 20, bad rollout of 30.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloud.fleet.channel import MqttChannel
from cloud.fleet.rollout import Outcome, desired_for, run_rollout
from device.sync import Sources
from tests.fleet.conftest import STORES, Releases
from tests.fleet.helpers import desired
from tests.fleet.standin import StandInKiosk
from tests.support.mosquitto import Mosquitto, mosquitto_binary

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]
_LOGGER = logging.getLogger(__name__)

KIOSK_IDS = [(s, f"k{i}") for s in STORES for i in range(1, 4)]
WAIT_S = 90.0


class MatchCounter:
    """An independent subscriber counting distinct match events per kiosk."""

    def __init__(self, port: int) -> None:
        self.seen: set[tuple[str, int]] = set()
        self.dupes = 0
        self._lock = threading.Lock()
        ready = threading.Event()
        self._c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="match-counter")
        self._c.on_connect = lambda c, *a: c.subscribe("dt/storelens/+/+/events/match", qos=1)
        self._c.on_subscribe = lambda *a: ready.set()
        self._c.on_message = self._on_message
        self._c.connect("127.0.0.1", port)
        self._c.loop_start()
        assert ready.wait(10)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        m = json.loads(msg.payload)
        key = (f"{m['store']}/{m['kiosk']}", int(m["seq"]))
        with self._lock:
            if key in self.seen:
                self.dupes += 1
            self.seen.add(key)

    def count(self, kiosk: str) -> int:
        with self._lock:
            return sum(1 for k, _ in self.seen if k == kiosk)

    def close(self) -> None:
        self._c.disconnect()
        self._c.loop_stop()


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, releases: Releases
) -> Iterator[tuple[Mosquitto, dict[str, StandInKiosk], MatchCounter]]:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    root = tmp_path_factory.mktemp("fleet")
    broker = Mosquitto(root / "mosquitto").start()
    counter = MatchCounter(broker.port)
    kiosks = {
        f"{s}/{k}": StandInKiosk(
            root / s / k, s, k, broker.url, releases.key.public_key(),
            sources=Sources([releases.root.as_uri() + "/"]),
        )
        for s, k in KIOSK_IDS
    }
    for kiosk in kiosks.values():
        kiosk.start()
    try:
        # factory install: release 10 straight to every kiosk
        for (s, k), kiosk in zip(KIOSK_IDS, kiosks.values(), strict=True):
            kiosk.updater.submit(desired(releases.good1, s, k, probation_s=0.0))
        for kiosk in kiosks.values():
            assert _wait(
                lambda kiosk=kiosk: (
                    kiosk.model_id == releases.good1.manifest.bundle.model_id and kiosk.updater.idle.is_set()
                )
            )
        yield broker, kiosks, counter
    finally:
        for kiosk in kiosks.values():
            kiosk.stop()
        counter.close()
        broker.stop()


def _wait(pred: object, timeout_s: float = WAIT_S) -> bool:
    ev = threading.Event()
    for _ in range(int(timeout_s / 0.05)):
        if pred():  # type: ignore[operator]
            return True
        ev.wait(0.05)
    return bool(pred())  # type: ignore[operator]


def _frames(kiosks: dict[str, StandInKiosk]) -> dict[str, tuple[int, int, int]]:
    return {n: (k.processed, k.frames.dropped, k.errors) for n, k in kiosks.items()}


def test_good_release_moves_all_six_with_no_frame_or_event_lost(
    fleet: tuple[Mosquitto, dict[str, StandInKiosk], MatchCounter], releases: Releases
) -> None:
    """Canary then batch: all six end on release 20, no frame dropped, every match event delivered once."""
    broker, kiosks, counter = fleet
    before = _frames(kiosks)
    channel = MqttChannel(broker.url)
    try:
        found = channel.discover(STORES, timeout_s=10)
        assert sorted(f"{v.store}/{v.kiosk}" for v in found) == sorted(kiosks)
        report = run_rollout(
            channel,
            desired_for(releases.good2.manifest, releases.good2.url, releases.good2.sig_url, deadline_s=120),
            found,
            canary=1,
            batch_size=5,
            stage_timeout_s=120,
            poll_interval_s=0.05,
        )
    finally:
        channel.close()
    assert report.outcome is Outcome.DONE, report.reason
    _LOGGER.warning(
        "FLEET good rollout: %.2f s (canary %.2f s, batch %.2f s)",
        report.seconds,
        report.stages[0].seconds,
        report.stages[1].seconds,
    )
    new = releases.good2.manifest.bundle.model_id
    assert all(k.model_id == new for k in kiosks.values())
    after = _frames(kiosks)
    for name, k in kiosks.items():
        assert after[name][0] > before[name][0], f"{name} stopped processing frames"
        assert after[name][1] == 0, f"{name} dropped {after[name][1]} frames"
        assert after[name][2] == 0, f"{name} had frame errors"
        assert k.drain(30), f"{name} outbox not drained"
    for name, k in kiosks.items():
        assert _wait(lambda name=name, k=k: counter.count(name) == k.published, 30), (
            name,
            counter.count(name),
            k.published,
        )
    assert counter.dupes == 0


def test_bad_release_stops_at_the_canary_which_rolls_back(
    fleet: tuple[Mosquitto, dict[str, StandInKiosk], MatchCounter], releases: Releases
) -> None:
    """Constant-output model: the canary refuses it by self-test, the rollout halts, nobody else changes."""
    broker, kiosks, _ = fleet
    current = {n: k.model_id for n, k in kiosks.items()}
    switches = {n: len(k.switches) for n, k in kiosks.items()}
    channel = MqttChannel(broker.url)
    try:
        found = channel.discover(STORES, timeout_s=10)
        report = run_rollout(
            channel,
            desired_for(releases.bad.manifest, releases.bad.url, releases.bad.sig_url, deadline_s=120),
            found,
            canary=1,
            batch_size=5,
            stage_timeout_s=120,
            poll_interval_s=0.05,
        )
        views = {f"{v.store}/{v.kiosk}": v for v in channel.poll(found)}
    finally:
        channel.close()
    assert report.outcome is Outcome.HALTED and len(report.stages) == 1
    _LOGGER.warning("FLEET bad rollout halted after %.2f s: %s", report.seconds, report.reason)
    canary = "/".join(report.stages[0].kiosks[0])
    assert views[canary].step == "rolled_back" and "selftest" in views[canary].detail
    assert len(report.untouched) == 5
    for name, k in kiosks.items():
        assert k.model_id == current[name] and len(k.switches) == switches[name], name
        if name != canary:
            assert views[name].release != "rel30"
            assert views[name].release == "rel20" and views[name].step == "done"  # never asked

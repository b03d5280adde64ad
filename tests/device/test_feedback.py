"""The kiosk side of the store-learning loop: a screen answer -> a feedback message via the outbox and MQTT.

A kiosk (FakeEmbedder, a generated clip of 3 held items) on a real mosquitto; its screen's answers are
posted over HTTP as the page does. Items replaced on screen unanswered are ``no_answer``; the last one is
answered by the test.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device.app import KioskApp
from device.camera.synthetic import make_scene, render_items, write_video
from device.config import FeedbackConfig, parse_config
from device.feedback import encode_crop
from models.fake import FakeEmbedder
from storelens.feedback import MAX_CROP_JPEG_BYTES, MAX_CROP_SIDE_PX, FeedbackEvent, parse_feedback
from storelens.protocol import Alert, MatchEvent, Topics, decode
from tests.device.comms.helpers import Collector
from tests.device.snapshots import make_snapshot
from tests.support.mosquitto import Mosquitto

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120, method="thread")]

TOPICS = Topics("s1", "k1")
DIM = 64


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("feedback")
    items = render_items(3, seed=4)
    video = write_video(make_scene(items, seed=4), root / "clip.avi")
    key = Ed25519PrivateKey.generate()
    pub = root / "catalog.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo))
    emb = FakeEmbedder(DIM)
    snap = make_snapshot(root / "v1", emb.embed(items), ["a", "b", "c"], key, model_id=emb.model_id,
                         threshold=0.3, thumbs=items)
    return video, pub, snap


@pytest.fixture
def collectors() -> Iterator[list[Collector]]:
    made: list[Collector] = []
    yield made
    for c in made:
        c.close()


def _app(world: tuple[Path, Path, Path], tmp: Path, broker: Mosquitto, **feedback: Any) -> KioskApp:
    video, pub, snap = world
    return KioskApp(parse_config({
        "kiosk": {"store_id": "s1", "kiosk_id": "k1"},
        "camera": {"source": str(video)},
        "model": {"kind": "fake", "fake_dim": DIM},
        "snapshots": {"state_dir": "state", "public_keys": [str(pub)], "initial": str(snap)},
        "broker": {"url": broker.url},
        "screen": {"port": 0},
        "outbox": {"path": "outbox.sqlite"},
        "health": {"interval_s": 5.0},
        "feedback": {"enabled": True, "answer_timeout_s": 60, **feedback},
    }, base_dir=tmp))


def _shown(app: KioskApp, c: Collector) -> MatchEvent:
    """Run the clip to its end; the last match event (its question still open on the screen)."""
    assert app.pipeline.done.wait(60), "clip did not finish"
    assert c.wait_for(lambda m: sum(t == TOPICS.match for t, _, _ in m) >= 3, 20)
    last = decode(c.payloads(TOPICS.match)[-1], MatchEvent)
    assert app.screen is not None and app.screen.state()["result"]["id"] == last.id
    return last


def _answer(app: KioskApp, match_id: str, answer: str, sku: str | None) -> int:
    assert app.screen is not None
    body = json.dumps({"match_id": match_id, "answer": answer, "sku": sku}).encode()
    req = urllib.request.Request(app.screen.url + "answer", data=body, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return int(r.status)


def _feedback(c: Collector) -> dict[str, FeedbackEvent]:
    """Unique feedback messages by id, each through the cloud's own parser (QoS 1 may deliver twice)."""
    msgs = [parse_feedback(t, p) for t, p, _ in list(c.messages) if t == TOPICS.feedback]
    return {m.id: m for m in msgs}


def _marker(app: KioskApp, c: Collector) -> None:
    """Queue an alert behind everything the kiosk queued so far and wait for it: the outbox sends in order,
    so anything queued before it has arrived by then."""
    app.comms.publish_event(TOPICS.alert, Alert(kiosk="k1", store="s1", kind="camera_back",
                                                detail="marker").to_bytes())
    assert c.wait_for(lambda m: any(t == TOPICS.alert and b"marker" in p for t, p, _ in m), 20)


def test_a_confirmed_answer_arrives_as_one_feedback_message_within_the_caps(
    world: tuple[Path, Path, Path], broker: Mosquitto, tmp_path: Path, collectors: list[Collector]
) -> None:
    """Tapping the shown result must publish exactly one confirmed message for that sku (the crop a JPEG
    within the caps, the bundle's dim, the match's model/snapshot); items left unanswered are no_answer."""
    c = Collector(broker.port, [TOPICS.match, TOPICS.feedback, TOPICS.alert])
    collectors.append(c)
    app = _app(world, tmp_path, broker)
    app.start()
    try:
        last = _shown(app, c)
        assert _answer(app, last.id, "confirmed", last.results[0].sku) == 200
        _marker(app, c)
    finally:
        app.stop()
    got = _feedback(c)
    matches = [decode(p, MatchEvent) for p in c.payloads(TOPICS.match)]
    assert sorted(m.match_id for m in got.values()) == sorted({e.id for e in matches})
    by_match = {m.match_id: m for m in got.values()}
    fb = by_match[last.id]
    assert fb.answer == "confirmed" and fb.chosen_sku == last.results[0].sku
    assert fb.shown == [r.sku for r in last.results[:4]]
    assert (fb.model, fb.snapshot, fb.dim) == (last.model, last.snapshot, DIM)
    assert abs(float(np.linalg.norm(fb.embedding())) - 1.0) < 1e-2  # the pooled unit vector, float16
    assert fb.answered_after_s is not None and fb.answered_after_s >= 0
    jpeg = fb.crop_bytes()
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None and len(jpeg) <= MAX_CROP_JPEG_BYTES and max(img.shape[:2]) <= MAX_CROP_SIDE_PX
    assert all(m.answer == "no_answer" and m.chosen_sku is None
               for mid, m in by_match.items() if mid != last.id)


def test_disabled_feedback_sends_nothing(
    world: tuple[Path, Path, Path], broker: Mosquitto, tmp_path: Path, collectors: list[Collector]
) -> None:
    """Off by default in the product: the screen still asks, but no crop may leave the kiosk."""
    c = Collector(broker.port, [TOPICS.match, TOPICS.feedback, TOPICS.alert])
    collectors.append(c)
    app = _app(world, tmp_path, broker, enabled=False)
    app.start()
    try:
        last = _shown(app, c)
        assert _answer(app, last.id, "not_here", None) == 200
        _marker(app, c)
    finally:
        app.stop()
    assert c.payloads(TOPICS.feedback) == []
    assert app.feedback.counters.disabled == 3 and app.feedback.counters.sent == 0
    assert FeedbackConfig().enabled is False


def test_the_hourly_limit_is_honoured(
    world: tuple[Path, Path, Path], broker: Mosquitto, tmp_path: Path, collectors: list[Collector]
) -> None:
    """One message per hour allowed: the first answer is sent, the rest are counted and not sent."""
    c = Collector(broker.port, [TOPICS.match, TOPICS.feedback, TOPICS.alert])
    collectors.append(c)
    app = _app(world, tmp_path, broker, max_per_hour=1)
    app.start()
    try:
        last = _shown(app, c)
        assert _answer(app, last.id, "confirmed", last.results[0].sku) == 200  # shown "thank you", not sent
        _marker(app, c)
    finally:
        app.stop()
    assert len(_feedback(c)) == 1
    assert app.feedback.counters.sent == 1 and app.feedback.counters.rate_limited == 2


def test_an_answer_given_while_the_broker_is_down_arrives_after_it_returns(
    world: tuple[Path, Path, Path], own_broker: Mosquitto, tmp_path: Path, collectors: list[Collector]
) -> None:
    """The feedback message waits in the durable outbox through a broker outage, then arrives."""
    c = Collector(own_broker.port, [TOPICS.match], clean=False, client_id="fb-outage")
    collectors.append(c)
    app = _app(world, tmp_path, own_broker)
    app.start()
    try:
        last = _shown(app, c)
        own_broker.stop(kill=True)
        assert _answer(app, last.id, "not_here", None) == 200
        assert app.comms.flush()
        assert app.comms.outbox_depth >= 1
        own_broker.start()
        c2 = Collector(own_broker.port, [TOPICS.feedback])
        collectors.append(c2)
        assert c2.wait_for(lambda m: any(t == TOPICS.feedback for t, _, _ in m), 60)
    finally:
        app.stop()
    got = {m.match_id: m for m in _feedback(c2).values()}
    assert got[last.id].answer == "not_here" and got[last.id].chosen_sku is None


def test_a_huge_noisy_crop_is_capped_in_pixels_and_bytes() -> None:
    """A 4K crop of noise (the JPEG worst case) must still fit the message caps, never fail to send."""
    rng = np.random.default_rng(0)
    crop = rng.integers(0, 256, size=(2160, 3840, 3), dtype=np.uint8)
    jpeg = encode_crop(crop, 95)
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert len(jpeg) <= MAX_CROP_JPEG_BYTES and max(img.shape[:2]) <= MAX_CROP_SIDE_PX

"""The feedback collector on a real mosquitto: stores what kiosks confirm, refuses the rest by reason."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from cloud.feedback.collector import BrokerConfig, CollectorError, FeedbackCollector, OnStored
from cloud.feedback.store import FeedbackStore
from cloud.feedback.verify import KnownSnapshots
from storelens.feedback import FeedbackEvent, feedback_topic
from tests.deploy.mqtt_peer import Peer
from tests.feedback.conftest import MODEL, STORE, feedback, flat_jpeg, jpeg
from tests.support.mosquitto import Mosquitto

pytestmark = pytest.mark.integration

WAIT_S = 10.0


@contextmanager
def collecting(
    broker_url: str, root: Path, snapshots: Path, *, client_id: str | None = None, **kw: Any
) -> Iterator[FeedbackCollector]:
    """A started collector for store s1 writing under ``root``, stopped on exit."""
    cfg = BrokerConfig(url=broker_url, client_id=client_id or f"t-coll-{uuid.uuid4().hex[:8]}")
    known = KnownSnapshots(STORE, snapshots_dir=snapshots)
    c = FeedbackCollector(STORE, cfg, FeedbackStore(root), known, **kw)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def send(pub: Peer, msg: FeedbackEvent, *, kiosk: str | None = None) -> None:
    assert pub.publish(feedback_topic(STORE, kiosk or msg.kiosk), msg.to_bytes()).value < 128


def test_valid_feedback_from_two_kiosks_is_stored(
    broker: Mosquitto, publisher: Peer, snapshots: Path, tmp_path: Path
) -> None:
    """Accepted messages must end up as records with their crops (a collector that drops them loses the
    store photos the relearning needs)."""
    root = tmp_path / "fb"
    with collecting(broker.url, root, snapshots) as c:
        sent = [feedback("kA", 1), feedback("kA", 2), feedback("kB", 3), feedback("kB", 4, answer="not_here",
                                                                                   chosen_sku=None)]
        for m in sent:
            send(publisher, m)
        assert c.wait_handled(4, WAIT_S), c.stats()
        assert c.stats()["stored"] == 4
    fs = FeedbackStore(root)
    recs = fs.records(STORE)
    assert sorted((r.kiosk, r.answer) for r in recs) == [
        ("kA", "confirmed"), ("kA", "confirmed"), ("kB", "confirmed"), ("kB", "not_here")]
    assert {fs.crop_path(r.record_id).read_bytes() for r in recs} == {jpeg(s) for s in (1, 2, 3, 4)}


def test_forged_broken_and_unknown_messages_are_refused_by_reason(
    broker: Mosquitto, publisher: Peer, snapshots: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A forged kiosk id, an undecodable or oversized crop, a huge payload or an unknown model/snapshot
    must be counted under its reason, logged, not stored, and must not stop the collector."""
    root = tmp_path / "fb"
    big_crop = flat_jpeg(400, 400)  # few bytes, but over MAX_CROP_SIDE_PX
    garbage = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8  # JPEG magic, then nothing a decoder can read
    bad = [
        (feedback("kB", 1).to_bytes(), "kA"),  # payload says kB, sent on kA's topic
        (feedback("kA", 2, crop_jpeg=garbage).to_bytes(), "kA"),
        (feedback("kA", 3, crop_jpeg=big_crop).to_bytes(), "kA"),
        (b'{"type":"feedback","pad":"' + b"x" * 200_000 + b'"}', "kA"),
        (feedback("kA", 4, snapshot=99).to_bytes(), "kA"),
        (feedback("kA", 5, model="cd" * 32).to_bytes(), "kA"),
        (b"not json", "kA"),
    ]
    caplog.set_level(logging.WARNING, logger="cloud.feedback.collector")
    with collecting(broker.url, root, snapshots) as c:
        for payload, kiosk in bad:
            assert publisher.publish(feedback_topic(STORE, kiosk), payload).value < 128
        send(publisher, feedback("kA", 6))  # still collecting after all that
        assert c.wait_handled(len(bad) + 1, WAIT_S), c.stats()
        stats = c.stats()
    assert {k: v for k, v in stats.items() if v} == {
        "forged": 1, "bad_image": 2, "oversized": 1, "unknown_snapshot": 2, "malformed": 1, "stored": 1}
    assert _match_ids(root) == ["m6"]
    assert len(list((root / "crops").iterdir())) == 1
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert len(refusals) == len(bad)
    assert any("refused forged" in m and "topic says" in m for m in refusals)
    assert any("refused unknown_snapshot" in m and "v99" in m for m in refusals)


def test_replayed_message_is_one_record(
    broker: Mosquitto, publisher: Peer, snapshots: Path, tmp_path: Path
) -> None:
    """A kiosk (or an attacker) replaying the same message must not make two store photos."""
    root = tmp_path / "fb"
    msg = feedback("kA", 1)
    with collecting(broker.url, root, snapshots) as c:
        for _ in range(3):
            send(publisher, msg)
        assert c.wait_handled(3, WAIT_S)
        assert (c.stats()["stored"], c.stats()["duplicate"]) == (1, 2)
    assert len(FeedbackStore(root).records()) == 1


def test_flood_from_one_kiosk_is_rate_limited_and_others_still_get_through(
    broker: Mosquitto, publisher: Peer, snapshots: Path, tmp_path: Path
) -> None:
    """One kiosk flooding must not fill the store nor crowd out another kiosk's feedback."""
    root = tmp_path / "fb"
    now = [0.0]
    with collecting(broker.url, root, snapshots, burst=3, rate_per_hour=1.0, clock=lambda: now[0]) as c:
        for i in range(8):
            send(publisher, feedback("kA", i))
        send(publisher, feedback("kB", 100))
        assert c.wait_handled(9, WAIT_S)
        assert (c.stats()["stored"], c.stats()["rate_limited"]) == (4, 5)
        now[0] += 3600.0  # an hour later kA has one token again
        send(publisher, feedback("kA", 50))
        assert c.wait_handled(10, WAIT_S)
        assert c.stats()["stored"] == 5
    per_kiosk = [r.kiosk for r in FeedbackStore(root).records()]
    assert sorted(per_kiosk) == ["kA"] * 4 + ["kB"]


def test_feedback_sent_while_the_collector_is_down_is_collected(
    broker: Mosquitto, publisher: Peer, snapshots: Path, tmp_path: Path
) -> None:
    """The persistent session must keep what kiosks published while the collector was stopped."""
    root, cid = tmp_path / "fb", f"t-coll-{uuid.uuid4().hex[:8]}"
    with collecting(broker.url, root, snapshots, client_id=cid):
        pass  # first start: the broker now holds our subscription
    for i in range(3):
        send(publisher, feedback("kA", i))
    with collecting(broker.url, root, snapshots, client_id=cid) as c:
        assert c.wait_handled(3, WAIT_S), c.stats()
        assert c.stats()["stored"] == 3
    assert len(FeedbackStore(root).records()) == 3


def test_auto_review_hook_runs_once_per_new_record(
    broker: Mosquitto, publisher: Peer, snapshots: Path, tmp_path: Path
) -> None:
    """The auto-review hook must see each newly stored record once (not replays), and its failure must
    neither lose the record nor stop the collector."""
    seen: list[str] = []

    def hook(store: FeedbackStore, rid: str, msg: FeedbackEvent) -> None:
        seen.append(store.get(rid).kiosk + "/" + msg.match_id)
        if msg.match_id == "m2":
            raise RuntimeError("rule bug")

    on_stored: OnStored = hook
    with collecting(broker.url, tmp_path / "fb", snapshots, on_stored=on_stored) as c:
        first = feedback("kA", 1)
        for m in (first, first, feedback("kA", 2), feedback("kA", 3)):
            send(publisher, m)
        assert c.wait_handled(4, WAIT_S)
        assert c.stats()["stored"] == 3
    assert seen == ["kA/m1", "kA/m2", "kA/m3"]


def test_tls_with_client_certificate(tls_broker: Mosquitto, snapshots: Path, tmp_path: Path) -> None:
    """mqtts:// must verify the broker with the CA and present the client certificate."""
    assert tls_broker.pki is not None
    pair = tls_broker.pki.issue("collector")
    cfg = BrokerConfig(url=f"mqtts://localhost:{tls_broker.tls_port}", client_id=f"t-{uuid.uuid4().hex[:8]}",
                       ca=str(tls_broker.pki.ca), cert=str(pair.cert), key=str(pair.key))  # fmt: skip
    known = KnownSnapshots(STORE, model_ids=[MODEL])
    c = FeedbackCollector(STORE, cfg, FeedbackStore(tmp_path / "fb"), known)
    c.start()
    pub = Peer("127.0.0.1", tls_broker.port, f"t-pub-{uuid.uuid4().hex[:8]}").connect()
    try:
        send(pub, feedback("kA", 1))
        assert c.wait_handled(1, WAIT_S)
        assert c.stats()["stored"] == 1
    finally:
        pub.close()
        c.stop()


def test_unreachable_broker_is_a_clear_error(snapshots: Path, tmp_path: Path) -> None:
    """A wrong broker address must be one CollectorError naming it, not a traceback or a hang."""
    from tests.support.mosquitto import free_port

    port = free_port()
    cfg = BrokerConfig(url=f"mqtt://127.0.0.1:{port}", client_id="t-nobody")
    known = KnownSnapshots(STORE, model_ids=[MODEL])
    c = FeedbackCollector(STORE, cfg, FeedbackStore(tmp_path / "fb"), known)
    with pytest.raises(CollectorError, match=f"127.0.0.1:{port}"):
        c.start(timeout_s=5.0)
    with pytest.raises(CollectorError, match="mqtt://host:port"):
        FeedbackCollector(STORE, BrokerConfig(url="http://x", client_id="t"), FeedbackStore(tmp_path / "fb"),
                          KnownSnapshots(STORE, model_ids=[MODEL]))  # fmt: skip


def _match_ids(root: Path) -> list[str]:
    return sorted(json.loads(p.read_text())["match_id"] for p in (root / "records").glob("*.json"))


def test_a_failed_write_is_not_acknowledged_and_comes_back(
    broker: Mosquitto, publisher: Peer, snapshots: Path, tmp_path: Path
) -> None:
    """A write that fails (disk full, a broken folder) must not be acknowledged: the collector reports
    failure, and the message is stored by the next run instead of being lost."""
    root, cid = tmp_path / "fb", f"t-coll-{uuid.uuid4().hex[:8]}"
    msg = feedback("kA", 1)
    with collecting(broker.url, root, snapshots, client_id=cid) as c:
        (root / "crops").rmdir()
        (root / "crops").write_text("not a folder")  # every crop write now fails with an OSError
        send(publisher, msg)
        assert c.wait_done(WAIT_S) and c.failed.is_set()
        assert c.stats()["stored"] == 0
    (root / "crops").unlink()
    with collecting(broker.url, root, snapshots, client_id=cid) as c:
        assert c.wait_handled(1, WAIT_S), c.stats()
        assert c.stats()["stored"] == 1
    assert len(FeedbackStore(root).records()) == 1

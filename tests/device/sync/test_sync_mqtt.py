"""The whole path over a real broker: a retained announcement -> Comms subscription -> swap."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import paho.mqtt.publish
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device.comms import Comms, Outbox
from device.comms.paho_transport import PahoTransport
from device.generations.switcher import switch_snapshot
from device.sync import ActiveSnapshot, SnapshotStore, SnapshotSync, Sources
from storelens.protocol import KioskState, SnapshotAnnouncement, Status, Topics
from tests.device.sync.snapbuild import MODEL_DIM, MODEL_ID, archive, build_snapshot
from tests.support.mosquitto import Mosquitto

pytestmark = pytest.mark.integration


def test_retained_announcement_installs_and_search_keeps_answering(broker: Mosquitto, tmp_path: Path) -> None:
    """Guards: missing an announcement retained before connecting; garbage killing the thread."""
    key = Ed25519PrivateKey.generate()
    built = build_snapshot(tmp_path / "src", key, version=4, store="store9")
    tar = archive(built, tmp_path / "v4.tar")
    topics = Topics("store9", "kiosk1")
    ann = SnapshotAnnouncement(
        store="store9",
        version=4,
        model_id=MODEL_ID,
        manifest_sha256=built.manifest_sha256,
        size=tar.stat().st_size,
        sha256=hashlib.sha256(tar.read_bytes()).hexdigest(),
        url=tar.as_uri(),
    )
    paho.mqtt.publish.single(topics.snapshot, ann.to_bytes(), qos=1, retain=True, port=broker.port)
    swapped = threading.Event()
    current: list[ActiveSnapshot] = []

    def on_swap(snap: ActiveSnapshot) -> None:
        current.append(snap)
        swapped.set()

    refused: list[tuple[str, str]] = []
    got_refusal = threading.Event()

    def on_refused(reason: str, detail: str) -> None:
        refused.append((reason, detail))
        got_refusal.set()

    sync = SnapshotSync(
        SnapshotStore(tmp_path / "root"),
        [key.public_key()],
        store_id="store9",
        model_id=MODEL_ID,
        model_dim=MODEL_DIM,
        switch=lambda c: switch_snapshot(c, on_swap),
        on_refused=on_refused,
        sources=Sources([tmp_path.as_uri() + "/"]),
    )
    box = Outbox(tmp_path / "o.db")
    comms = Comms(PahoTransport(broker.url, "kiosk1-sync"), box, topics, app_version="1.0")
    sync.start()
    comms.subscribe(topics.snapshot, sync.on_announcement)
    comms.start(Status(kiosk="kiosk1", store="store9", state=KioskState.ONLINE))
    try:
        assert swapped.wait(15), refused
        assert current[0].version == 4
        paho.mqtt.publish.single(topics.snapshot, b"\x00garbage", qos=1, retain=True, port=broker.port)
        assert got_refusal.wait(10) and refused[0][0] == "bad_announcement"
        assert current[-1].search(built.vectors[5:6], 1)[0][0].sku == built.skus[5]
    finally:
        comms.stop()
        sync.stop()
        box.close()
        paho.mqtt.publish.single(topics.snapshot, b"", retain=True, port=broker.port)  # clear retained

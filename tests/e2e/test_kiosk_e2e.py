"""The kiosk end to end over a real mosquitto, a real OpenVINO bundle and real signed snapshots.

Held items come from a generated video (ground truth known); the model is the tiny exported bundle.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device.app import KioskApp
from device.camera.synthetic import Scene, make_scene, render_items, write_video
from device.config import parse_config
from storelens.protocol import Alert, MatchEvent, Topics, decode
from tests.device.comms.helpers import Collector
from tests.device.snapshots import make_snapshot
from tests.support.mosquitto import Mosquitto, free_port

# The thread method dumps every thread's stack and ends the run if a test hangs inside C code (OpenVINO,
# paho), where the signal method cannot interrupt it.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(180, method="thread")]

N_ITEMS = 4
SKUS = [f"sku-{i}" for i in range(N_ITEMS)]
TOPICS = Topics("s1", "k1")


@dataclass
class World:
    bundle: Path
    model_id: str
    items: list[np.ndarray]
    vectors: np.ndarray
    key: Ed25519PrivateKey
    pub: Path
    scene: Scene
    video: Path
    v1: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("kiosk-e2e")
    bundle = root / "bundle"
    storelens = Path(sys.executable).parent / "storelens"
    subprocess.run([str(storelens), "model", "export", "--source", "tiny", "--out", str(bundle)], check=True,
                   capture_output=True, timeout=120)
    from models.embedder import Embedder

    items = render_items(N_ITEMS, seed=11)
    with Embedder(bundle) as emb:
        vectors, model_id = emb.embed(items), emb.model_id
    key = Ed25519PrivateKey.generate()
    pub = root / "catalog.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo))
    scene = make_scene(items, seed=11)
    video = write_video(scene, root / "clip.avi")
    v1 = make_snapshot(root / "v1", vectors, SKUS, key, model_id=model_id, version=1, threshold=0.5,
                       thumbs=items)
    return World(bundle, model_id, items, vectors, key, pub, scene, video, v1)


def _config(w: World, tmp: Path, broker_url: str, *, fps: float | None = 60.0) -> dict[str, Any]:
    camera: dict[str, Any] = {"source": str(w.video)}
    if fps:
        camera["fps"] = fps
    return {
        "kiosk": {"store_id": "s1", "kiosk_id": "k1"},
        "camera": camera,
        "model": {"bundle": str(w.bundle)},
        "snapshots": {"state_dir": str(tmp / "state"), "public_keys": [str(w.pub)], "initial": str(w.v1)},
        "sync": {"sources": [(tmp / "artifacts").as_uri() + "/"]},  # where the tests publish
        "broker": {"url": broker_url},
        "screen": {"enabled": False},
        "outbox": {"path": str(tmp / "outbox.sqlite")},
        "health": {"interval_s": 1.0},
    }


def _events(c: Collector) -> dict[str, MatchEvent]:
    """Unique match events by id (QoS 1 may deliver one twice; the id makes that harmless)."""
    return {e.id: e for e in (decode(p, MatchEvent) for p in c.payloads(TOPICS.match))}


def _expected() -> list[str]:
    return [SKUS[h.item] for h in make_scene(render_items(N_ITEMS, seed=11), seed=11).schedule]


@pytest.fixture
def collector_factory() -> Iterator[list[Collector]]:
    made: list[Collector] = []
    yield made
    for c in made:
        c.close()


def test_every_item_once_and_a_broker_restart_loses_nothing(
    world: World, own_broker: Mosquitto, tmp_path: Path, collector_factory: list[Collector]
) -> None:
    """Kill the broker after the first answer, restart it after the clip: every held item arrives once."""
    first = Collector(own_broker.port, [TOPICS.match])
    collector_factory.append(first)
    app = KioskApp(parse_config(_config(world, tmp_path, own_broker.url)))
    app.start()
    try:
        assert first.wait_for(lambda m: len(m) >= 1, 30.0)
        own_broker.stop(kill=True)
        assert app.pipeline.wait(60.0)
        assert app.comms.flush()
        assert app.comms.outbox_depth >= 1  # answers given while the broker was down wait in the outbox
        own_broker.start()
        second = Collector(own_broker.port, [TOPICS.match])
        collector_factory.append(second)
        seen_first = set(_events(first))
        assert second.wait_for(lambda m: len(seen_first | {e.id for e in _events_of(m)}) >= N_ITEMS, 30.0)
    finally:
        app.stop()
    events = {**_events(first), **_events(second)}
    ordered = sorted(events.values(), key=lambda e: e.seq)
    assert [e.seq for e in ordered] == list(range(1, N_ITEMS + 1))
    assert [e.results[0].sku for e in ordered] == _expected()
    assert all(e.matched and e.snapshot == 1 and e.model == world.model_id for e in ordered)
    assert app.comms.outbox_depth == 0


def _events_of(messages: list[tuple[str, bytes, bool]]) -> list[MatchEvent]:
    return [decode(p, MatchEvent) for t, p, _ in messages if t == TOPICS.match]


def test_snapshot_swap_mid_run_drops_no_frame_and_a_forged_one_is_refused(
    world: World, broker: Mosquitto, tmp_path: Path, collector_factory: list[Collector]
) -> None:
    """v2 is swapped in while items are being answered (every frame still processed); a forged v3 is
    refused and v2 keeps serving."""
    from cloud.publish import publish_snapshot

    store_url = f"file://{tmp_path / 'artifacts'}"
    v2 = make_snapshot(tmp_path / "v2", world.vectors, SKUS, world.key, model_id=world.model_id, version=2,
                       threshold=0.5, title_prefix="New")
    forged = make_snapshot(tmp_path / "v3", world.vectors, SKUS, Ed25519PrivateKey.generate(),
                           model_id=world.model_id, version=3, threshold=0.5, title_prefix="Evil")
    c = Collector(broker.port, [TOPICS.match, TOPICS.alert])
    collector_factory.append(c)
    app = KioskApp(parse_config(_config(world, tmp_path, broker.url, fps=40.0)))
    app.start()
    try:
        assert c.wait_for(lambda m: len(_events_of(m)) >= 1, 30.0)
        publish_snapshot(v2, store_url, broker.url)
        assert c.wait_for(lambda m: _alerts(m, "snapshot_applied"), 30.0)
        publish_snapshot(forged, store_url, broker.url)
        assert c.wait_for(lambda m: _alerts(m, "snapshot_refused"), 30.0)
        assert app.pipeline.wait(60.0)
        assert c.wait_for(lambda m: len({e.id for e in _events_of(m)}) >= N_ITEMS, 30.0)
    finally:
        app.stop()
        _clear_retained(broker)
    ordered = sorted(_events(c).values(), key=lambda e: e.seq)
    assert [e.results[0].sku for e in ordered] == _expected()
    versions = [e.snapshot for e in ordered]
    assert versions[0] == 1 and versions[-1] == 2 and versions == sorted(versions)
    assert ordered[-1].results[0].title.startswith("New")
    refused = [a for a in _alert_list(c) if a.kind == "snapshot_refused"]
    assert "bad_signature" in refused[0].detail
    assert app.grab.frames_in == world.scene.n_frames
    assert app.pipeline.counters.frames_processed == world.scene.n_frames  # no frame dropped by the swap
    assert app.grab.frames_dropped == 0


def _write_catalog(w: World, root: Path, title_prefix: str) -> Path:
    """The world's items as a cloud catalog (one JPEG each), titles and prices marked by ``title_prefix``."""
    rows = []
    for i, (sku, img) in enumerate(zip(SKUS, w.items, strict=True)):
        path = root / "img" / f"{sku}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        price = f"{1 + i}.99" if title_prefix == "Item" else f"{5 + i}.49"
        rows.append({"sku": sku, "title": f"{title_prefix} {sku}", "price": price,
                     "images": [f"img/{sku}.jpg"]})
    (root / "catalog.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "catalog.jsonl"


def test_delta_published_mid_run_is_applied_onto_the_served_snapshot(
    world: World, broker: Mosquitto, tmp_path: Path, collector_factory: list[Collector]
) -> None:
    """A delta (new titles and prices) published while items are being answered is applied onto the
    cloud-built v1 the kiosk serves and swapped in without dropping a frame; later answers carry it."""
    from cloud.build import BuildSpec, build_snapshot
    from cloud.publish import publish_snapshot
    from storelens.snapshot import read_manifest_unverified

    def build(prefix: str, out: str, base: Path | None = None) -> Path:
        catalog = _write_catalog(world, tmp_path / "catalog", prefix)
        return build_snapshot(BuildSpec(catalog=catalog, store="s1", out_dir=tmp_path / out,
                                        private_key=world.key, bundle=world.bundle, base=base,
                                        adapter="none", progress=False)).out_dir

    v1 = build("Item", "c1")
    v2 = build("New", "c2", base=v1)
    assert read_manifest_unverified(v2).kind == "delta"
    c = Collector(broker.port, [TOPICS.match, TOPICS.alert])
    collector_factory.append(c)
    cfg = _config(world, tmp_path, broker.url, fps=40.0)
    cfg["snapshots"]["initial"] = str(v1)
    app = KioskApp(parse_config(cfg))
    app.start()
    try:
        assert c.wait_for(lambda m: len(_events_of(m)) >= 1, 30.0)
        publish_snapshot(v2, f"file://{tmp_path / 'artifacts'}", broker.url)
        assert c.wait_for(lambda m: _alerts(m, "snapshot_applied") or _alerts(m, "snapshot_refused"), 30.0)
        assert app.pipeline.wait(60.0)
        assert c.wait_for(lambda m: len({e.id for e in _events_of(m)}) >= N_ITEMS, 30.0)
    finally:
        app.stop()
        _clear_retained(broker)
    assert [a.detail for a in _alert_list(c) if a.kind == "snapshot_refused"] == []
    served = app.serving.sync.active if app.serving.sync is not None else None
    assert served is not None and (served.directory / "proof" / "v2").is_dir()  # applied, not re-fetched
    ordered = sorted(_events(c).values(), key=lambda e: e.seq)
    assert [e.results[0].sku for e in ordered] == _expected()
    versions = [e.snapshot for e in ordered]
    assert versions[0] == 1 and versions[-1] == 2 and versions == sorted(versions)
    assert ordered[0].results[0].title.startswith("Item") and ordered[-1].results[0].title.startswith("New")
    assert app.pipeline.counters.frames_processed == world.scene.n_frames  # no frame dropped by the swap


def _alert_list(c: Collector) -> list[Alert]:
    return [decode(p, Alert) for p in c.payloads(TOPICS.alert)]


def _alerts(messages: list[tuple[str, bytes, bool]], kind: str) -> bool:
    return any(decode(p, Alert).kind == kind for t, p, _ in messages if t == TOPICS.alert)


def _clear_retained(broker: Mosquitto) -> None:
    """The shared broker must not keep this test's retained announcement for the next test."""
    import paho.mqtt.publish as publish

    publish.single(TOPICS.snapshot, b"", qos=1, retain=True, hostname="127.0.0.1", port=broker.port)


def _outbox_match_ids(path: Path) -> list[str]:
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        rows = db.execute("SELECT topic, payload FROM outbox ORDER BY id").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()
    return [decode(bytes(p), MatchEvent).id for t, p in rows if t == TOPICS.match]


def test_sigkill_mid_run_then_restart_loses_nothing(
    world: World, broker: Mosquitto, tmp_path: Path, collector_factory: list[Collector]
) -> None:
    """Answers committed to the outbox survive a SIGKILL and are delivered after the restart."""
    cfg_path = tmp_path / "kiosk.toml"
    dead = f"mqtt://127.0.0.1:{free_port()}"  # first run: no broker, answers pile up in the outbox
    cfg_path.write_text(_toml(_config(world, tmp_path, dead)))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-m", "device", "run", "--config", str(cfg_path), "--exit-at-eof"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    outbox = tmp_path / "outbox.sqlite"
    waited = threading.Event()
    try:
        for _ in range(600):
            if len(_outbox_match_ids(outbox)) >= 2 or proc.poll() is not None:
                break
            waited.wait(0.1)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stderr:
            proc.stderr.close()
    committed = _outbox_match_ids(outbox)
    assert len(committed) >= 2

    c = Collector(broker.port, [TOPICS.match])
    collector_factory.append(c)
    cfg_path.write_text(_toml(_config(world, tmp_path, broker.url, fps=None)))
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert c.wait_for(lambda m: set(committed) <= {e.id for e in _events_of(m)}, 30.0)
    second_run = [e for e in _events(c).values() if e.id not in committed]
    assert [e.results[0].sku for e in sorted(second_run, key=lambda e: e.seq)] == _expected()
    assert _outbox_match_ids(outbox) == []


def _toml(cfg: dict[str, Any]) -> str:
    lines = []
    for section, values in cfg.items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            if isinstance(v, list):
                lines.append(f"{k} = [" + ", ".join(f'"{x}"' for x in v) + "]")
            elif isinstance(v, bool):
                lines.append(f"{k} = {'true' if v else 'false'}")
            elif isinstance(v, int | float):
                lines.append(f"{k} = {v}")
            else:
                lines.append(f'{k} = "{v}"')
    return "\n".join(lines) + "\n"

"""The composition root in-process: FakeEmbedder, in-memory transport, a generated clip as a video file."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device.app import KioskApp
from device.camera.synthetic import make_scene, render_items, write_video
from device.comms import InMemoryTransport
from device.config import parse_config
from models.fake import FakeEmbedder
from storelens.protocol import Alert, Health, KioskState, MatchEvent, Status, Topics, decode
from tests.device.snapshots import make_snapshot


def _config(tmp_path: Path, video: Path, pub: Path, initial: Path | None, pipeline: str = "overlap") -> Any:
    snaps: dict[str, Any] = {"state_dir": "state", "public_keys": [str(pub)], "subscribe": True}
    if initial is not None:
        snaps["initial"] = str(initial)
    return parse_config({
        "kiosk": {"store_id": "s1", "kiosk_id": "k1"},
        "camera": {"source": str(video)},
        "model": {"kind": "fake", "fake_dim": 64, "pipeline": pipeline},
        "snapshots": snaps,
        "broker": {"transport": "none"},
        "screen": {"port": 0},
        "outbox": {"path": "outbox.sqlite"},
        "health": {"interval_s": 0.2},
    }, base_dir=tmp_path)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, Path, list[np.ndarray], Ed25519PrivateKey]:
    items = render_items(3, seed=4)
    video = write_video(make_scene(items, seed=4), tmp_path / "clip.avi")
    key = Ed25519PrivateKey.generate()
    pub = tmp_path / "catalog.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo))
    emb = FakeEmbedder(64)
    snap = make_snapshot(tmp_path / "v1", emb.embed(items), ["a", "b", "c"], key, model_id=emb.model_id,
                         threshold=0.3, thumbs=items)
    return video, pub, snap, items, key


@pytest.mark.parametrize("pipeline", ["overlap", "inline"])
def test_kiosk_answers_each_item_once_and_reports(tmp_path: Path, setup: tuple, pipeline: str) -> None:  # type: ignore[type-arg]
    """The whole kiosk on a clip: one durable match event per held item, status and health published
    (both pipeline designs: search on its own thread, or inline on the detect thread)."""
    video, pub, snap, _, _ = setup
    transport = InMemoryTransport()
    app = KioskApp(_config(tmp_path, video, pub, snap, pipeline), transport=transport)
    assert app.pipeline.inline is (pipeline == "inline")
    app.run(exit_at_eof=True)
    topics = Topics("s1", "k1")
    events = [decode(p, MatchEvent) for p in transport.messages(topics.match)]
    assert [e.results[0].sku for e in events] == ["a", "b", "c"]
    assert [e.seq for e in events] == [1, 2, 3]
    assert all(e.matched and e.snapshot == 1 and e.model == app.model_id and e.boot_id == app.boot_id
               for e in events)
    assert all(e.results[0].thumbnail == "thumbs/a.jpg" for e in events[:1])
    assert set(events[0].latency_ms) == {"capture", "detect", "embed", "search", "total"}
    states = [decode(p, Status).state for p in transport.messages(topics.status)]
    assert KioskState.ONLINE in states and states[-1] is KioskState.OFFLINE
    health = [decode(p, Health) for p in transport.messages(topics.health)]
    assert health and health[-1].snapshot == 1
    assert app.pipeline.counters.frames_processed == app.grab.frames_in
    assert app.grab.frames_dropped == 0


def test_the_screen_is_told_when_the_item_was_held_still(tmp_path: Path, setup: tuple) -> None:  # type: ignore[type-arg]
    """The answer on the screen must carry held_ms (the capture of the item's first steady frame, epoch ms)
    before answered_ms: the page's paint entries are measured from it (bench/paint.py)."""
    video, pub, snap, _, _ = setup
    app = KioskApp(_config(tmp_path, video, pub, snap), transport=InMemoryTransport())
    started_ms = time.time() * 1000.0
    app.run(exit_at_eof=True)
    assert app.screen is not None
    r = app.screen.state()["result"]
    assert r is not None and r["results"][0]["sku"] == "c"
    assert started_ms < r["held_ms"] < r["answered_ms"] <= time.time() * 1000.0


def test_without_snapshot_the_kiosk_is_degraded_and_keeps_running(tmp_path: Path, setup: tuple) -> None:  # type: ignore[type-arg]
    video, pub, _, _, _ = setup
    transport = InMemoryTransport()
    app = KioskApp(_config(tmp_path, video, pub, None), transport=transport)
    app.run(exit_at_eof=True)
    topics = Topics("s1", "k1")
    statuses = [decode(p, Status) for p in transport.messages(topics.status)]
    assert any(s.state is KioskState.DEGRADED and s.reason == "no snapshot" for s in statuses)
    assert transport.messages(topics.match) == []
    assert app.pipeline.counters.no_snapshot == 3


def test_forged_initial_snapshot_is_refused_with_an_alert(tmp_path: Path, setup: tuple) -> None:  # type: ignore[type-arg]
    video, pub, _, items, _ = setup
    emb = FakeEmbedder(64)
    other_key = Ed25519PrivateKey.generate()
    forged = make_snapshot(tmp_path / "forged", emb.embed(items), ["a", "b", "c"], other_key,
                           model_id=emb.model_id)
    transport = InMemoryTransport()
    app = KioskApp(_config(tmp_path, video, pub, forged), transport=transport)
    app.run(exit_at_eof=True)
    alerts = [decode(p, Alert) for p in transport.messages(Topics("s1", "k1").alert)]
    assert any(a.kind == "snapshot_refused" and "bad_signature" in a.detail for a in alerts)


def test_update_section_is_optional_and_maps_to_updater_settings(tmp_path: Path, setup: tuple) -> None:  # type: ignore[type-arg]
    """Old configs stay valid (no updater); an [update] section builds one with its limits."""
    video, pub, snap, _, _ = setup
    assert _config(tmp_path, video, pub, snap).update is None
    raw = _config(tmp_path, video, pub, snap).model_dump(mode="json")
    raw["update"] = {"state_dir": "upd", "probation_s": 2.0, "compile_mem_mb": 512}
    cfg = parse_config(raw, base_dir=tmp_path)
    s = cfg.update  # the updater's settings are the [update] section itself
    assert s is not None and s.state_dir == tmp_path / "upd" and s.probation_s == 2.0
    assert s.compile_mem_bytes == 512 << 20
    updater = KioskApp(cfg, transport=InMemoryTransport()).updater
    assert updater is not None and updater.cfg is s


def test_a_model_switch_replaces_model_and_snapshot_together(tmp_path: Path, setup: tuple) -> None:  # type: ignore[type-arg]
    """The updater's switch is one reference swap; the snapshot sync then follows the new model, and a late
    snapshot of the old model can no longer replace the new pair's snapshot."""
    from device.sync import SnapshotCandidate, SnapshotRefused
    from device.sync.active import ActiveSnapshot
    from storelens.snapshot import verify_snapshot

    video, pub, snap, items, key = setup
    app = KioskApp(_config(tmp_path, video, pub, snap), transport=InMemoryTransport())
    app.start()
    try:
        old_pair = app.serving.current()
        old_snap = old_pair.snapshot
        assert old_snap is not None and app.serving.sync is not None
        new_emb = FakeEmbedder(64, seed=7)
        d = make_snapshot(tmp_path / "v5", new_emb.embed(items), ["a", "b", "c"], key,
                          model_id=new_emb.model_id, version=5, threshold=0.3)
        new_snap = ActiveSnapshot.load(d, verify_snapshot(d, [key.public_key()]))
        old_sync = app.serving.sync
        app.serving.switch(new_emb, new_snap)
        pair = app.serving.current()
        assert pair.model_id == app.model_id == new_emb.model_id and pair.snapshot is new_snap
        assert app.serving.sync is not old_sync and app.serving.sync.model_id == new_emb.model_id
        committed: list[str] = []
        late = SnapshotCandidate(old_snap.directory, old_snap.manifest, (old_snap.version, "x"),
                                 lambda: committed.append("late"))
        with pytest.raises(SnapshotRefused) as refused:  # a late install by the old model's sync
            app.serving.on_candidate(late)
        assert refused.value.reason == "model_mismatch" and committed == []  # refused before its commit
        assert app.serving.current() is pair
    finally:
        app.stop()


def test_an_older_snapshot_of_the_serving_model_is_refused_before_its_commit(
    tmp_path: Path, setup: tuple  # type: ignore[type-arg]
) -> None:
    """Guards: the pairing rule checked after the pointer was written (an older snapshot committed, then
    ignored by the swap: the stored pointer and what serves disagree after a restart)."""
    from device.sync import SnapshotCandidate, SnapshotRefused
    from storelens.snapshot import verify_snapshot

    video, pub, snap, items, key = setup
    app = KioskApp(_config(tmp_path, video, pub, snap), transport=InMemoryTransport())
    app.start()
    try:
        emb = FakeEmbedder(64)
        d = make_snapshot(tmp_path / "v3", emb.embed(items), ["a", "b", "c"], key, model_id=emb.model_id,
                          version=3, threshold=0.3)
        assert app.serving.sync is not None
        app.serving.sync.install(d)
        pair = app.serving.current()
        assert pair.snapshot is not None and pair.snapshot.version == 3
        committed: list[str] = []
        old = SnapshotCandidate(snap, verify_snapshot(snap, [key.public_key()]), (1, "x"),
                                lambda: committed.append("v1"))
        with pytest.raises(SnapshotRefused) as refused:
            app.serving.on_candidate(old)
        assert refused.value.reason == "version_replay" and committed == []
        assert app.serving.current() is pair
    finally:
        app.stop()


def test_first_update_rolled_back_serves_the_configured_pair(tmp_path: Path, setup: tuple) -> None:  # type: ignore[type-arg]
    """The configured model+snapshot is recorded at boot as the pair in use; a switch to the first release
    then a probation rollback must serve exactly that pair again (its own sync state), and say so."""
    from device.generations import CONFIGURED, Generation, GenerationStore, LoadedGeneration
    from device.sync.active import ActiveSnapshot
    from storelens.snapshot import verify_snapshot

    video, pub, snap, items, key = setup
    raw = _config(tmp_path, video, pub, snap).model_dump(mode="json")
    raw["update"] = {"state_dir": "upd"}
    cfg = parse_config(raw, base_dir=tmp_path)
    emb = FakeEmbedder(64)
    app = KioskApp(cfg, embedder=emb, transport=InMemoryTransport())
    app.start()
    try:
        updater = app.updater
        assert updater is not None
        p = GenerationStore(tmp_path / "upd").pointer
        assert p.current is not None and p.current.release == CONFIGURED
        assert (p.current.model_id, p.current.snapshot_version) == (emb.model_id, 1)
        new_emb = FakeEmbedder(64, seed=7)
        d = make_snapshot(tmp_path / "v5", new_emb.embed(items), ["a", "b", "c"], key,
                          model_id=new_emb.model_id, version=5, threshold=0.3)
        new_snap = ActiveSnapshot.load(d, verify_snapshot(d, [key.public_key()]))
        release = Generation("rel1", "bundles/x", "snapshots/y", new_emb.model_id, 5, 1)
        # what the worker does after the self-test:
        updater.switcher.switch(LoadedGeneration(release, new_emb, new_snap))
        assert app.model_id == new_emb.model_id and app.serving.released
        updater.switcher.rollback("rel1", "3 embedding error(s) since the switch")
        pair = app.serving.current()
        assert pair.model_id == emb.model_id and pair.snapshot is not None and pair.snapshot.version == 1
        assert not app.serving.released and app.serving.sync is not None
        sync = app.serving.sync
        entry = app.serving.store.pointer.sync["."]  # generation 0's own sync state, in the one store
        assert sync.model_id == emb.model_id and sync.store.pointer.active == entry["active"]
        assert pair.snapshot.directory == app.serving.store.snapshots / entry["active"]
        p = GenerationStore(tmp_path / "upd").pointer
        assert p.current is not None and p.current.release == CONFIGURED and p.state == "stable"
        assert (p.current.model_id, p.current.snapshot_version) == (emb.model_id, 1) and "rel1" in p.failed
    finally:
        app.stop()


def test_sync_made_at_a_model_switch_sees_the_retained_announcement(
    tmp_path: Path, setup: tuple, monkeypatch: pytest.MonkeyPatch  # type: ignore[type-arg]
) -> None:
    """The store's retained snapshot announcement reached the old model's sync before the switch; the new
    model's sync must get it at the switch, not only after the next reconnect."""
    from device.sync import SnapshotSync
    from device.sync.active import ActiveSnapshot
    from storelens.snapshot import verify_snapshot

    seen: list[tuple[object, bytes, bool]] = []
    monkeypatch.setattr(SnapshotSync, "on_announcement", lambda self, t, p, r: seen.append((self, p, r)))
    video, pub, snap, items, key = setup
    app = KioskApp(_config(tmp_path, video, pub, snap), transport=InMemoryTransport())
    app.start()
    try:
        topic = app.topics.snapshot
        app.serving.on_announcement(topic, b'{"v": 9}', True)
        assert seen == [(app.serving.sync, b'{"v": 9}', True)]
        new_emb = FakeEmbedder(64, seed=7)
        d = make_snapshot(tmp_path / "v5", new_emb.embed(items), ["a", "b", "c"], key,
                          model_id=new_emb.model_id, version=5, threshold=0.3)
        app.serving.switch(new_emb, ActiveSnapshot.load(d, verify_snapshot(d, [key.public_key()])))
        assert app.serving.sync is not None and app.serving.sync.model_id == new_emb.model_id
        assert seen[-1] == (app.serving.sync, b'{"v": 9}', True)
        app.serving.on_announcement(topic, b"", True)  # the retained announcement cleared: nothing to hand on
        app.serving.switch(FakeEmbedder(64, seed=9), app.serving.current().snapshot)  # type: ignore[arg-type]
        assert seen[-1][0] is not app.serving.sync
    finally:
        app.stop()


def test_a_replaced_model_is_closed_while_the_kiosk_runs(
    tmp_path: Path, setup: tuple, monkeypatch: pytest.MonkeyPatch  # type: ignore[type-arg]
) -> None:
    """Models replaced by updates were kept open until the kiosk stopped: one model's memory per update.
    Once a release passes probation, the running kiosk must close both the previous release's model and
    the configured model it booted with."""
    import threading

    import device.app
    from device.generations import Generation, LoadedGeneration
    from device.sync.active import ActiveSnapshot
    from storelens.snapshot import verify_snapshot

    class ClosableFake(FakeEmbedder):
        def __init__(self, dim: int, seed: int = 0) -> None:
            super().__init__(dim, seed=seed)
            self.closed = threading.Event()

        def close(self) -> None:
            self.closed.set()

    base = ClosableFake(64)
    assert base.model_id == FakeEmbedder(64).model_id  # the model the setup's snapshot was built with
    monkeypatch.setattr(device.app, "make_embedder", lambda cfg: base)
    video, pub, snap, items, key = setup
    raw = _config(tmp_path, video, pub, snap).model_dump(mode="json")
    raw["update"] = {"state_dir": "upd", "retired_close_s": 0.0}
    app = KioskApp(parse_config(raw, base_dir=tmp_path), transport=InMemoryTransport())
    app.start()
    try:
        updater = app.updater
        assert updater is not None and app.serving.configured is base
        loaded = []
        for seq, seed in ((1, 7), (2, 8)):
            emb = ClosableFake(64, seed)
            d = make_snapshot(tmp_path / f"v{4 + seq}", emb.embed(items), ["a", "b", "c"], key,
                              model_id=emb.model_id, version=4 + seq, threshold=0.3)
            s = ActiveSnapshot.load(d, verify_snapshot(d, [key.public_key()]))
            gen = Generation(f"rel{seq}", "b", "s", emb.model_id, 4 + seq, seq)
            loaded.append(LoadedGeneration(gen, emb, s))
            updater.switcher.switch(loaded[-1])  # what the worker does after the self-test
        # rel2 is good: rel1 and base retire
        updater.switcher.probation("rel2", threading.Event(), probation_s=0.0)
        first, second = (lp.embedder for lp in loaded)
        assert isinstance(first, ClosableFake) and isinstance(second, ClosableFake)
        assert first.closed.wait(10.0), "the replaced release's model was not closed while the kiosk ran"
        assert base.closed.wait(10.0), "the configured model was not closed while the kiosk ran"
        assert not second.closed.is_set() and app.model_id == second.model_id
    finally:
        app.stop()


def test_a_clean_stop_raises_no_camera_lost_alert(tmp_path: Path, setup: tuple) -> None:  # type: ignore[type-arg]
    """A deliberate stop of a streaming camera used to publish camera_lost on every clean shutdown."""
    video, pub, snap, _, _ = setup
    cfg = _config(tmp_path, video, pub, snap)
    cfg = cfg.model_copy(update={"camera": cfg.camera.model_copy(update={"loop": True})})
    transport = InMemoryTransport()
    app = KioskApp(cfg, transport=transport)
    app.run(max_seconds=1.5)
    assert app.grab.frames_in > 0
    alerts = [decode(p, Alert) for p in transport.messages(Topics("s1", "k1").alert)]
    assert [a.kind for a in alerts if a.kind in ("camera_lost", "camera_back")] == []

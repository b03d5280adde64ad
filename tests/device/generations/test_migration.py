"""A kiosk upgraded in the field boots on the state dir its old code wrote and serves exactly what it
served: the same model and the same (applied delta) snapshot, its chain re-verified, replays refused."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device.app import KioskApp
from device.comms import InMemoryTransport
from device.config import parse_config
from device.generations import GenerationStore
from device.generations.store import SyncSlot
from device.sync import SnapshotStore
from device.sync.active import ActiveSnapshot
from storelens.delta import apply_delta
from storelens.protocol import Alert, Topics, decode
from storelens.snapshot import read_manifest_unverified
from tests.device.generations.legacy import write_sync_state, write_update_pointer
from tests.device.sync.deltabuild import Chain, announce, archive, build_chain

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    return build_chain(tmp_path_factory.mktemp("chain"), Ed25519PrivateKey.generate())


def _raw(tmp_path: Path, chain: Chain, *, update: bool) -> dict[str, Any]:
    pub = tmp_path / "pub.pem"
    pub.write_bytes(chain.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    raw: dict[str, Any] = {
        "kiosk": {"store_id": "s1", "kiosk_id": "k1"},
        "camera": {"source": "synthetic", "loop": True},
        "model": {"kind": "fake", "fake_dim": chain.model_dim},
        "snapshots": {"state_dir": str(tmp_path / "state"), "public_keys": [str(pub)],
                      "initial": str(chain.v1), "subscribe": False},
        "sync": {"sources": [tmp_path.as_uri() + "/", chain.v1.parent.as_uri() + "/"]},
        "broker": {"transport": "none"},
        "screen": {"enabled": False},
        "outbox": {"path": str(tmp_path / "outbox.sqlite")},
    }
    if update:
        raw["update"] = {"state_dir": str(tmp_path / "update")}
    return raw


def _alerts(transport: InMemoryTransport) -> list[Alert]:
    return [decode(p, Alert) for p in transport.messages(Topics("s1", "k1").alert)]


@pytest.mark.parametrize("update", [True, False], ids=["with-updater", "sync-only"])
def test_a_kiosk_upgraded_in_the_field_keeps_serving_what_it_served(
    tmp_path: Path, chain: Chain, update: bool
) -> None:
    """Guards: an upgrade that ignores the old layout (serving the initial v1 again, or nothing), loses the
    applied delta, or forgets highest_seen (an older snapshot accepted after the upgrade)."""
    raw = _raw(tmp_path, chain, update=update)
    write_sync_state(tmp_path / "state", chain.v1, chain.d2)
    if update:
        write_update_pointer(tmp_path / "update", chain.model_id, 2)
    expected = tmp_path / "expected"
    apply_delta(chain.v1, chain.d2, expected)
    for boot in range(2):  # the first boot migrates; the second reads what the first wrote
        transport = InMemoryTransport()
        app = KioskApp(parse_config(raw, base_dir=tmp_path), transport=transport)
        app.start()
        try:
            pair = app.serving.current()
            assert pair.model_id == chain.model_id
            assert pair.snapshot is not None and pair.snapshot.version == 2, f"boot {boot}"
            assert pair.snapshot.items() == _items(expected, pair.snapshot.directory)
            pair.snapshot.check_canaries()
            replay = archive(chain.other1, tmp_path / f"other1-{boot}.tar")
            app.serving.on_announcement(app.topics.snapshot, announce(chain.other1, replay), True)
            assert app.serving.sync is not None and app.serving.sync.idle.wait(30)
            assert app.serving.current().snapshot.version == 2  # type: ignore[union-attr]
        finally:
            app.stop()
        assert any(a.kind == "snapshot_refused" and "version_replay" in a.detail for a in _alerts(transport))
        if update:  # one pointer: the sync's own file migrated into the generation pointer
            assert not (tmp_path / "state" / "active.json").exists()
            entry = GenerationStore(tmp_path / "update").pointer.sync["."]
            assert entry["active"].startswith("v2-") and entry["highest_seen"][0] == 2


def test_a_tampered_applied_generation_in_the_old_layout_falls_back_to_its_base(
    tmp_path: Path, chain: Chain
) -> None:
    """Guards: a migration that trusts the old applied directory without re-deriving its proof chain."""
    raw = _raw(tmp_path, chain, update=True)
    active, _ = write_sync_state(tmp_path / "state", chain.v1, chain.d2)
    write_update_pointer(tmp_path / "update", chain.model_id, 2)
    items = tmp_path / "state" / "snapshots" / active / "items.jsonl"
    items.write_text(items.read_text().replace("9.99", "0.01"))
    transport = InMemoryTransport()
    app = KioskApp(parse_config(raw, base_dir=tmp_path), transport=transport)
    app.start()
    try:
        snap = app.serving.current().snapshot
        assert snap is not None and snap.version == 1
    finally:
        app.stop()
    assert any(a.kind == "snapshot_refused" and "applied_mismatch" in a.detail for a in _alerts(transport))


def _items(expected: Path, served: Path) -> dict[str, Any]:
    """The expected snapshot's items as the served one names them (thumbnails under its own directory)."""
    snap = ActiveSnapshot.load(expected, read_manifest_unverified(expected))
    return {sku: _rebase(item, expected, served) for sku, item in snap.items().items()}


def _rebase(item: Any, old: Path, new: Path) -> Any:
    thumb = item.thumbnail
    return replace(item, thumbnail=None if thumb is None else new / thumb.relative_to(old))


def test_a_migration_cut_before_the_old_pointer_was_removed_keeps_the_migrated_one(
    tmp_path: Path, chain: Chain
) -> None:
    """Guards: a power cut between writing the generation pointer's sync entry and removing the old
    ``active.json``: the next boot must take the migrated entry (it may be newer) and drop the old file."""
    state = tmp_path / "state"
    active, previous = write_sync_state(state, chain.v1, chain.d2)
    gens = GenerationStore(tmp_path / "update")
    old = (state / "active.json").read_text()
    first = SnapshotStore(state, SyncSlot(gens, "."))
    assert first.pointer.active == active and first.pointer.previous == previous
    assert not (state / "active.json").exists()
    (state / "active.json").write_text(old.replace(active, "v9-000000000000"))  # the cut: file still there
    again = SnapshotStore(state, SyncSlot(GenerationStore(tmp_path / "update"), "."))
    assert again.pointer.active == active and again.highest_seen == first.highest_seen
    assert not (state / "active.json").exists()
    assert sorted(p.name for p in (state / "snapshots").iterdir()) == sorted([active, previous or ""])

"""The old sync layout moved into the one generation store: every kiosk ends with one pointer
(``current.json``) and its synced snapshots in the store's snapshots/, and a power cut at any step of the
migration leaves a state the next boot completes and serves from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device.app import KioskApp
from device.comms import InMemoryTransport
from device.config import parse_config
from device.generations import Generation, GenerationStore, Pointer, layout
from device.generations.store import SyncSlot
from device.sync import SnapshotStore
from tests.device.generations.legacy import write_sync_state, write_update_pointer
from tests.device.generations.test_migration import _raw
from tests.device.sync.deltabuild import Chain, build_chain

pytestmark = [pytest.mark.integration]


class _Cut(Exception):
    """The power cut: nothing after it runs."""


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    return build_chain(tmp_path_factory.mktemp("chain"), Ed25519PrivateKey.generate())


def _store_root(tmp_path: Path, update: bool) -> Path:
    return tmp_path / ("update" if update else "state")


def _serves_v2(tmp_path: Path, raw: dict[str, Any], chain: Chain, update: bool) -> None:
    app = KioskApp(parse_config(raw, base_dir=tmp_path), transport=InMemoryTransport())
    app.start()
    try:
        pair = app.serving.current()
        assert pair.model_id == chain.model_id
        assert pair.snapshot is not None and pair.snapshot.version == 2
        store = app.serving.store
        assert store.root == _store_root(tmp_path, update)
        assert pair.snapshot.directory.parent == store.snapshots  # served from the one store
    finally:
        app.stop()


@pytest.mark.parametrize("update", [True, False], ids=["with-updater", "sync-only"])
def test_every_kiosk_keeps_one_pointer_and_its_snapshots_in_the_one_store(
    tmp_path: Path, chain: Chain, update: bool
) -> None:
    """Guards: a kiosk without [update] keeping its own ``active.json``; synced snapshots left in
    ``[snapshots] state_dir`` beside the generation store (two places saying what serves)."""
    raw = _raw(tmp_path, chain, update=update)
    active, previous = write_sync_state(tmp_path / "state", chain.v1, chain.d2)
    if update:
        write_update_pointer(tmp_path / "update", chain.model_id, 2)
    _serves_v2(tmp_path, raw, chain, update)
    root = _store_root(tmp_path, update)
    assert not (tmp_path / "state" / "active.json").exists()
    assert (root / "current.json").exists()
    entry = GenerationStore(root).pointer.sync["."]
    assert (entry["active"], entry["previous"]) == (active, previous)
    assert sorted(p.name for p in (root / "snapshots").iterdir()) == sorted([active, previous or ""])
    if update:  # nothing of the sync left in the old folder
        assert sorted(p.name for p in (tmp_path / "state").iterdir()) == []
    assert not (root / "downloads").exists() and not (root / "active.json").exists()


# (update, where the power cut falls)
CUTS = [
    (True, "after-entry"),  # the old pointer copied into current.json, no folder moved yet
    (True, "after-one-move"),  # one of the two snapshot folders moved
    (True, "before-removal"),  # every folder moved, the old pointer file still there
    (False, "before-removal"),  # sync-only: current.json written, active.json still there
]


@pytest.mark.parametrize(("update", "cut"), CUTS)
def test_a_migration_cut_at_any_step_boots_on_what_it_served(
    tmp_path: Path, chain: Chain, monkeypatch: pytest.MonkeyPatch, update: bool, cut: str
) -> None:
    """Guards: a migration step order where a power cut loses the applied snapshot (a folder removed
    before the entry naming it was written, or a half-moved folder), or serves the initial v1 again."""
    raw = _raw(tmp_path, chain, update=update)
    active, previous = write_sync_state(tmp_path / "state", chain.v1, chain.d2)
    if update:
        write_update_pointer(tmp_path / "update", chain.model_id, 2)
    real_move = layout._move
    moves: list[str] = []

    def move(store: GenerationStore, d: Path) -> int:
        if cut == "after-entry" or (cut == "after-one-move" and moves):
            raise _Cut
        moves.append(d.name)
        return real_move(store, d)

    def remove_old(*_: Any) -> None:
        raise _Cut

    with monkeypatch.context() as m:
        m.setattr(layout, "_move", move)
        if cut == "before-removal":
            m.setattr(layout, "_remove_old", remove_old)
        with pytest.raises(_Cut):
            layout.open_store(_store_root(tmp_path, update), tmp_path / "state")
    root = _store_root(tmp_path, update)
    assert GenerationStore(root).pointer.sync["."]["active"] == active  # the entry was written first
    if cut == "before-removal":
        assert (tmp_path / "state" / "active.json").exists()
    _serves_v2(tmp_path, raw, chain, update)  # the next boot completes the migration and serves v2
    assert not (tmp_path / "state" / "active.json").exists()
    assert sorted(p.name for p in (root / "snapshots").iterdir()) == sorted([active, previous or ""])
    entry = GenerationStore(root).pointer.sync["."]
    assert entry["active"] == active and entry["highest_seen"][0] == 2


def test_the_shared_snapshots_folder_loses_only_what_nothing_names(tmp_path: Path) -> None:
    """Guards: one owner's sweep of the shared snapshots/ deleting another's (a sync's cleanup removing a
    release's snapshot, the updater's cleanup removing a sync's entry or its placed, uncommitted one)."""
    store = GenerationStore(tmp_path / "g")
    for name in ("v1-a", "v2-b", "v3-c", "v4-d", "v5-e"):
        (store.snapshots / name).mkdir()
    store.write(Pointer(current=Generation("rel1", "bundles/x", "snapshots/v5-e", "m" * 64, 5, 1)))
    store.write_sync(".", {"active": "v2-b", "previous": "v1-a", "highest_seen": [2, "b"]})
    store.hold("snapshots/v3-c", True)  # a sync's candidate between place and commit
    store.cleanup()
    assert sorted(p.name for p in store.snapshots.iterdir()) == ["v1-a", "v2-b", "v3-c", "v5-e"]
    store.hold("snapshots/v3-c", False)
    store.cleanup()
    assert sorted(p.name for p in store.snapshots.iterdir()) == ["v1-a", "v2-b", "v5-e"]

    slot = SyncSlot(store, "models/mmmm")
    sync = SnapshotStore(tmp_path / "work", slot, shared=slot)
    staged = tmp_path / "staged"
    staged.mkdir()
    sync.place(staged, "v5-e")  # the release's own snapshot, synced by its model's sync too
    sync.discard("v5-e")  # refused by the switch: the release still names it
    sync.prune()
    assert sorted(p.name for p in store.snapshots.iterdir()) == ["v1-a", "v2-b", "v5-e"]
    (store.snapshots / "v6-f").mkdir()
    sync.activate("v6-f", 6, "f" * 64)
    sync.prune()  # its own old names only: generation 0's sync entry and the release are not its own
    assert sorted(p.name for p in store.snapshots.iterdir()) == ["v1-a", "v2-b", "v5-e", "v6-f"]
    assert store.pointer.sync["models/mmmm"]["active"] == "v6-f"

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
from device.generations import GenerationStore, layout
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

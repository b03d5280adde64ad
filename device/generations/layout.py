"""Opening the kiosk's one generation store, with a snapshot-sync state dir laid out the old way moved in.

The old layout (before the one store): each sync kept its own folder with its own pointer file,

    <[snapshots] state_dir>/active.json, snapshots/v<N>-<sha12>/, staging/, downloads/
    <[snapshots] state_dir>/models/<model_id[:16]>/   the same, per released model's sync

Now every sync's pointer is its entry of ``current.json`` ("." for generation 0's sync, ``models/<id16>``
for a released model's) and every snapshot lives in the store's snapshots/. The migration runs whole at
each boot before anything reads the store, in an order a power cut cannot break: (1) each old pointer file
copied into its entry (an entry already there is newer and kept), (2) each snapshot folder moved with one
rename (it is in the old place or the new one, never half; across file systems: copied into staging, then
renamed in, then the old one removed), (3) the old pointer files and emptied folders removed. A cut
anywhere leaves what the next boot's run completes; nothing is removed before the entry naming it is
written. An unreadable old pointer file is left where it is, with its folder (never guess).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

from device.generations.store import GenerationStore
from storelens.fsutil import fsync_dir, read_capped

_LOGGER = logging.getLogger(__name__)

OLD_POINTER = "active.json"
CONFIGURED_KEY = "."  # generation 0's sync: its entry in the generation pointer


def sync_key(model_id: str, *, configured: bool) -> str:
    """The entry of a model's snapshot sync in the generation pointer (a snapshot serves one model only)."""
    return CONFIGURED_KEY if configured else f"models/{model_id[:16]}"


def sync_work_dir(store: GenerationStore, key: str) -> Path:
    """A sync's own staging/ and downloads/ (its snapshots are the store's)."""
    return store.root / "sync" / ("configured" if key == CONFIGURED_KEY else key.replace("/", "-"))


def open_store(root: Path, legacy: Path | None = None) -> GenerationStore:
    """The kiosk's one generation store at ``root``; ``legacy`` (``[snapshots] state_dir``) migrated in."""
    store = GenerationStore(root)
    if legacy is not None:
        migrate(store, Path(legacy))
    return store


def migrate(store: GenerationStore, legacy: Path) -> int:
    """Move old-layout sync folders under ``legacy`` into ``store`` (idempotent); how many moved."""
    folders = _old_folders(legacy)
    readable = [(key, folder) for key, folder in folders if _pointer_in(store, key, folder)]
    moved = 0
    for _, folder in readable:
        src = folder / "snapshots"
        if src.is_dir() and not _same(src, store.snapshots):
            for d in sorted(src.iterdir()):
                moved += _move(store, d)
    _remove_old(store, legacy, readable)
    if moved:
        _LOGGER.info("moved %d snapshot folders from %s into %s", moved, legacy, store.snapshots)
    return moved


def _remove_old(store: GenerationStore, legacy: Path, folders: list[tuple[str, Path]]) -> None:
    """Step 3: the old pointer files (all in their entries now), then the emptied folders."""
    for key, folder in folders:
        old = folder / OLD_POINTER
        if old.exists():
            old.unlink()
            fsync_dir(folder)
            _LOGGER.info("snapshot pointer %s migrated into the generation pointer (%s)", old, key)
        for junk in ("staging", "downloads"):
            if not _same(folder / junk, store.staging):
                shutil.rmtree(folder / junk, ignore_errors=True)
        if not _same(folder / "snapshots", store.snapshots):
            _rmdir(folder / "snapshots")
        if key != CONFIGURED_KEY and not _same(folder, store.root):
            _rmdir(folder)
    _rmdir(legacy / "models")


def _old_folders(legacy: Path) -> list[tuple[str, Path]]:
    folders = [(CONFIGURED_KEY, legacy)] if legacy.is_dir() else []
    models = legacy / "models"
    if models.is_dir():
        folders += [(f"models/{d.name}", d) for d in sorted(models.iterdir()) if d.is_dir()]
    return folders


def _pointer_in(store: GenerationStore, key: str, folder: Path) -> bool:
    """Step 1 for one folder: its old pointer file into its entry. False: unreadable, leave it alone."""
    old = folder / OLD_POINTER
    if not old.exists() or key in store.pointer.sync:
        return True
    try:
        raw = json.loads(read_capped(old, 64 * 1024))
        if not isinstance(raw, dict):
            raise TypeError("not an object")
    except (OSError, ValueError, TypeError) as exc:
        _LOGGER.error("old snapshot pointer %s unreadable (%s): left where it is", old, exc)
        return False
    store.write_sync(key, raw)
    return True


def _move(store: GenerationStore, d: Path) -> int:
    """One snapshot folder into the store's snapshots/ with one rename (copy first across file systems)."""
    if d.name.startswith(".") or not d.is_dir():  # a partial rename target of the old code: junk
        shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
        return 0
    dest = store.snapshots / d.name
    if dest.exists():  # moved before a power cut, or the same snapshot (same name: same signed manifest)
        shutil.rmtree(d, ignore_errors=True)
        return 0
    try:
        os.rename(d, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        staged = store.new_staging(f"migrate-{d.name}")
        shutil.rmtree(staged)
        shutil.copytree(d, staged, symlinks=True)
        fsync_dir(staged)
        staged.rename(dest)
        fsync_dir(store.snapshots)
        shutil.rmtree(d, ignore_errors=True)
        return 1
    fsync_dir(store.snapshots)
    fsync_dir(d.parent)
    return 1


def _same(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _rmdir(d: Path) -> None:
    try:
        d.rmdir()
    except OSError:
        pass  # absent, or not empty (something this migration does not know: kept)

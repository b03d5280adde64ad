"""On-disk snapshot generations and the active pointer (atomically replaced), crash-safe.

root/snapshots/v<version>-<sha12>/   verified snapshot directories (never modified once in place)
root/active.json                     {"active": name, "previous": name|null, "highest_seen": [v, sha]}
root/staging/                        unpack/verify area; anything left here after a crash is junk
root/downloads/                      partial downloads; likewise junk after a crash

On a kiosk the pointer is not ``active.json`` but this sync's entry in the one generation pointer (a
``PointerSlot``), and the snapshots live in the generation store's snapshots/ folder (``SharedSnapshots``,
shared with the other syncs and the released generations: only what no one names is removed); ``root``
then holds only staging/ and downloads/. A folder still holding ``active.json`` (the layout before) is
migrated into the slot at start: slot written first, then the file removed, so a power cut in between
finds the slot (the file is then removed again).
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from storelens.fsutil import atomic_write_json, clean_stale_temps, fsync_dir, read_capped

_LOGGER = logging.getLogger(__name__)

POINTER = "active.json"


@dataclass(frozen=True, slots=True)
class Pointer:
    active: str | None = None
    previous: str | None = None
    highest_seen: tuple[int, str] | None = None  # (version, manifest sha256): replay protection


class PointerSlot(Protocol):
    """Where the pointer is kept when not in ``active.json``: one entry of a larger atomic pointer."""

    def read(self) -> dict[str, Any] | None: ...

    def write(self, entry: dict[str, Any]) -> None: ...


class SharedSnapshots(Protocol):
    """A snapshots folder shared with others (the generation store's): what is in use is not this store's
    alone to remove, and a placed, uncommitted snapshot is held against the others' cleanups."""

    directory: Path

    def in_use(self, name: str) -> bool: ...

    def hold(self, name: str, held: bool) -> None: ...


class SnapshotStore:
    """Owns ``root``: where generations live, which one is active, and the highest version ever accepted."""

    def __init__(
        self, root: Path, slot: PointerSlot | None = None, *, shared: SharedSnapshots | None = None
    ) -> None:
        self.root = Path(root)
        self._slot = slot
        self._shared = shared
        self.snapshots = shared.directory if shared is not None else self.root / "snapshots"
        self.staging = self.root / "staging"
        self.downloads = self.root / "downloads"
        self._lock = threading.Lock()
        self._pointer_ok = True
        for d in (self.snapshots, self.staging, self.downloads):
            d.mkdir(parents=True, exist_ok=True)
        self._pointer = self._read_pointer()
        # the generations this store may remove once unnamed (a shared folder: only those it knew)
        self._known = {n for n in (self._pointer.active, self._pointer.previous) if n is not None}
        self.cleanup()

    @staticmethod
    def dir_name(version: int, manifest_sha256: str) -> str:
        return f"v{version}-{manifest_sha256[:12]}"

    @property
    def pointer(self) -> Pointer:
        return self._pointer

    @property
    def highest_seen(self) -> tuple[int, str] | None:
        return self._pointer.highest_seen

    def path(self, name: str) -> Path:
        return self.snapshots / name

    def activate(self, name: str, version: int, manifest_sha256: str) -> Pointer:
        """Point at ``name`` (the old active becomes previous) and raise highest_seen; one atomic write."""
        with self._lock:
            old = self._pointer
            seen = old.highest_seen
            if seen is None or version > seen[0]:
                seen = (version, manifest_sha256)
            previous = old.active if old.active != name else old.previous
            new = Pointer(active=name, previous=previous, highest_seen=seen)
            self._write_locked(new)
        if self._shared is not None:
            self._shared.hold(name, False)  # named by the pointer now
        return new

    def rollback(self) -> Pointer:
        """Make the previous generation active again (highest_seen unchanged); ValueError if none."""
        with self._lock:
            old = self._pointer
            if old.previous is None or not self.path(old.previous).is_dir():
                raise ValueError("no previous snapshot to roll back to")
            new = Pointer(active=old.previous, previous=None, highest_seen=old.highest_seen)
            self._write_locked(new)
        _LOGGER.warning("snapshot pointer rolled back from %s to %s", old.active, new.active)
        return new

    def new_staging_dir(self, label: str) -> Path:
        """A fresh, non-existent path under staging/ for one install attempt."""
        n = 0
        while (p := self.staging / f"{label}-{n}").exists():
            n += 1
        return p

    def place(self, staged: Path, name: str) -> Path:
        """Move a verified staging dir into snapshots/ (an identical existing generation is kept); held
        in a shared folder until ``activate`` or ``discard``."""
        self._known.add(name)
        if self._shared is not None:
            self._shared.hold(name, True)
        dest = self.path(name)
        if dest.exists():
            shutil.rmtree(staged, ignore_errors=True)
            return dest
        staged.rename(dest)
        fsync_dir(self.snapshots)
        return dest

    def discard(self, name: str) -> None:
        """Delete a generation that is neither active nor previous."""
        with self._lock:
            if name in (self._pointer.active, self._pointer.previous):
                return
        if self._shared is not None:
            self._shared.hold(name, False)
            if self._shared.in_use(name):  # another sync's, or a generation's
                return
        self._known.discard(name)
        shutil.rmtree(self.path(name), ignore_errors=True)

    def prune(self) -> None:
        """Delete the generations this store no longer names (in a shared folder: only its own)."""
        names = list(self._known) if self._shared is not None else [p.name for p in self.snapshots.iterdir()]
        for name in names:
            self.discard(name)

    def cleanup(self) -> int:
        """Remove staging/downloads leftovers, temp files, and generations the pointer does not name."""
        removed = clean_stale_temps(self.root)
        keep = {self._pointer.active, self._pointer.previous}
        for area in (self.staging, self.downloads):
            for p in area.iterdir():
                _remove(p)
                removed += 1
        for p in self.snapshots.iterdir() if self._shared is None else ():  # shared: the owner's cleanup
            if self._pointer_ok and p.name not in keep:  # unreadable pointer: delete no generation
                _remove(p)
                removed += 1
        if removed:
            _LOGGER.info(
                "snapshot store: removed %d leftovers of interrupted or superseded installs", removed
            )
        return removed

    def _read_pointer(self) -> Pointer:
        path = self.root / POINTER
        try:
            raw = self._slot.read() if self._slot is not None else None
            if raw is None:
                if not path.exists():
                    return Pointer()
                raw = json.loads(read_capped(path, 64 * 1024))
            seen = raw.get("highest_seen")
            pointer = Pointer(
                active=_name(raw.get("active")),
                previous=_name(raw.get("previous")),
                highest_seen=(int(seen[0]), str(seen[1])) if seen else None,
            )
            if self._slot is not None and path.exists():
                self._migrate(raw, path)
            return pointer
        except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
            _LOGGER.exception("snapshot pointer %s unreadable; starting without an active snapshot", path)
            self._pointer_ok = False
            return Pointer()

    def _migrate(self, raw: dict[str, Any], path: Path) -> None:
        """The old layout's own pointer file into the slot (slot first, then the file removed)."""
        assert self._slot is not None
        if self._slot.read() is None:
            self._slot.write(raw)
            _LOGGER.info("snapshot pointer %s migrated into the generation pointer", path)
        path.unlink()
        fsync_dir(self.root)

    def _write_locked(self, new: Pointer) -> None:
        raw = {
            "active": new.active,
            "previous": new.previous,
            "highest_seen": list(new.highest_seen) if new.highest_seen else None,
        }
        if self._slot is not None:
            self._slot.write(raw)
        else:
            atomic_write_json(self.root / POINTER, raw)
        self._pointer = new


def _name(v: object) -> str | None:
    if v is None:
        return None
    s = str(v)
    if "/" in s or s.startswith(".") or not s:
        raise ValueError(f"bad snapshot name {s!r}")
    return s


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)

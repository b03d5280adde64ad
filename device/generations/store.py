"""The generation store: what the kiosk serves, what it falls back to, and one pointer naming both.

A generation is an immutable (model bundle, snapshot) pair, verified before it is placed. Generation 0 is
the configured bundle and the snapshot its sync keeps (``CONFIGURED``: the app opens it, so its paths are
empty). The pointer is the commit point of every switch and rollback, replaced atomically (temp, fsync,
rename, fsync dir), so a restart at any instant finds the old generation or the new one, never a mix:

root/current.json     {"current": Generation, "previous": Generation|null (the last good one),
                       "state": "stable"|"probation", "probation_boots": n, "highest_sequence": n,
                       "failed": [release ids], "sync": {sync folder: {"active", "previous",
                       "highest_seen"}} (each model's snapshot sync: its snapshots, replay protection)}
root/bundles/<id16>/  verified bundles (never modified once placed)
root/snapshots/v<v>-<sha12>/  verified snapshot directories: the generations' and every sync's
root/staging/         downloads and unpacking; junk after a crash, removed at start
root/sync/<key>/      each snapshot sync's own staging/ and downloads/ (junk after a crash)

One store per kiosk (``[update] state_dir``, else ``[snapshots] state_dir``). Snapshots named by neither
generation nor any sync entry (nor held by a sync between placing and committing one) are removed at
start and after each switch. A snapshot-only switch commits by rewriting its sync's entry in this same
file (``write_sync``); a state dir laid out the old way is migrated in at boot (``layout.py``).
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from storelens.fsutil import atomic_write_json, clean_stale_temps, fsync_dir, read_capped

_LOGGER = logging.getLogger(__name__)

POINTER = "current.json"
# The release id of the kiosk's configured model+snapshot (not a valid release id, so never a release's):
# recorded at boot as the first pair, so the very first update has a last known good to roll back to.
# Its bundle and snapshot live outside the store (the app owns and opens them): both paths are empty.
CONFIGURED = "(configured)"
MAX_FAILED_KEPT = 32  # release ids remembered as failed (a retained desired is not retried per reconnect)
State = Literal["stable", "probation"]


class PointerError(Exception):
    """The pointer file is unreadable; the kiosk must be re-provisioned (never guess a generation)."""


@dataclass(frozen=True, slots=True)
class Generation:
    """A model bundle and the snapshot built by it, as directories relative to the root."""

    release: str
    bundle: str
    snapshot: str
    model_id: str
    snapshot_version: int
    sequence: int = 0

    @property
    def configured(self) -> bool:
        """The kiosk's configured bundle and snapshot (opened by the app, never by the updater)."""
        return self.release == CONFIGURED


def generation_zero(model_id: str, snapshot_version: int) -> Generation:
    """The generation naming the kiosk's configured bundle and the snapshot its sync serves."""
    return Generation(CONFIGURED, "", "", model_id, snapshot_version)


@dataclass(frozen=True, slots=True)
class Pointer:
    current: Generation | None = None
    previous: Generation | None = None
    state: State = "stable"
    probation_boots: int = 0
    highest_sequence: int = 0
    failed: tuple[str, ...] = field(default_factory=tuple)
    sync: dict[str, dict[str, Any]] = field(default_factory=dict)  # snapshot pointers, by sync folder


class GenerationStore:
    """Owns ``root``: the generations on disk and the one pointer naming the active one and the last good."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.bundles = self.root / "bundles"
        self.snapshots = self.root / "snapshots"
        self.staging = self.root / "staging"
        for d in (self.bundles, self.snapshots, self.staging):
            d.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(self.root)  # a pointer write cut before its rename
        self._lock = threading.Lock()
        self._pointer = self._read()
        self._held: set[str] = set()  # placed by a sync, not committed yet: never cleaned up meanwhile

    @property
    def pointer(self) -> Pointer:
        return self._pointer

    def path(self, rel: str) -> Path:
        return self.root / rel

    def write(self, new: Pointer) -> Pointer:
        """Replace the pointer atomically (the commit point of every switch and rollback); the syncs'
        entries are kept as they are now (only ``write_sync`` changes them)."""
        with self._lock:
            new = replace(new, sync=self._pointer.sync)
            atomic_write_json(self.root / POINTER, _to_json(new))
            self._pointer = new
        return new

    def write_sync(self, key: str, entry: dict[str, Any]) -> None:
        """Replace one sync's snapshot pointer in the one pointer file (a snapshot-only switch's commit)."""
        with self._lock:
            new = replace(self._pointer, sync={**self._pointer.sync, key: dict(entry)})
            atomic_write_json(self.root / POINTER, _to_json(new))
            self._pointer = new

    def boot(self, max_probation_boots: int) -> tuple[Pointer, bool]:
        """At start: count a boot in probation; past ``max_probation_boots`` roll back. (pointer, rolled)."""
        p = self._pointer
        if p.state != "probation":
            return p, False
        if p.probation_boots + 1 > max_probation_boots and p.previous is not None and p.current is not None:
            _LOGGER.error("crash loop in probation of %s: rolling back", p.current.release)
            return self.write(rollback(p)), True
        return self.write(replace(p, probation_boots=p.probation_boots + 1)), False

    def place(self, staged: Path, kind: Literal["bundles", "snapshots"], name: str) -> str:
        """Move a complete staged directory into place (idempotent); return its root-relative path."""
        dest = self.root / kind / name
        if dest.exists():
            shutil.rmtree(staged, ignore_errors=True)
        else:
            fsync_dir(staged)
            staged.rename(dest)
            fsync_dir(dest.parent)
        return f"{kind}/{name}"

    def new_staging(self, label: str) -> Path:
        d = self.staging / label
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    def hold(self, rel: str, held: bool) -> None:
        """Keep ``rel`` through cleanups while a sync's candidate is not committed (``held=False``: done)."""
        with self._lock:
            (self._held.add if held else self._held.discard)(rel)

    def in_use(self, rel: str) -> bool:
        """Whether a generation, a sync entry or a held candidate names ``rel`` (root-relative)."""
        with self._lock:
            return rel in self._keep()

    def cleanup(self) -> int:
        """Remove staging leftovers and what neither a generation, a sync entry nor a hold names."""
        removed = 0
        for kind in (self.bundles, self.snapshots, self.staging):
            for child in list(kind.iterdir()):
                with self._lock:  # checked and removed as one: a sync may hold and place one meanwhile
                    if kind is not self.staging and f"{kind.name}/{child.name}" in self._keep():
                        continue
                    shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()
                removed += 1
        return removed

    def _keep(self) -> set[str]:
        keep = set(self._held)
        for pair in (self._pointer.current, self._pointer.previous):
            if pair is not None and not pair.configured:
                keep.update((pair.bundle, pair.snapshot))
        for entry in self._pointer.sync.values():
            keep.update(f"snapshots/{n}" for n in (entry.get("active"), entry.get("previous")) if n)
        return keep

    def _read(self) -> Pointer:
        path = self.root / POINTER
        if not path.exists():
            return Pointer()
        try:
            raw = json.loads(read_capped(path, 1 << 20))
            return _from_json(raw)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PointerError(f"{path} is unreadable: {exc}") from exc


class SyncSlot:
    """One snapshot sync's place in the store: its pointer as an entry of the generation pointer (a
    ``PointerSlot``) and its snapshots in the store's snapshots/ (``SharedSnapshots``)."""

    def __init__(self, store: GenerationStore, key: str) -> None:
        self._store = store
        self._key = key
        self.directory = store.snapshots

    def read(self) -> dict[str, Any] | None:
        return self._store.pointer.sync.get(self._key)

    def write(self, entry: dict[str, Any]) -> None:
        self._store.write_sync(self._key, entry)

    def in_use(self, name: str) -> bool:
        return self._store.in_use(f"snapshots/{name}")

    def hold(self, name: str, held: bool) -> None:
        self._store.hold(f"snapshots/{name}", held)


def rollback(p: Pointer) -> Pointer:
    """The pointer after abandoning ``current`` for ``previous`` (current's release marked failed)."""
    assert p.current is not None and p.previous is not None
    return replace(
        p,
        current=p.previous,
        previous=None,
        state="stable",
        probation_boots=0,
        failed=mark_failed(p.failed, p.current.release),
    )


def mark_failed(failed: tuple[str, ...], release: str) -> tuple[str, ...]:
    return (*tuple(r for r in failed if r != release), release)[-MAX_FAILED_KEPT:]


def _to_json(p: Pointer) -> dict[str, Any]:
    d = asdict(p)
    d["failed"] = list(p.failed)
    return d


def _generation(raw: Any) -> Generation | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise TypeError("pair is not an object")
    pair = Generation(**raw)
    if pair.configured and pair.bundle == pair.snapshot == "":
        return pair
    for rel in (pair.bundle, pair.snapshot):
        parts = Path(rel).parts
        if len(parts) != 2 or parts[0] not in ("bundles", "snapshots") or ".." in parts:
            raise ValueError(f"pair path {rel!r} outside the store")
    return pair


def _from_json(raw: Any) -> Pointer:
    if not isinstance(raw, dict):
        raise TypeError("pointer is not an object")
    state = raw.get("state", "stable")
    if state not in ("stable", "probation"):
        raise ValueError(f"bad state {state!r}")
    return Pointer(
        current=_generation(raw.get("current")),
        previous=_generation(raw.get("previous")),
        state=state,
        probation_boots=int(raw.get("probation_boots", 0)),
        highest_sequence=int(raw.get("highest_sequence", 0)),
        failed=tuple(str(r) for r in raw.get("failed", [])),
        sync=_sync_entries(raw.get("sync", {})),
    )


def _sync_entries(raw: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise TypeError("sync is not an object of objects")
    return {str(k): dict(v) for k, v in raw.items()}

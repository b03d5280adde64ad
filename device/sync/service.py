"""SnapshotSync: announcement -> download -> verify -> candidate, handed to the switch it is given.

Sync only produces candidates (``device/sync/candidate.py``); the switch (the switcher's snapshot-only
switch) loads the new index, runs its canaries, commits the pointer and swaps it in. Runs on its own worker
thread; the MQTT callback only hands the payload over (latest wins). Every failure is reported through
``on_refused(reason, detail)``; the active snapshot keeps serving.

A delta is installed only onto the active snapshot it chains to (base version and manifest sha256, as its
signed manifest names them): it is applied to a private, re-verified copy of the active generation
(``device/sync/chain.py``), then handed to the switch like a full snapshot. A kiosk that
lacks the base reports ``delta_base_mismatch`` and installs the announcement's ``full`` snapshot, if any.

An announcement is only a pointer: its URLs must lie under the kiosk's sources (``source_not_allowed``,
checked before anything connects) and, once verified, the signed manifest must say what it said (store,
version, model, kind, base version, manifest sha256: ``announcement_mismatch``).
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device.sync.active import ActiveSnapshot, SnapshotLoadError
from device.sync.candidate import SnapshotCandidate, SnapshotSwitch
from device.sync.chain import BASE_MISMATCH, CHAIN_TOO_LONG, Verified, Verifier
from device.sync.download import DownloadError, check_source, fetch, redact_url
from device.sync.errors import SnapshotRefused
from device.sync.sources import Sources
from device.sync.store import SnapshotStore
from storelens.archive import copy_snapshot_dir, unpack
from storelens.protocol import ProtocolError, SnapshotAnnouncement, decode
from storelens.snapshot import SnapshotManifest, SnapshotRejected, manifest_sha256

_LOGGER = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 600.0  # whole archive; a trickling server must not block later updates forever
MAX_BYTES = 4 << 30  # 4 GiB: a 1M x 512 store is ~2.1 GiB; refuse anything beyond without downloading
# Refusals after which the announcement's full snapshot (if it names one) is installed instead.
_FALL_BACK_TO_FULL = (BASE_MISMATCH, CHAIN_TOO_LONG)
# Refusals that prove nothing about the bytes (a full disk): the same archive is tried again when announced.
_TRANSIENT = ("io_error",)


class SnapshotSync:
    """Keeps the kiosk on the newest valid snapshot; never interrupts search."""

    def __init__(
        self,
        store: SnapshotStore,
        public_keys: list[Ed25519PublicKey],
        *,
        store_id: str,
        model_id: str,
        model_dim: int,
        switch: SnapshotSwitch,
        on_refused: Callable[[str, str], None],
        sources: Sources,
        download_timeout_s: float = DOWNLOAD_TIMEOUT_S,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        if not public_keys:
            raise ValueError("at least one pinned public key is required")
        self._store = store
        self._verifier = Verifier(public_keys, store_id=store_id, model_id=model_id, model_dim=model_dim)
        self._store_id = store_id
        self._model_id = model_id
        self._model_dim = model_dim
        self._switch = switch  # the snapshot-only switch: load, canaries, pointer, swap
        self._on_refused = on_refused
        self._sources = sources  # where announced archives may be fetched from
        self._download_timeout_s = download_timeout_s
        self._max_bytes = max_bytes
        self._install_lock = threading.Lock()
        self._cond = threading.Condition()
        self._pending: bytes | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._active: ActiveSnapshot | None = None
        self._active_id: tuple[int, str] | None = None  # (version, signed manifest sha256): what deltas name
        # What was proven bad, so a retained re-delivery is not fetched and reported again per reconnect:
        # only the exact thing judged (never a whole version: a genuine copy must still install at once).
        self._refused: set[tuple[object, ...]] = set()  # (message or archive sha256, state judged against)
        self._rolled_back: set[tuple[int, str]] = set()  # (version, manifest sha256) that failed probation
        self.superseded = 0  # announcements replaced by a newer one before the worker got to them
        self.idle = threading.Event()  # set while no announcement is pending or being processed
        self.idle.set()

    @property
    def active(self) -> ActiveSnapshot | None:
        return self._active

    @property
    def model_id(self) -> str:
        """The model this sync follows (its snapshots serve that model only)."""
        return self._model_id

    @property
    def store(self) -> SnapshotStore:
        """Where this sync keeps its snapshots and pointer."""
        return self._store

    # -- lifecycle --
    def start(self) -> None:
        """Start the worker thread."""
        if self._thread is not None:
            raise RuntimeError("SnapshotSync already started")
        self._stop.clear()
        self._thread = threading.Thread(
            target=self.run, args=(self._stop,), name="snapshot-sync", daemon=True
        )
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the worker (an in-flight download is cancelled at its next chunk)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                _LOGGER.error("snapshot-sync thread still alive after %.1f s", timeout_s)
            self._thread = None

    def load_active(self) -> ActiveSnapshot | None:
        """At start: re-verify and load the pointed snapshot, else the previous one (pointer rolled back)."""
        with self._install_lock:
            pointer = self._store.pointer
            for attempt, name in enumerate((pointer.active, pointer.previous)):
                if name is None:
                    continue
                try:
                    snap, identity = self._open(self._store.path(name))
                except SnapshotRefused as exc:
                    _LOGGER.error("stored snapshot %s unusable: %s", name, exc)
                    self._report(exc.reason, f"stored snapshot {name}: {exc.detail}")
                    continue
                if attempt == 1:
                    self._store.rollback()
                self._active, self._active_id = snap, identity
                _LOGGER.info("serving stored snapshot %s (%r)", name, snap)
                return snap
        return None

    def rollback(self) -> ActiveSnapshot:
        """Serve the previous generation again (after a failed probation), through the switch."""
        with self._install_lock:
            pointer = self._store.pointer
            if pointer.previous is None:
                raise SnapshotRefused("no_previous", "no previous snapshot kept")
            directory = self._store.path(pointer.previous)
            verified = self._verified(directory)
            failed = self._active_id if pointer.active is not None else None

            def commit() -> None:
                self._store.rollback()

            snap = self._switch(
                SnapshotCandidate(directory, verified.manifest, verified.identity, commit, rollback=True)
            )
            if failed is not None:
                self._rolled_back.add(failed)
            self._active, self._active_id = snap, verified.identity
        return snap

    # -- announcements --
    def on_announcement(self, topic: str, payload: bytes, retained: bool) -> None:
        """MQTT callback: hand the payload to the worker (latest wins) and return at once."""
        with self._cond:
            if self._pending is not None:
                self.superseded += 1
            self._pending = bytes(payload)
            self.idle.clear()
            self._cond.notify_all()

    def run(self, stop: threading.Event) -> None:
        """Worker loop: one announcement at a time, newest first."""
        while not stop.is_set():
            with self._cond:
                while self._pending is None and not stop.is_set():
                    self.idle.set()
                    self._cond.wait(1.0)
                payload, self._pending = self._pending, None
            if payload is None:
                continue
            try:
                self.handle_announcement(payload)
            except Exception:  # loop boundary: report and keep serving
                _LOGGER.exception("snapshot announcement handling failed")
                self._report("internal_error", "see kiosk log")
        self.idle.set()

    def handle_announcement(self, payload: bytes) -> ActiveSnapshot | None:
        """Decode, filter, download and install one announcement (synchronously); None if ignored/refused."""
        try:
            ann = decode(payload, SnapshotAnnouncement)
        except ProtocolError as exc:
            reason = "unsupported_schema" if exc.reason == "unsupported_schema" else "bad_announcement"
            self._report(reason, str(exc)[:300])
            return None
        for url in (ann.url, *((ann.full.url,) if ann.full is not None else ())):
            try:
                check_source(self._sources, url)
            except DownloadError as exc:
                self._report(exc.reason, exc.detail)
                return None
        return self._handle(ann)

    def _handle(self, ann: SnapshotAnnouncement, *, fallback: bool = True) -> ActiveSnapshot | None:
        active = self._active
        if active is not None and active.version == ann.version:
            return None  # retained re-delivery after a reconnect
        message, archive_bytes = self._judged(ann), self._judged(ann.sha256, ann.manifest_sha256)
        if message in self._refused or archive_bytes in self._refused:
            return None
        if (ann.version, ann.manifest_sha256) in self._rolled_back:
            return None  # failed probation here
        problem = self._precheck(ann)
        if problem is not None:
            self._refused.add(message)  # this message, against this kiosk's state: nothing else
            self._report(*problem)
            return self._fall_back(ann) if fallback and problem[0] in _FALL_BACK_TO_FULL else None
        archive = self._store.downloads / f"v{ann.version}.tar.partial"
        try:
            _LOGGER.info("downloading snapshot v%d from %s", ann.version, redact_url(ann.url))
            fetch(
                ann.url,
                archive,
                size=ann.size,
                sha256=ann.sha256,
                timeout_s=self._download_timeout_s,
                sources=self._sources,
                stop=self._stop,
            )
            return self.install(archive, expect_manifest_sha256=ann.manifest_sha256, announced=ann)
        except DownloadError as exc:
            if exc.reason != "cancelled":
                self._report(exc.reason, exc.detail)
            return None
        except SnapshotRefused as exc:
            if exc.reason == "announcement_mismatch":  # the bytes verified: the message lied about them
                self._refused.add(message)
            elif exc.reason not in _TRANSIENT:  # fetch checked ann.sha256: these exact bytes are bad
                self._refused.add(archive_bytes)
            self._report(exc.reason, exc.detail)
            if fallback and exc.reason in _FALL_BACK_TO_FULL:
                archive.unlink(missing_ok=True)
                return self._fall_back(ann)
            return None
        finally:
            archive.unlink(missing_ok=True)

    def _fall_back(self, ann: SnapshotAnnouncement) -> ActiveSnapshot | None:
        """The delta cannot go onto what this kiosk holds: install the store's newest full snapshot."""
        if ann.full is None:
            return None
        _LOGGER.warning("delta v%d unusable here: falling back to full v%d", ann.version, ann.full.version)
        return self._handle(ann.of_full(), fallback=False)

    def _judged(self, *what: object) -> tuple[object, ...]:
        """``what`` with the state a refusal of it depends on (active generation, replay protection)."""
        return (*what, self._active_id, self._store.highest_seen)

    def _precheck(self, ann: SnapshotAnnouncement) -> tuple[str, str] | None:
        seen = self._store.highest_seen
        if ann.store != self._store_id:
            return "wrong_store", f"announcement for store {ann.store!r}"
        if ann.model_id != self._model_id:
            return "model_mismatch", f"snapshot v{ann.version} needs model {ann.model_id[:12]}"
        if seen is not None and (ann.version, ann.manifest_sha256) != seen and ann.version <= seen[0]:
            return "version_replay", f"announced v{ann.version} <= already seen v{seen[0]}"
        active = self._active_id
        if ann.kind == "delta" and (active is None or ann.base_version != active[0]):
            held = f"v{active[0]}" if active is not None else "no snapshot"
            return BASE_MISMATCH, f"delta v{ann.version} chains to v{ann.base_version}, kiosk holds {held}"
        if ann.size > self._max_bytes:
            return "too_large", f"{ann.size} bytes > limit {self._max_bytes}"
        return None

    # -- install --
    def install(
        self,
        archive_or_dir: Path,
        *,
        expect_manifest_sha256: str | None = None,
        announced: SnapshotAnnouncement | None = None,
    ) -> ActiveSnapshot:
        """Unpack/copy, verify (a delta: apply it onto the active snapshot), place, hand the candidate to
        the switch; SnapshotRefused (``announcement_mismatch``: the signed manifest is not what
        ``announced`` said)."""
        source = Path(archive_or_dir)
        with self._install_lock:
            staged = self._store.new_staging_dir("install")
            work = self._store.new_staging_dir("apply")
            try:
                if source.is_dir():
                    copy_snapshot_dir(source, staged, max_total_bytes=self._max_bytes)
                else:
                    unpack(source, staged, max_total_bytes=self._max_bytes)
                manifest = self._verifier.signed(staged, seen=self._store.highest_seen, base=self._active_id)
                digest = manifest_sha256(staged)
                if expect_manifest_sha256 is not None and digest != expect_manifest_sha256:
                    raise SnapshotRefused(
                        "manifest_mismatch", "manifest sha256 differs from the announcement"
                    )
                if announced is not None:
                    _check_announced(announced, manifest)
                name = self._store.dir_name(manifest.version, digest)
                generation = staged
                if manifest.kind == "delta":
                    generation, manifest = self._apply(staged, manifest, work)
                final = self._store.place(generation, name)
            except SnapshotRejected as exc:
                raise SnapshotRefused(exc.reason.value, exc.detail) from exc
            except OSError as exc:
                raise SnapshotRefused("io_error", str(exc)) from exc
            finally:
                shutil.rmtree(staged, ignore_errors=True)
                shutil.rmtree(work, ignore_errors=True)
            version = manifest.version

            def commit() -> None:
                self._store.activate(name, version, digest)

            try:
                snap = self._switch(SnapshotCandidate(final, manifest, (version, digest), commit))
            except SnapshotRefused:
                self._store.discard(name)
                raise
            self._active, self._active_id = snap, (version, digest)
            self._store.prune()  # keep active + previous only
        _LOGGER.info("snapshot v%d installed (%r)", snap.version, snap)
        return snap

    def _apply(self, delta: Path, manifest: SnapshotManifest, work: Path) -> tuple[Path, SnapshotManifest]:
        """A verified delta onto a private copy of the active generation: (new generation, its manifest)."""
        active = self._active
        if active is None or self._active_id is None:
            raise SnapshotRefused(BASE_MISMATCH, f"delta v{manifest.version} but no snapshot to apply it to")
        _LOGGER.info("applying delta v%d onto v%d", manifest.version, active.version)
        return self._verifier.apply(active.directory, delta, work)

    def _load(self, directory: Path, manifest: SnapshotManifest) -> ActiveSnapshot:
        try:
            snap = ActiveSnapshot.load(directory, manifest)
            snap.check_canaries()
        except SnapshotLoadError as exc:
            raise SnapshotRefused(exc.reason, exc.detail) from exc
        return snap

    def _open(self, directory: Path) -> tuple[ActiveSnapshot, tuple[int, str]]:
        """At boot: re-verify a stored generation (an applied delta: re-derive its chain) and load it."""
        verified = self._verified(directory)
        return self._load(directory, verified.manifest), verified.identity

    def _verified(self, directory: Path) -> Verified:
        """Re-verify a stored generation (an applied delta: re-derive its chain)."""
        work = self._store.new_staging_dir("check")
        try:
            return self._verifier.stored(directory, work)
        except OSError as exc:
            raise SnapshotRefused("io_error", str(exc)) from exc
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _report(self, reason: str, detail: str) -> None:
        _LOGGER.warning("snapshot refused: %s: %s", reason, detail)
        try:
            self._on_refused(reason, detail)
        except Exception:
            _LOGGER.exception("on_refused callback failed")


def _check_announced(ann: SnapshotAnnouncement, manifest: SnapshotManifest) -> None:
    """SnapshotRefused ``announcement_mismatch`` unless the signed manifest says what the announcement did."""
    said = (ann.store, ann.version, ann.model_id, ann.kind, ann.base_version)
    signed = (manifest.store, manifest.version, manifest.model_id, manifest.kind, manifest.base_version)
    names = ("store", "version", "model_id", "kind", "base_version")
    wrong = [n for n, a, b in zip(names, said, signed, strict=True) if a != b]
    if wrong:
        raise SnapshotRefused(
            "announcement_mismatch", f"announced {', '.join(wrong)} differ from the signed manifest"
        )

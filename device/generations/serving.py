"""The serving reference: the (model, snapshot) pair the pipeline reads once per held item, replaced whole.

Two kinds of switch replace it, both the switcher's: model and index together (a new generation or a
rollback), and a snapshot-only candidate from the sync of the serving model (``switch_snapshot``; pairing
rule: a snapshot serves only the model that built it, and never an older one than serves now).
Generation 0 is the configured bundle with the snapshot its sync keeps; each released model has its own
sync, as a snapshot is valid for one model only. Every sync keeps its snapshots in the kiosk's one
generation store (its snapshots/) and its pointer as its entry in the one pointer, ``current.json``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device.config import SnapshotConfig
from device.generations.layout import sync_key, sync_work_dir
from device.generations.loaded import LoadedGeneration, RetiredModels, close_embedder
from device.generations.probe import SwitchProbe
from device.generations.store import Generation, GenerationStore, SyncSlot, generation_zero
from device.generations.switcher import Switcher, switch_snapshot
from device.pipeline import ModelPair
from device.sync import (
    ActiveSnapshot,
    SnapshotCandidate,
    SnapshotRefused,
    SnapshotStore,
    SnapshotSync,
    Sources,
)
from models.port import EmbedderPort

_LOGGER = logging.getLogger(__name__)


class Serving:
    """Holds THE reference and the snapshot sync that follows the serving model."""

    def __init__(
        self,
        cfg: SnapshotConfig,
        keys: list[Ed25519PublicKey],
        *,
        store: GenerationStore,
        store_id: str,
        sources: Sources,
        make_configured: Callable[[], EmbedderPort],
        injected: EmbedderPort | None,
        retired: RetiredModels,
        probe: SwitchProbe,
        on_refused: Callable[[str, str], None],
        on_alert: Callable[[str, str], None],
        on_model: Callable[[str], None],
        on_changed: Callable[[], None],
    ) -> None:
        self._cfg = cfg
        self._keys = keys
        self.store = store  # the kiosk's one generation store: every sync's snapshots and pointer
        self._store_id = store_id
        self._sources = sources
        self._make_configured = make_configured
        self._injected = injected  # generation 0's model when the caller owns it (never closed here)
        self._retired = retired
        self._probe = probe
        self._on_refused = on_refused
        self._on_alert = on_alert
        self._on_model = on_model  # the serving model changed (Home Assistant shows it)
        self._on_changed = on_changed  # what serves changed: status
        self.switcher: Switcher | None = None  # set by the app when [update] is configured
        self.configured: EmbedderPort | None = None  # generation 0's model, when this process loaded it
        self.released = False  # serving a released generation (not generation 0)
        self.sync: SnapshotSync | None = None  # follows the serving model; remade at a model switch
        self._pair: ModelPair | None = None
        self._lock = threading.Lock()  # writers only (sync and switcher); readers take the reference
        # The last announcement seen on the snapshot topic (= the broker's retained one): handed to the sync
        # made at a model switch, which would otherwise see it only at the next reconnect.
        self._announcement: tuple[str, bytes] | None = None

    def current(self) -> ModelPair:
        """The pair serving now (the pipeline's provider)."""
        pair = self._pair
        assert pair is not None, "the pipeline runs only after start() loaded a model"
        return pair

    @property
    def model_id(self) -> str:
        pair = self._pair
        return pair.model_id if pair is not None else ""

    @property
    def snapshot(self) -> ActiveSnapshot | None:
        pair = self._pair
        return pair.snapshot if pair is not None else None

    # -- lifecycle --
    def start(self) -> str:
        """Serve the stored generation the switcher names, else generation 0 (with its stored or initial
        snapshot); start the sync of the serving model. Returns the model id."""
        loaded = self.switcher.boot() if self.switcher is not None else None  # a released one wins
        if self.switcher is None:
            self.store.cleanup()  # (the switcher's boot does it) leftovers of a cut install
        if loaded is not None:
            embedder, self.released = loaded.embedder, True
        else:
            embedder = self._injected if self._injected is not None else self._make_configured()
            self.configured = embedder if self._injected is None else None
        self.sync = self._new_sync(embedder.model_id, embedder.dim, configured=loaded is None)
        self._pair = ModelPair(embedder, None)
        stored = self.sync.load_active()
        if loaded is not None and (stored is None or stored.version < loaded.snapshot.version):
            stored = loaded.snapshot  # the release's snapshot, unless sync installed a newer one since
        self._pair = ModelPair(embedder, stored)
        if loaded is None:
            self._adopt_configured()  # the first update's last known good
        if stored is None and loaded is None and self._cfg.initial is not None:
            try:
                self.sync.install(self._cfg.initial)  # on_snapshot sets the pair's snapshot
            except SnapshotRefused as exc:
                _LOGGER.error("initial snapshot refused: %s", exc)
                self._on_refused(exc.reason, exc.detail)
        self._on_model(embedder.model_id)
        self.sync.start()
        return embedder.model_id

    def stop(self, timeout_s: float) -> None:
        """After the pipeline stopped: close generation 0's model and stop the sync."""
        if self.configured is not None:
            close_embedder(self.configured)
        self.configured = None
        if self.sync is not None:
            self.sync.stop(timeout_s)

    # -- the two ways the reference is replaced --
    def on_candidate(self, candidate: SnapshotCandidate) -> ActiveSnapshot:
        """The sync's candidate (the sync's switch): the pairing rule against what serves, checked before
        anything is committed (SnapshotRefused ``model_mismatch`` / ``version_replay``), then the
        switcher's snapshot-only switch: load, canaries, pointer, swap."""
        old = self.snapshot
        snap = switch_snapshot(candidate, self.on_snapshot, serving=self._serving, lock=self._lock)
        if old is not None and old.version != snap.version:
            self._on_alert("snapshot_applied", f"v{old.version} -> v{snap.version}")
        self._on_changed()
        return snap

    def on_snapshot(self, snap: ActiveSnapshot) -> None:
        """``snap`` is committed (pairing rule checked, the writers' lock held): one reference replaced."""
        pair = self._pair
        assert pair is not None and snap.manifest.model_id == pair.model_id
        self._pair = replace(pair, snapshot=snap)  # the search stage picks it up at its next item
        if not self.released:
            self._adopt_configured()

    def switch(self, embedder: EmbedderPort, snapshot: ActiveSnapshot) -> None:
        """The switcher changed generation (or rolled back): model and snapshot in one reference swap."""
        new = ModelPair(embedder, snapshot)
        active = self.switcher.active if self.switcher is not None else None
        configured = active is not None and active.generation.configured and active.embedder is embedder
        with self._lock:
            old = self._pair
            self._pair = new
            self.released = not configured  # a rollback to generation 0 serves it as at boot
        old_model = old.model_id if old is not None else ""
        self._probe.on_switch(old_model, new.model_id)
        _LOGGER.info("model %s -> %s, snapshot v%d", old_model[:12], new.model_id[:12], snapshot.version)
        if new.model_id != old_model:
            self._replace_sync(new.model_id, embedder.dim, configured=configured)
            self._on_model(new.model_id)
        self._on_changed()

    def on_done(self) -> None:
        """A released generation passed probation: generation 0's model serves no more."""
        if self.configured is not None and self.released:
            self._retired.retire(self.configured)
            self.configured = None

    def on_announcement(self, topic: str, payload: bytes, retained: bool) -> None:
        """MQTT: a snapshot announcement, for whichever sync follows the serving model now."""
        self._announcement = (topic, bytes(payload)) if payload else None  # empty: the retained one cleared
        sync = self.sync
        if sync is not None:
            sync.on_announcement(topic, payload, retained)

    def open_configured(self, gen: Generation) -> LoadedGeneration:
        """Generation 0 loaded again (a rollback after a restart): the configured model and the snapshot
        its sync keeps (the one it served when the update switched away from it)."""
        embedder = self._injected if self._injected is not None else self.configured
        if embedder is None:
            embedder = self.configured = self._make_configured()
        sync = self._new_sync(embedder.model_id, embedder.dim, configured=True)
        snap = sync.load_active()
        if snap is None:
            raise RuntimeError("the configured model has no stored snapshot")
        return LoadedGeneration(generation_zero(embedder.model_id, snap.version), embedder, snap)

    # -- helpers --
    def _new_sync(self, model_id: str, dim: int, *, configured: bool) -> SnapshotSync:
        key = sync_key(model_id, configured=configured)
        slot = SyncSlot(self.store, key)  # its pointer: an entry of current.json; its snapshots: the store's
        return SnapshotSync(
            SnapshotStore(sync_work_dir(self.store, key), slot, shared=slot), self._keys,
            store_id=self._store_id, model_id=model_id, model_dim=dim, switch=self.on_candidate,
            on_refused=self._on_refused, sources=self._sources,
        )

    def _serving(self) -> tuple[str, ActiveSnapshot | None]:
        pair = self._pair
        return (pair.model_id, pair.snapshot) if pair is not None else ("", None)

    def _replace_sync(self, model_id: str, dim: int, *, configured: bool = False) -> None:
        """A snapshot is valid for one model: a new sync (its own state) follows the new model."""
        new = self._new_sync(model_id, dim, configured=configured)
        new.start()
        old, self.sync = self.sync, new
        last = self._announcement  # read after the swap: one arriving meanwhile reaches ``new`` itself
        if last is not None:
            new.on_announcement(last[0], last[1], True)  # as the broker re-delivers it on a subscribe
        if old is not None:
            old.stop()

    def _adopt_configured(self) -> None:
        """Tell the switcher generation 0 serves now (with the lock held, or before start)."""
        pair = self._pair
        embedder = self.configured if self.configured is not None else self._injected
        if self.switcher is None or pair is None or pair.snapshot is None or embedder is None:
            return  # no snapshot yet: recorded when the sync installs the first one
        gen = generation_zero(pair.model_id, pair.snapshot.version)
        self.switcher.adopt(LoadedGeneration(gen, embedder, pair.snapshot))

"""A generation loaded to serve (embedder + snapshot), how a stored one is opened again, and how models that
serve no more are closed."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device.generations.canary import UpdateFailed, load_snapshot
from device.generations.store import Generation, GenerationStore
from device.sync.active import ActiveSnapshot
from models.port import EmbedderPort, close
from storelens.snapshot import verify_snapshot

_LOGGER = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 5.0


@dataclass(slots=True)
class LoadedGeneration:
    generation: Generation
    embedder: EmbedderPort
    snapshot: ActiveSnapshot
    latency_ms: float | None = None  # the canaries' p50 (None: not measured)


Loader = Callable[[Path, Path | None], EmbedderPort]


def default_loader(bundle: Path, cache_dir: Path | None) -> EmbedderPort:
    from models.embedder import Embedder

    return Embedder(bundle, mode="latency", cache_dir=cache_dir)


def open_generation(
    store: GenerationStore,
    keys: list[Ed25519PublicKey],
    load: Loader,
    cache_dir: Path | None,
    pair: Generation,
) -> LoadedGeneration:
    """Re-verify a stored generation (snapshot against its model) and load both."""
    snap_dir = store.path(pair.snapshot)
    manifest = verify_snapshot(snap_dir, keys, model_id=pair.model_id, check_index=True)
    embedder = load(store.path(pair.bundle), cache_dir)
    if str(embedder.model_id) != pair.model_id:
        close_embedder(embedder)
        raise UpdateFailed("verify", "model_mismatch", f"{pair.bundle} is not {pair.model_id[:12]}")
    try:
        snap = load_snapshot(snap_dir, manifest)
    except UpdateFailed:
        close_embedder(embedder)
        raise
    return LoadedGeneration(pair, embedder, snap)


def close_embedder(embedder: EmbedderPort) -> None:
    """Close an embedder no longer served, on a helper thread with a bounded wait: a close that hangs
    inside OpenVINO (seen with the AsyncInferQueue the Embedder once used) must not hang the caller."""
    if not callable(getattr(embedder, "close", None)):
        return

    def run() -> None:
        try:
            close(embedder)
        except Exception:
            _LOGGER.exception("closing an embedder failed")

    t = threading.Thread(target=run, name="embedder-close", daemon=True)
    t.start()
    t.join(CLOSE_TIMEOUT_S)
    if t.is_alive():
        _LOGGER.error(
            "embedder close still blocked after %.0f s (left to finish on its own)", CLOSE_TIMEOUT_S
        )


class RetiredModels:
    """Embedders no longer served, each closed by ``close_due`` (a periodic tick) once ``grace_s`` has
    passed since its retirement and no item still open will embed with it. Kept open for the kiosk's whole
    run they cost memory per model update (ResNet-50 int8 ~50 MB, fp16 ~150 MB of RSS, measured)."""

    def __init__(self, grace_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._grace_s = grace_s
        self._clock = clock
        self._lock = threading.Lock()
        self._items: list[tuple[float, EmbedderPort]] = []

    def retire(self, embedder: EmbedderPort) -> None:
        """Take ``embedder`` out of service: closed at the first ``close_due`` after the grace period."""
        with self._lock:
            self._items.append((self._clock(), embedder))

    def close_due(self, in_use: Collection[object] = ()) -> int:
        """Close those retired at least ``grace_s`` ago and not ``in_use`` (by an item still open); each
        close is bounded by CLOSE_TIMEOUT_S. Returns how many were closed."""
        now = self._clock()

        def due(t: float, e: EmbedderPort) -> bool:
            return now - t >= self._grace_s and not any(e is u for u in in_use)

        with self._lock:
            closing = [e for t, e in self._items if due(t, e)]
            self._items = [(t, e) for t, e in self._items if not due(t, e)]
        for embedder in closing:
            close_embedder(embedder)
            _LOGGER.info("closed a retired model %s", str(getattr(embedder, "model_id", "?"))[:12])
        return len(closing)

    def close_all(self) -> None:
        """Close every retired embedder now (the kiosk is stopping)."""
        with self._lock:
            due, self._items = [e for _, e in self._items], []
        for embedder in due:
            close_embedder(embedder)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

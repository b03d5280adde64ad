"""The update's data: settings, a loaded (embedder, snapshot) pair, and how pairs are opened and closed."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device.sync.active import ActiveSnapshot
from device.update import steps
from device.update.pointer import Pair, PairStore
from storelens.snapshot import verify_snapshot

_LOGGER = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class UpdateSettings:
    root: Path
    probation_s: float = 300.0  # long enough to see a crash loop and a latency trend, short for the fleet
    probe_interval_s: float = 5.0
    max_probation_boots: int = 2  # restarts tolerated in probation before the old pair comes back
    compile_timeout_s: float = 120.0
    compile_mem_bytes: int = 2 << 30  # tiny/resnet compile in < 1 GiB; a runaway model stops here
    max_snapshot_bytes: int = 4 << 30
    min_canary_cosine: float = 0.98
    max_latency_factor: float = 3.0  # new model slower than this x old on the canaries: refused
    cache_dir: Path | None = None


@dataclass(slots=True)
class LoadedPair:
    pair: Pair
    embedder: Any
    snapshot: ActiveSnapshot
    latency_ms: float | None = None


def default_loader(bundle: Path, cache_dir: Path | None) -> Any:
    from models.embedder import Embedder

    return Embedder(bundle, mode="latency", cache_dir=cache_dir)


def default_decoder(data: bytes) -> Any:
    from models.images import decode_image

    return decode_image(data)


def open_pair(
    store: PairStore,
    keys: list[Ed25519PublicKey],
    load: Callable[[Path, Path | None], Any],
    cache_dir: Path | None,
    pair: Pair,
) -> LoadedPair:
    """Re-verify a stored pair (snapshot against the pair's model) and load both."""
    snap_dir = store.path(pair.snapshot)
    manifest = verify_snapshot(snap_dir, keys, model_id=pair.model_id, check_index=True)
    embedder = load(store.path(pair.bundle), cache_dir)
    if str(embedder.model_id) != pair.model_id:
        close_embedder(embedder)
        raise steps.UpdateFailed("verify", "model_mismatch", f"{pair.bundle} is not {pair.model_id[:12]}")
    try:
        snap = steps.load_snapshot(snap_dir, manifest)
    except steps.UpdateFailed:
        close_embedder(embedder)
        raise
    return LoadedPair(pair, embedder, snap)


def close_embedder(embedder: Any) -> None:
    """Close an embedder no longer served, on a helper thread with a bounded wait: a close that hangs
    inside OpenVINO (seen with the AsyncInferQueue the Embedder once used) must not hang the caller."""
    close = getattr(embedder, "close", None)
    if not callable(close):
        return

    def run() -> None:
        try:
            close()
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
        self._items: list[tuple[float, Any]] = []

    def retire(self, embedder: Any) -> None:
        """Take ``embedder`` out of service: closed at the first ``close_due`` after the grace period."""
        with self._lock:
            self._items.append((self._clock(), embedder))

    def close_due(self, in_use: Collection[object] = ()) -> int:
        """Close those retired at least ``grace_s`` ago and not ``in_use`` (by an item still open); each
        close is bounded by CLOSE_TIMEOUT_S. Returns how many were closed."""
        now = self._clock()

        def due(t: float, e: Any) -> bool:
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

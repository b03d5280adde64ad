"""The canary gate: a candidate generation's model and snapshot checked together before it may serve.

The snapshot carries canary images with the embeddings the cloud recorded; the candidate model must put
each at top-1 in its own snapshot, close to the recorded vector, agreeing with the child compile, and not
much slower than the model serving now.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from device.sync.active import ActiveSnapshot, SnapshotLoadError
from models.port import EmbedderPort, embed_one
from storelens.errors import ReasonError
from storelens.snapshot import SnapshotManifest

Crop = npt.NDArray[np.uint8]


class UpdateFailed(ReasonError[str]):
    """One step failed; ``step`` is the UpdateProgress step it failed in."""

    def __init__(self, step: str, reason: str, detail: str) -> None:
        self.step = step
        super().__init__(reason, detail)

    def _message(self) -> str:
        return f"{self.step}/{super()._message()}"


def canary_images(
    snapshot_dir: Path, manifest: SnapshotManifest
) -> list[tuple[str, Path, npt.NDArray[np.float32]]]:
    """(sku, image path, recorded embedding) of every canary that carries an image."""
    out = []
    for c in manifest.canary:
        if c.image is None:
            continue
        rec = np.frombuffer(base64.b64decode(c.embedding), dtype="<f4").astype(np.float32)
        out.append((c.sku, snapshot_dir / c.image, rec))
    return out


def load_snapshot(directory: Path, manifest: SnapshotManifest) -> ActiveSnapshot:
    """Load a verified snapshot and check its recorded canaries (index and rows agree)."""
    try:
        snap = ActiveSnapshot.load(directory, manifest)
        snap.check_canaries()
    except SnapshotLoadError as exc:
        raise UpdateFailed("selftest", exc.reason, exc.detail) from exc
    return snap


def selftest(
    embedder: EmbedderPort,
    snap: ActiveSnapshot,
    canaries: Sequence[tuple[str, Path, npt.NDArray[np.float32]]],
    child_vectors: npt.NDArray[np.float32],
    *,
    min_cosine: float,
    decode: Callable[[bytes], npt.NDArray[np.uint8]],
) -> list[npt.NDArray[np.uint8]]:
    """Canary images through the new model: right sku at top-1, close to the recorded embedding, and the
    same vectors as the child computed. Returns the decoded canary crops (for the latency check)."""
    if not canaries:
        raise UpdateFailed("selftest", "no_canary_images", "the snapshot carries no canary images")
    crops = [decode(path.read_bytes()) for _, path, _ in canaries]
    got = np.stack([embed_one(embedder, crop) for crop in crops])
    if not np.isfinite(got).all():
        raise UpdateFailed("selftest", "non_finite", "the model returned non-finite embeddings")
    for i, (sku, _, recorded) in enumerate(canaries):
        if recorded.shape != got[i].shape:
            raise UpdateFailed(
                "selftest", "dim_mismatch", f"canary {sku}: dims {recorded.shape} vs {got[i].shape}"
            )
        cos = float(got[i] @ recorded / max(float(np.linalg.norm(recorded)), 1e-12))
        if cos < min_cosine:
            raise UpdateFailed("selftest", "canary_drift", f"canary {sku}: cosine {cos:.3f} < {min_cosine}")
        if float(got[i] @ child_vectors[i]) < 0.999:
            raise UpdateFailed("selftest", "unstable_model", f"canary {sku}: child and kiosk disagree")
        hits = snap.search(got[i][None, :], 1)[0]
        top = hits[0].sku if hits else None
        if top != sku:
            raise UpdateFailed("selftest", "canary_failed", f"canary {sku}: top-1 is {top!r}")
    return crops


def compare_latency(
    old: EmbedderPort, new: EmbedderPort, crops: Sequence[npt.NDArray[np.uint8]], *, rounds: int = 3
) -> tuple[float, float]:
    """(old p50 ms, new p50 ms), measured interleaved on the same crops so load on the kiosk hits both."""
    times: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(rounds):
        for crop in crops:
            for i, emb in enumerate((old, new)):
                t0 = time.perf_counter()
                embed_one(emb, crop)
                times[i].append((time.perf_counter() - t0) * 1000)
    return float(np.median(times[0])), float(np.median(times[1]))


def default_decoder(data: bytes) -> Any:
    """Canary image bytes -> BGR crop."""
    from models.images import decode_image

    return decode_image(data)

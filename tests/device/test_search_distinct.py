"""Search returns k distinct products even when each product has many photos in the index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device.sync.active import OVERFETCH, ActiveSnapshot
from storelens.snapshot import verify_snapshot
from tests.device.snapshots import make_snapshot


def _clustered(tmp_path: Path, n_items: int, per_item: int, seed: int) -> tuple[ActiveSnapshot, np.ndarray]:
    """A verified snapshot of ``per_item`` tight photos around each of ``n_items`` products p0, p1, ...;
    (the loaded snapshot, its vectors in product order)."""
    rng = np.random.default_rng(seed)
    dim = 32
    centres = rng.normal(size=(n_items, dim))
    vecs = np.repeat(centres, per_item, axis=0) + 0.05 * rng.normal(size=(n_items * per_item, dim))
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
    skus = [f"p{i}" for i in range(n_items)]
    key = Ed25519PrivateKey.generate()
    d = make_snapshot(tmp_path / "snap", vecs, [s for s in skus for _ in range(per_item)], key,
                      model_id="ab" * 32)
    snap = ActiveSnapshot.load(d, verify_snapshot(d, [key.public_key()]))
    return snap, vecs


def test_similar_items_are_filled_when_every_product_has_many_photos(tmp_path: Path) -> None:
    """30 photos per product, all nearer to the query than any other product: a fixed k*OVERFETCH fetch
    returned one product and left "Similar items" empty; the search must still give k distinct skus."""
    n_items, per_item, k = 8, 30, 5
    assert per_item > k * OVERFETCH  # the case the fixed over-fetch could not fill
    snap, vecs = _clustered(tmp_path, n_items, per_item, seed=3)
    hits = snap.search(vecs[:1], k)[0]
    assert len({h.sku for h in hits}) == len(hits) == k
    assert hits[0].sku == "p0"


def test_the_first_fetch_is_sized_to_the_photos_per_product(tmp_path: Path) -> None:
    """A catalog photo + 10 store photos per product: one index search fills k distinct skus (a fixed
    k*OVERFETCH first fetch had to search again for most held items, doubling search time)."""
    k = 5
    snap, vecs = _clustered(tmp_path, n_items=12, per_item=11, seed=4)
    calls: list[int] = []
    search = snap.index.search

    def counted(q: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        calls.append(n)
        return search(q, n)

    snap.index.search = counted  # type: ignore[method-assign,assignment]
    hits = snap.search(vecs[:1], k)[0]
    assert len({h.sku for h in hits}) == k
    assert len(calls) == 1 and calls[0] < len(vecs)

"""Tiny signed snapshots for kiosk tests: one vector per item, built with the kernel modules directly."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from storelens import vindex
from storelens.snapshot import HnswParams, SnapshotManifest, describe_files, utc_now_iso, write_signed


def make_snapshot(
    out: Path,
    vectors: npt.NDArray[np.float32],
    skus: Sequence[str],
    key: Ed25519PrivateKey,
    *,
    store: str = "s1",
    model_id: str,
    version: int = 1,
    threshold: float = 0.5,
    thumbs: Sequence[npt.NDArray[np.uint8]] | None = None,
    title_prefix: str = "Item",
) -> Path:
    """Write a signed snapshot directory (index.bin, items.jsonl, thumbs/) and return it."""
    out.mkdir(parents=True, exist_ok=True)
    vecs = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vecs.shape
    index = vindex.build(vecs, np.arange(n, dtype=np.int64), M=16, ef_construction=100, ef=64, threads=1)
    index.save(out / "index.bin")
    names = ["index.bin", "items.jsonl"]
    rows = []
    for i, sku in enumerate(skus):
        row: dict[str, object] = {"sku": sku, "title": f"{title_prefix} {sku}", "price": f"{1 + i}.99",
                                  "location": f"Aisle {1 + i % 9}"}
        if thumbs is not None:
            name = f"thumbs/{sku}.jpg"
            (out / "thumbs").mkdir(exist_ok=True)
            ok, buf = cv2.imencode(".jpg", thumbs[i])
            assert ok
            (out / name).write_bytes(buf.tobytes())
            row["thumbnail"] = name
            names.append(name)
        rows.append(row)
    (out / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = SnapshotManifest(
        store=store, version=version, model_id=model_id, preprocessing_hash="test", model_dim=dim, dim=dim,
        item_count=n, vector_count=n, hnsw=HnswParams(M=16, ef_construction=100, ef=64), threshold=threshold,
        files=describe_files(out, names), created_at=utc_now_iso(),
    )
    write_signed(out, manifest, key)
    return out

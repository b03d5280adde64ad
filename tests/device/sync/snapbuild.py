"""Tiny signed snapshots for tests, in the layout cloud/build.py writes (no cloud import)."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from storelens import vindex
from storelens.archive import pack
from storelens.snapshot import (
    Canary,
    HnswParams,
    Projection,
    SnapshotManifest,
    describe_files,
    manifest_sha256,
    write_signed,
)

MODEL_ID = hashlib.sha256(b"test-model").hexdigest()
MODEL_DIM = 16


@dataclass
class Built:
    directory: Path
    vectors: npt.NDArray[np.float32]  # model space, one per sku (row i is sku-i)
    skus: list[str]
    manifest_sha256: str


def unit(rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    out: npt.NDArray[np.float32] = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    return out


def build_snapshot(
    directory: Path,
    key: Ed25519PrivateKey,
    *,
    version: int,
    store: str = "store1",
    model_id: str = MODEL_ID,
    n: int = 40,
    seed: int = 0,
    projection_dim: int | None = None,
    wrong_canary: bool = False,
) -> Built:
    """Write a signed snapshot dir: index.bin, items.jsonl, vectors.jsonl, thumbs/, optional projection."""
    rng = np.random.default_rng(seed)
    vectors = unit(rng.normal(size=(n, MODEL_DIM)))
    skus = [f"sku-{i:03d}" for i in range(n)]
    directory.mkdir(parents=True)
    (directory / "thumbs").mkdir()
    names = ["index.bin", "items.jsonl", "vectors.jsonl"]
    indexed = vectors
    projection = None
    if projection_dim is not None:
        mean = vectors.mean(axis=0).astype("<f4")
        matrix = rng.normal(size=(MODEL_DIM, projection_dim)).astype("<f4")
        (directory / "projection.bin").write_bytes(mean.tobytes() + matrix.tobytes())
        names.append("projection.bin")
        indexed = unit((vectors - mean) @ matrix)
        projection = Projection(file="projection.bin", in_dim=MODEL_DIM, out_dim=projection_dim)
    vindex.build(indexed, np.arange(n, dtype=np.int64), ef=50, threads=1).save(directory / "index.bin")
    items = []
    for i, sku in enumerate(skus):
        thumb = f"thumbs/{sku}.jpg" if i % 2 == 0 else None
        if thumb:
            (directory / thumb).write_bytes(b"\xff\xd8jpeg" + sku.encode())
            names.append(thumb)
        items.append(
            {"sku": sku, "title": f"Item {i}", "price": f"{i}.99", "location": f"A{i}", "thumbnail": thumb}
        )
    (directory / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    (directory / "vectors.jsonl").write_text(
        "".join(json.dumps({"label": i, "sku": s, "image": "x"}) + "\n" for i, s in enumerate(skus))
    )
    canary_rows = [0, n // 2, n - 1]
    canaries = [
        Canary(
            sku=skus[(i + 1) % n] if wrong_canary else skus[i],
            embedding=base64.b64encode(vectors[i].astype("<f4").tobytes()).decode(),
        )
        for i in canary_rows
    ]
    manifest = SnapshotManifest(
        store=store,
        version=version,
        model_id=model_id,
        preprocessing_hash="pp",
        model_dim=MODEL_DIM,
        dim=projection_dim or MODEL_DIM,
        projection=projection,
        item_count=n,
        vector_count=n,
        hnsw=HnswParams(M=16, ef_construction=200, ef=50),
        threshold=0.5,
        files=describe_files(directory, names),
        canary=canaries,
        created_at="2026-01-01T00:00:00Z",
    )
    write_signed(directory, manifest, key)
    return Built(directory, vectors, skus, manifest_sha256(directory))


def archive(built: Built, path: Path) -> Path:
    pack(built.directory, path)
    return path

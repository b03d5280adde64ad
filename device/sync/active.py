"""A loaded snapshot ready to serve: index (ef set), label->item mapping, optional projection.

Immutable once built: a newer snapshot is a new ActiveSnapshot, swapped in by reference between frames.
Layout written by the cloud build (cloud/build.py) or a delta applied on the kiosk (storelens/delta.py):
``index.bin``, ``items.jsonl`` (sku, title, price, location, thumbnail), ``vectors.jsonl`` (label -> sku),
``thumbs/``, optional projection file.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from storelens import vindex
from storelens.delta import INDEX, ITEMS, VECTORS, is_applied, read_rows
from storelens.errors import ReasonError
from storelens.fsutil import read_capped
from storelens.matching import MatchRule, NotCarried
from storelens.projection import Adapter
from storelens.snapshot import SnapshotManifest

OVERFETCH = 4  # several vectors per sku: ask hnswlib for k*OVERFETCH labels first, x4 while short of k skus


class SnapshotLoadError(ReasonError[str]):
    """A verified snapshot still cannot be served (row files inconsistent with the index, bad canary)."""


@dataclass(frozen=True, slots=True)
class Item:
    sku: str
    title: str
    price: str | None
    location: str | None
    thumbnail: Path | None  # absolute path inside the snapshot directory


@dataclass(frozen=True, slots=True)
class Hit:
    sku: str
    title: str
    price: str | None
    location: str | None
    thumbnail: Path | None
    score: float


class ActiveSnapshot:
    """One snapshot loaded off the hot path; ``search`` is what the pipeline calls per held item."""

    def __init__(
        self,
        directory: Path,
        manifest: SnapshotManifest,
        index: vindex.VectorIndex,
        label_sku: npt.NDArray[np.int64],
        skus: tuple[str, ...],
        items: Mapping[str, Item],
        projection: Adapter | None,
        not_carried: NotCarried | None = None,
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self.version = manifest.version
        self.index = index
        self.threshold = manifest.threshold
        self.rule = MatchRule.from_manifest(manifest.threshold, manifest.extra)  # "no match" decision
        self._label_sku = label_sku  # label -> position in skus (-1: unknown)
        self._skus = skus
        self._items = items
        self._projection = projection
        self._not_carried = not_carried  # rejection rows: photos of products the store does not sell

    @classmethod
    def load(cls, directory: Path, manifest: SnapshotManifest) -> ActiveSnapshot:
        """Load a verified snapshot directory (index with ef from the manifest, rows, projection)."""
        directory = Path(directory).resolve()
        try:
            items_rows = read_rows(directory / ITEMS)
            vector_rows = read_rows(directory / VECTORS) if (directory / VECTORS).is_file() else None
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise SnapshotLoadError("bad_items", str(exc)) from exc
        items = _items(directory, items_rows)
        skus = tuple(sorted(items))
        pos = {s: i for i, s in enumerate(skus)}
        if vector_rows is None:  # one vector per item, labelled in items.jsonl order
            vector_rows = [{"label": i, "sku": r.get("sku")} for i, r in enumerate(items_rows)]
        try:
            labels = [(int(r["label"]), str(r["sku"])) for r in vector_rows]
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotLoadError("bad_items", f"{VECTORS}: {exc}") from exc
        if len(labels) != manifest.vector_count:
            raise SnapshotLoadError(
                "bad_items", f"{len(labels)} vector rows, manifest says {manifest.vector_count}"
            )
        top = max((lbl for lbl, _ in labels), default=-1)
        if top >= 1 << 31 or any(lbl < 0 for lbl, _ in labels):
            raise SnapshotLoadError("bad_items", "vector labels out of range")
        label_sku = np.full(top + 1, -1, dtype=np.int64)
        for lbl, sku in labels:
            if sku not in pos:
                raise SnapshotLoadError("bad_items", f"vector label {lbl} names unknown sku {sku!r}")
            label_sku[lbl] = pos[sku]
        projection = _projection(directory, manifest)
        try:
            not_carried = NotCarried.from_manifest(
                directory, manifest.extra, manifest.dim, list(manifest.files)
            )
        except (OSError, ValueError) as exc:
            raise SnapshotLoadError("bad_items", str(exc)) from exc
        # An applied delta's index still holds its deleted vectors (marked, never returned by a search).
        applied = is_applied(manifest)
        try:
            index = vindex.load(
                directory / INDEX,
                dim=manifest.dim,
                ef=manifest.hnsw.ef,
                count=None if applied else manifest.vector_count,
            )
        except (vindex.IndexFileError, OSError) as exc:
            raise SnapshotLoadError("bad_index", str(exc)) from exc
        if index.count < manifest.vector_count:
            raise SnapshotLoadError(
                "bad_index", f"{index.count} vectors in the index, manifest says {manifest.vector_count}"
            )
        return cls(
            directory, manifest, index, label_sku, skus, MappingProxyType(items), projection, not_carried
        )

    def project(self, vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Model-space unit vectors -> index space (projection then renormalise), as float32 rows."""
        q = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if q.shape[1] != self.manifest.model_dim:
            raise ValueError(f"query dim {q.shape[1]} != model dim {self.manifest.model_dim}")
        if self._projection is not None:
            q = self._projection.apply(q)
        return np.ascontiguousarray(q, dtype=np.float32)

    def search(self, vectors: npt.NDArray[np.float32], k: int) -> list[list[Hit]]:
        """Top-k distinct skus per query row, best first (scores are cosine similarities).

        A store photo's nearest vectors are mostly other photos of the same product (grocery: ~30 per
        sku), so a fixed over-fetch often filled one sku and left "Similar items" empty: the fetch grows
        (x4, up to the whole index) until every row has k distinct skus or nothing is left to fetch.
        """
        q = self.project(vectors)
        count = self.index.count
        if count == 0:
            return [[] for _ in range(q.shape[0])]
        # First fetch sized to the snapshot: with ~11 vectors per sku (catalog photo + 10 store photos) a
        # fixed k*4 refetched for 93% of held items and doubled search p50 (bench/loop.py).
        per_sku = count / max(1, len(self._skus))
        fetch = min(count, k * max(OVERFETCH, math.ceil(1.5 * per_sku)))
        while True:
            out = self._distinct(q, k, fetch)
            if fetch >= count or all(len(hits) >= min(k, len(self._skus)) for hits in out):
                return out
            fetch = min(count, fetch * OVERFETCH)

    def _distinct(self, q: npt.NDArray[np.float32], k: int, fetch: int) -> list[list[Hit]]:
        labels, sims = self.index.search(q, fetch)
        known = (labels >= 0) & (labels < self._label_sku.size)
        positions = np.where(known, self._label_sku[np.where(known, labels, 0)], -1)  # one numpy pass
        out: list[list[Hit]] = []
        for row_pos, row_sims in zip(positions.tolist(), sims.tolist(), strict=True):
            hits: list[Hit] = []
            seen: set[int] = set()
            for p, sim in zip(row_pos, row_sims, strict=True):
                if p < 0 or p in seen:
                    continue
                seen.add(p)
                sku = self._skus[p]
                it = self._items[sku]
                hits.append(Hit(sku, it.title, it.price, it.location, it.thumbnail, sim))
                if len(hits) == k:
                    break
            out.append(hits)
        return out

    def not_carried(self, vectors: list[npt.NDArray[np.float32]], top1: float) -> bool:
        """True when the held item's frames are nearer a not-carried photo than ``top1`` (its best
        product's score); scored like ``aggregate``: the mean vector's and the frames' average similarity."""
        if self._not_carried is None or not vectors:
            return False
        v = np.stack([np.asarray(x, dtype=np.float32) for x in vectors])
        best = self._not_carried.best(self.project(v))
        score = float(best[0])
        if len(v) > 1:
            mean = v.mean(axis=0)
            norm = float(np.linalg.norm(mean))
            mean = mean / norm if norm > 0 else v[0]
            score = 0.5 * (float(self._not_carried.best(self.project(mean[None, :]))[0]) + float(best.mean()))
        return self._not_carried.rejects(top1, score)

    def items(self) -> Mapping[str, Item]:
        """sku -> Item (title, price, location, absolute thumbnail path) for the screen."""
        return self._items

    def check_canaries(self) -> None:
        """Each manifest canary embedding must find its sku at top-1; SnapshotLoadError otherwise."""
        for i, canary in enumerate(self.manifest.canary):
            try:
                vec = np.frombuffer(base64.b64decode(canary.embedding, validate=True), dtype="<f4")
            except (binascii.Error, ValueError) as exc:
                raise SnapshotLoadError("canary_failed", f"canary {i} embedding unreadable: {exc}") from exc
            if vec.size != self.manifest.model_dim:
                raise SnapshotLoadError("canary_failed", f"canary {i} has {vec.size} dims")
            hits = self.search(vec.astype(np.float32)[None, :], 1)[0]
            got = hits[0].sku if hits else None
            if got != canary.sku:
                raise SnapshotLoadError("canary_failed", f"canary {i} expected {canary.sku!r}, top-1 {got!r}")

    def __repr__(self) -> str:
        return f"ActiveSnapshot(v{self.version}, {self.index.count} vectors, {len(self._items)} items)"


def _opt_str(v: object) -> str | None:
    return None if v is None else str(v)


def _items(directory: Path, rows: list[dict[str, Any]]) -> dict[str, Item]:
    items: dict[str, Item] = {}
    for n, r in enumerate(rows, 1):
        sku = r.get("sku")
        if not isinstance(sku, str) or not sku:
            raise SnapshotLoadError("bad_items", f"{ITEMS}:{n} has no sku")
        thumb = r.get("thumbnail")
        thumb_path = None
        if isinstance(thumb, str) and thumb:
            p = (directory / thumb).resolve()
            if p.parent != directory and directory not in p.parents:
                raise SnapshotLoadError("bad_items", f"{ITEMS}:{n} thumbnail escapes the snapshot")
            thumb_path = p if p.is_file() else None
        items[sku] = Item(
            sku, str(r.get("title") or ""), _opt_str(r.get("price")), _opt_str(r.get("location")), thumb_path
        )
    return items


def _projection(directory: Path, m: SnapshotManifest) -> Adapter | None:
    if m.projection is None:
        return None
    p = m.projection
    try:
        return Adapter.from_bytes(
            read_capped(directory / p.file, 4 * p.in_dim * (1 + p.out_dim)), p.in_dim, p.out_dim
        )
    except (OSError, ValueError) as exc:
        raise SnapshotLoadError("bad_projection", f"{p.file}: {exc}") from exc

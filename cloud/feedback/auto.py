"""The automatic pre-approval rule: a confirmation that agrees with the catalog is approved without a person.

A customer's "this one" is approved as ``auto:knn`` only when the crop's own vector, searched in the
store's current snapshot space (its projection; the snapshot's vectors plus the store photos approved
since), ranks the confirmed product first among all products, or within ``AGREE_MARGIN`` of the first.
A crop that conflicts with its neighbours (closer to another product: a likely mis-tap, or a product the
catalog cannot recognise yet) stays pending for staff; ``not_here`` and ``no_answer`` never get an
automatic decision, nor does a record a person has already decided, nor one made with another model.

``ReviewSpace.load(snapshot)`` reads the space once; ``auto_review`` judges one stored record (the
collector calls it after each ``FeedbackStore.put``), ``auto_review_all`` every pending one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cloud.feedback.store import DecisionEntry, FeedbackStore, FeedbackStoreError
from storelens import vindex
from storelens.delta import VECTORS, read_rows
from storelens.projection import Adapter, normalize_rows
from storelens.snapshot import read_manifest_unverified

_LOGGER = logging.getLogger(__name__)

RULE = "knn"
WHO = f"auto:{RULE}"
# Cosine the confirmed product may trail the best product by and still be approved. 0 would approve
# only top-1 agreement; a small margin lets through true photos of look-alike products (two apple
# varieties) at the cost of mis-taps onto a look-alike. Kept tight: a missed approval only waits for staff.
AGREE_MARGIN = 0.02


class AutoReviewError(Exception):
    """The snapshot cannot serve as the review space (names the snapshot and the problem)."""


@dataclass(slots=True)
class ReviewSpace:
    """One store's current search space: projected unit vectors and the product of each."""

    model_id: str
    model_dim: int
    projection: Adapter | None
    vectors: npt.NDArray[np.float32]  # (n, dim) in the snapshot's (projected) space
    skus: list[str]

    @classmethod
    def load(cls, snapshot: Path) -> ReviewSpace:
        """Read a full (or applied) snapshot directory; AutoReviewError when it is not one."""
        snap = Path(snapshot)
        try:
            m = read_manifest_unverified(snap)
            rows = read_rows(snap / VECTORS)
            proj = None
            if m.projection is not None:
                p = m.projection
                proj = Adapter.from_bytes((snap / p.file).read_bytes(), p.in_dim, p.out_dim)
            index = vindex.load(snap / "index.bin", dim=m.dim, ef=m.hnsw.ef)
            labels = [int(r["label"]) for r in rows]
            raw = index.raw.get_items(labels, return_type="numpy")  # type: ignore[attr-defined]
        except (OSError, ValueError, KeyError, RuntimeError, vindex.IndexFileError) as exc:
            raise AutoReviewError(f"{snap} is not a usable snapshot: {exc}") from exc
        vecs = normalize_rows(np.asarray(raw, np.float32).reshape(len(labels), m.dim))
        return cls(m.model_id, m.model_dim, proj, vecs, [str(r["sku"]) for r in rows])

    def project(self, model_vectors: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Model-space vectors -> unit vectors in this space."""
        x = normalize_rows(np.atleast_2d(np.asarray(model_vectors, np.float32)))
        return self.projection.apply(x) if self.projection is not None else x

    def add(self, model_vectors: npt.ArrayLike, skus: list[str]) -> None:
        """Store photos approved since the snapshot: they vote like its own vectors."""
        if skus:
            self.vectors = np.concatenate([self.vectors, self.project(model_vectors)])
            self.skus = self.skus + list(skus)

    def agrees(self, model_vector: npt.ArrayLike, sku: str, margin: float = AGREE_MARGIN) -> bool:
        """True when ``sku`` is the best-scoring product for the vector, or within ``margin`` of it."""
        if sku not in self.skus or not len(self.vectors):
            return False
        sims = (self.vectors @ self.project(model_vector)[0]).astype(np.float32)
        best: dict[str, float] = {}
        for s, v in zip(self.skus, sims.tolist(), strict=True):
            if v > best.get(s, -np.inf):
                best[s] = v
        return best[sku] >= max(best.values()) - margin


def auto_review(fb: FeedbackStore, record_id: str, space: ReviewSpace) -> DecisionEntry | None:
    """Pre-approve one record when the rule holds; None when it stays as it is (see the module doc)."""
    rec = fb.get(record_id)
    if rec.answer != "confirmed" or rec.status != "pending" or rec.decided_by is not None:
        return None
    if rec.model != space.model_id:
        _LOGGER.info("record %s: model %s is not the snapshot's: left for staff", record_id, rec.model[:12])
        return None
    try:
        vec = fb.vector(record_id)
    except (FeedbackStoreError, ValueError) as exc:
        _LOGGER.warning("record %s: unreadable vector (%s): left for staff", record_id, exc)
        return None
    if vec.shape != (space.model_dim,) or rec.chosen_sku is None:
        return None
    if not space.agrees(vec, rec.chosen_sku):
        return None
    entry = fb.decide(record_id, "approved", who=WHO, sku=rec.chosen_sku, note="agrees with its neighbours")
    space.add(vec[None, :], [rec.chosen_sku])
    return entry


@dataclass(frozen=True, slots=True)
class AutoSummary:
    approved: int
    left_pending: int
    not_confirmations: int


def auto_review_all(fb: FeedbackStore, store: str, space: ReviewSpace) -> AutoSummary:
    """Run the rule over a store's undecided records (oldest first), with its approved photos voting."""
    records = fb.records(store)
    approved = [r for r in records if r.status == "approved" and r.label_sku and r.model == space.model_id]
    if approved:
        space.add(np.stack([fb.vector(r.record_id) for r in approved]), [str(r.label_sku) for r in approved])
    n_ok = n_wait = n_other = 0
    for r in records:
        if r.answer != "confirmed":
            n_other += r.decided_by is None
            continue
        if r.status != "pending" or r.decided_by is not None:
            continue
        if auto_review(fb, r.record_id, space) is not None:
            n_ok += 1
        else:
            n_wait += 1
    return AutoSummary(n_ok, n_wait, n_other)

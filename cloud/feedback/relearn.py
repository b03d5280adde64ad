"""Approved store photos -> catalog images of their products, for `storelens catalog build --feedback`.

The build adds each approved crop (``FeedbackStore.approved(store)``) to its product's images, so it is
fetched, decoded, embedded and cached like any catalog image (same bundle, same preprocessing). After
embedding, at most ``cap`` store photos per product are kept: the most diverse ones (farthest-point
selection from the product's own catalog photos, in model space). Every vector row of the snapshot says
where its image came from: ``source`` ``catalog`` or ``store`` (with the feedback ``record`` id).

Deletion follows from building from the decisions as they stand: a photo rejected (or re-assigned) since
the last build is not approved any more, so it is not in the next snapshot (a delta deletes its vector).
Records of another store or of a product the store's catalog lacks are skipped and counted.

Photos staff marked "not carried" (a customer's "Not here" for a product the store does not sell) are
embedded with the catalog (under the pseudo-sku ``NOT_CARRIED_SKU``), split off again before the index
(``split_not_carried``) and shipped beside it as the snapshot's rejection rows
(``storelens.matching``: a query nearer one of them than to any product is answered "not found").
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cloud.catalog import Item
from cloud.featurize import Features
from cloud.feedback.store import (
    CorruptCrop,
    FeedbackSource,
    FeedbackStore,
    FeedbackStoreError,
    open_feedback_store,
)
from storelens.matching import NOT_CARRIED_FILE, NOT_CARRIED_KEY

_LOGGER = logging.getLogger(__name__)

# Store photos kept per product: each one is a vector in every kiosk's index and a calibration query;
# past ~20 the extra photos are mostly the same views again (store_loop.md: diversity matters, not count).
DEFAULT_CAP = 20
SOURCE_CATALOG = "catalog"
SOURCE_STORE = "store"
NOT_CARRIED_SKU = "storelens:not-carried"  # pseudo-item that carries the not-carried photos through featurize
# Not-carried photos shipped at most (the most recent): each one is compared with every query on the kiosk
# (brute force, 80 floats each); 2,000 cost ~0.1 ms a query.
MAX_NOT_CARRIED = 2000
# Mis-tap filter (``likely_mistaps``), chosen on a simulation over TRAIN photos only (10% mis-taps onto one
# of the 5 shown products; held-out train photos as queries): margin 0.3 caught 62-64% of mis-taps for
# 1-4% of true photos at 5-10 photos a product (0.2: 82% for 2-7%, but a lower R@1); with 3 photos a
# product any margin lost more true photos than it saved (R@1 0.711 -> 0.674), hence the minimum.
MISTAP_MARGIN = 0.3
MISTAP_MIN_PHOTOS = 5
MISTAP_FOLDS = 5
# A query is "not found" when a not-carried photo is at least as near as its best product + a margin: at
# least 0 (the nearest-neighbour decision), raised until at most NOT_CARRIED_KNOWN_LOSS of the store
# photos answered right (each left out in turn) would be turned away. Measured in `make eval` (k = 1):
# margin 0 turned away 7 points of in-catalog R@1, store photos being nearer any store photo than an
# iconic shot; the same share as the "no match" rule gives up (OPEN_SET_KNOWN_LOSS).
NOT_CARRIED_MARGIN = 0.0
NOT_CARRIED_KNOWN_LOSS = 0.01
# With one store photo a product, a held-out photo leaves its product with the catalog shot only, unlike
# any kiosk query: that calibration said margin 0 and the rows then cost 6.6-7.1 points of R@1 at k = 1
# (`make eval`). So only products with two or more store photos calibrate, and without 20 right answers
# among them no rows ship.
NOT_CARRIED_MIN_PHOTOS = 2
NOT_CARRIED_MIN_RIGHT = 20
# A centre crop (this share of each side) of every kept store photo joins the snapshot's LDA fit (never
# the index): one more embed per store photo, cached. Chosen on train-only simulations (scripts/
# eval_levers.py, 5 seeds, two splits): +0.0 to +1.2 points of R@1 at k = 1-10, clean and with mis-taps.
# Val through `eval_loop` (mis-taps): R@1 +4.1 points at k = 5, +1.3 at k = 10, R@5 +2.4 at k = 1, but R@1
# -2.0 at k = 1 (6 of 296 queries); docs/NOTES.md has the table. Flipped views and all three (flip, crop,
# flipped crop) measured no better; the iconic image's augmented views in the fit measured worse.
STORE_VIEW_CROP = 0.8
STORE_VIEW_TAG = "centre0.8"


class FeedbackError(Exception):
    """The feedback folder cannot be read (names the folder and the problem)."""


@dataclass(frozen=True, slots=True)
class StorePhoto:
    record_id: str
    sku: str
    path: Path  # the crop JPEG (content-addressed in the feedback store)


@dataclass(slots=True)
class Selection:
    """Approved store photos of the store's products, and what was left out and why."""

    photos: dict[str, list[StorePhoto]] = field(default_factory=dict)  # sku -> photos, oldest first
    approved: int = 0  # approved records of this store
    skipped_other_store: int = 0
    skipped_unknown_sku: int = 0
    skipped_missing_crop: int = 0
    unknown_skus: list[str] = field(default_factory=list)
    not_carried: list[StorePhoto] = field(default_factory=list)  # staff: "the store does not sell this"

    def record_of(self) -> dict[str, str]:
        """Crop path (as the catalog image source) -> feedback record id."""
        return {str(p.path): p.record_id for ps in self.photos.values() for p in ps}

    def not_carried_paths(self) -> set[str]:
        return {str(p.path) for p in self.not_carried}


def select_approved(feedback: FeedbackSource, store: str, items: list[Item]) -> Selection:
    """The approved store photos of ``items`` (the store's catalog) in a feedback store (a folder,
    ``s3://bucket/prefix`` or one already open); FeedbackError when it cannot be read."""
    try:
        fb = open_feedback_store(feedback)
    except FeedbackStoreError as exc:
        raise FeedbackError(str(exc)) from exc
    try:
        records = fb.records()  # read once: approved photos of every store (others' are counted)
        every = [r for r in records if r.status == "approved" and r.label_sku]
        not_carried = [r for r in records if r.store == store and r.status == "not_carried"]
        not_carried = not_carried[-MAX_NOT_CARRIED:]
    except (FeedbackStoreError, OSError, ValueError, KeyError) as exc:
        raise FeedbackError(f"cannot read feedback in {fb.where}: {exc}") from exc
    skus = {it.sku for it in items}
    sel = Selection()
    unknown: set[str] = set()
    for rec in every:
        if rec.store != store:
            sel.skipped_other_store += 1
            continue
        sel.approved += 1
        sku = str(rec.label_sku)
        if sku not in skus:
            sel.skipped_unknown_sku += 1
            unknown.add(sku)
            continue
        path = _crop(fb, rec.record_id)
        if path is None:
            sel.skipped_missing_crop += 1
            continue
        sel.photos.setdefault(sku, []).append(StorePhoto(rec.record_id, sku, path.resolve()))
    sel.unknown_skus = sorted(unknown)
    for rec in not_carried:
        path = _crop(fb, rec.record_id)
        if path is not None:
            sel.not_carried.append(StorePhoto(rec.record_id, NOT_CARRIED_SKU, path.resolve()))
    return sel


def _crop(fb: FeedbackStore, record_id: str) -> Path | None:
    """The record's crop as a local file; None (logged) when it is missing or corrupt. Any other failure
    to read it (S3 unreachable) is a FeedbackError: a build without the photos would delete them."""
    try:
        path = fb.crop_path(record_id)
    except CorruptCrop as exc:
        _LOGGER.warning("approved record %s: %s: skipped", record_id, exc)
        return None
    except FeedbackStoreError as exc:
        raise FeedbackError(f"cannot read the crop of {record_id}: {exc}") from exc
    if not path.is_file():
        _LOGGER.warning("approved record %s has no crop at %s: skipped", record_id, path)
        return None
    return path


def with_store_photos(items: list[Item], sel: Selection) -> list[Item]:
    """The items with their approved store photos appended to their images (catalog photos stay first:
    the kiosk's thumbnail is still the retailer's)."""
    out = []
    for it in items:
        extra = tuple(str(p.path) for p in sel.photos.get(it.sku, ()))
        out.append(dataclasses.replace(it, images=it.images + extra) if extra else it)
    if sel.not_carried:
        paths = tuple(dict.fromkeys(str(p.path) for p in sel.not_carried))
        out.append(Item(NOT_CARRIED_SKU, "not carried", None, None, (), paths, 0))
    return out


def split_not_carried(feats: Features) -> tuple[Features, npt.NDArray[np.float32]]:
    """The catalog's features without the not-carried photos, and those photos' (model-space) vectors."""
    mask = np.array([r.sku == NOT_CARRIED_SKU for r in feats.rows], dtype=bool)
    if not mask.any():
        return feats, np.zeros((0, feats.dim), np.float32)
    thumbs = {k: v for k, v in feats.thumbs.items() if k != NOT_CARRIED_SKU}
    rows = [r for r, m in zip(feats.rows, mask, strict=True) if not m]
    kept = dataclasses.replace(feats, rows=rows, vectors=feats.vectors[~mask], thumbs=thumbs)
    return kept, np.ascontiguousarray(feats.vectors[mask], dtype=np.float32)


def farthest_points(
    anchors: npt.NDArray[np.float32], candidates: npt.NDArray[np.float32], k: int
) -> list[int]:
    """Indexes of ``k`` candidates picked greedily, each the farthest (cosine) from the anchors and the
    ones already picked; ties go to the earlier candidate. Unit rows expected."""
    n = len(candidates)
    if k >= n:
        return list(range(n))
    if k <= 0:
        return []
    # Nearest similarity of each candidate to what is already chosen (the catalog photos to start with).
    near = (candidates @ anchors.T).max(axis=1) if len(anchors) else np.full(n, -np.inf, np.float32)
    picked: list[int] = []
    for _ in range(k):
        masked = near.copy()
        masked[picked] = np.inf
        i = int(np.argmin(masked))
        picked.append(i)
        near = np.maximum(near, candidates @ candidates[i])
    return sorted(picked)


def likely_mistaps(
    vectors: npt.NDArray[np.float32], skus: list[str], is_store: npt.NDArray[np.bool_], *,
    min_photos: int = MISTAP_MIN_PHOTOS, margin: float = MISTAP_MARGIN, folds: int = MISTAP_FOLDS,
) -> npt.NDArray[np.bool_]:  # fmt: skip
    """Store photos whose label their neighbours contradict: cross-fitted (each fold's photos scored by a
    shrinkage-LDA space fitted without them), a photo is flagged when another product beats its own
    product's best image by more than ``margin``. Only products with ``min_photos`` store photos are
    judged: with fewer, a true photo is too often nearer another product. Returns a mask over rows."""
    from cloud.retrieval import fit_lda_adapter, item_scores

    flagged = np.zeros(len(skus), dtype=bool)
    names, ids = np.unique(np.asarray(skus), return_inverse=True)
    counts = np.bincount(ids[is_store], minlength=len(names))
    judged = np.flatnonzero(is_store & (counts[ids] >= min_photos))
    if not len(judged) or len(names) < 3:
        return flagged
    fold = np.random.default_rng(0).permutation(len(judged)) % folds
    x = np.asarray(vectors, np.float32)
    for f in range(folds):
        test = judged[fold == f]
        train = np.setdiff1d(np.arange(len(skus)), test)
        adapter = fit_lda_adapter(x[train], ids[train])
        scores = item_scores(adapter.apply(x[test]) @ adapter.apply(x[train]).T, ids[train], len(names))
        own = scores[np.arange(len(test)), ids[test]]
        scores[np.arange(len(test)), ids[test]] = -np.inf
        flagged[test] = own < scores.max(axis=1) - margin
    return flagged


def cap_store_photos(feats: Features, sel: Selection, cap: int) -> tuple[Features, dict[str, Any]]:
    """Leave out likely mis-taps (``likely_mistaps``: they wait for staff), then keep at most ``cap``
    store photos per product (farthest-point selection); returns the trimmed features and the feedback
    part of the build report."""
    if cap < 0:
        raise ValueError(f"store photo cap must be >= 0, got {cap}")
    record_of = sel.record_of()
    is_store = np.array([r.source in record_of for r in feats.rows], dtype=bool)
    suspect = likely_mistaps(feats.vectors, [r.sku for r in feats.rows], is_store)
    if suspect.any():
        rows = [r for r, s in zip(feats.rows, suspect, strict=True) if not s]
        feats = dataclasses.replace(feats, rows=rows, vectors=feats.vectors[~suspect])
    keep = np.ones(len(feats.rows), dtype=bool)
    dropped = 0
    by_sku: dict[str, tuple[list[int], list[int]]] = {}
    for i, r in enumerate(feats.rows):
        own, store = by_sku.setdefault(r.sku, ([], []))
        (store if r.source in record_of else own).append(i)
    for own, store in by_sku.values():
        if len(store) <= cap:
            continue
        chosen = farthest_points(feats.vectors[own], feats.vectors[store], cap)
        for j, i in enumerate(store):
            if j not in chosen:
                keep[i] = False
        dropped += len(store) - cap
    rows = [r for r, k in zip(feats.rows, keep, strict=True) if k]
    kept = sum(r.source in record_of for r in rows)
    trimmed = dataclasses.replace(feats, rows=rows, vectors=feats.vectors[keep])
    report: dict[str, Any] = {
        "approved": sel.approved,
        "store_photos": kept,
        "products_with_store_photos": len({r.sku for r in rows if r.source in record_of}),
        "over_cap": dropped,
        "cap": cap,
        "likely_mistaps_left_out": int(suspect.sum()),
        "skipped_other_store": sel.skipped_other_store,
        "skipped_unknown_sku": sel.skipped_unknown_sku,
        "unknown_skus": sel.unknown_skus[:20],
        "skipped_missing_crop": sel.skipped_missing_crop,
        "bad_crops": sum(1 for b in feats.bad_images if b["source"] in record_of),
    }
    return trimmed, report


def vector_rows(feats: Features, sel: Selection | None) -> list[dict[str, Any]]:
    """The snapshot's vector rows with provenance: ``source`` catalog|store, and a store photo's record."""
    record_of = sel.record_of() if sel is not None else {}
    rows: list[dict[str, Any]] = []
    for i, r in enumerate(feats.rows):
        row: dict[str, Any] = {"label": i, "sku": r.sku, "image": r.image_sha256, "source": SOURCE_CATALOG}
        rid = record_of.get(r.source)
        if rid is not None:
            row.update(source=SOURCE_STORE, record=rid)
        rows.append(row)
    return rows


def not_carried_reason(base_extra: dict[str, Any], not_carried: npt.NDArray[np.float32]) -> str | None:
    """Why a build must be full rather than a delta: rejection rows ship only with full snapshots (a delta
    would inherit neither its base's rows nor ship new ones). None when neither side has any."""
    if len(not_carried) or NOT_CARRIED_KEY in base_extra:
        return "not-carried photos (rejection rows) ship only in full snapshots"
    return None


def not_carried_margin(
    vectors: npt.NDArray[np.float32], skus: list[str], is_store: npt.NDArray[np.bool_],
    not_carried: npt.NDArray[np.float32], known_loss: float = NOT_CARRIED_KNOWN_LOSS,
) -> float | None:  # fmt: skip
    """The margin the rejection rows need to turn away at most ``known_loss`` of right answers, from the
    store photos themselves (model space in): cross-fitted like ``likely_mistaps`` (each fold's photos are
    queries of a space fitted without them), over those answered right, the ``1 - known_loss`` quantile of
    (best not-carried similarity - best product similarity), at least ``NOT_CARRIED_MARGIN``. Only store
    photos of products with ``NOT_CARRIED_MIN_PHOTOS`` or more are queries, so that, like a kiosk's query,
    each still has store photos of its product in the index. None (ship no rows) with fewer than
    ``NOT_CARRIED_MIN_RIGHT`` right answers: rows nobody calibrated cost measured R@1 (see the constants)."""
    from cloud.retrieval import fit_lda_adapter, item_scores

    names, ids = np.unique(np.asarray(skus), return_inverse=True)
    counts = np.bincount(ids[is_store], minlength=len(names))
    queries = np.flatnonzero(is_store & (counts[ids] >= NOT_CARRIED_MIN_PHOTOS))
    if len(queries) < NOT_CARRIED_MIN_RIGHT or not len(not_carried) or len(names) < 3:
        return None
    fold = np.random.default_rng(0).permutation(len(queries)) % MISTAP_FOLDS
    gaps: list[npt.NDArray[np.float32]] = []
    for f in range(MISTAP_FOLDS):
        test = queries[fold == f]
        train = np.setdiff1d(np.arange(len(skus)), test)
        adapter = fit_lda_adapter(vectors[train], ids[train])
        q = adapter.apply(vectors[test])
        scores = item_scores(q @ adapter.apply(vectors[train]).T, ids[train], len(names))
        right = scores.argmax(axis=1) == ids[test]
        gap = (q @ adapter.apply(not_carried).T).max(axis=1) - scores.max(axis=1)
        gaps.append(gap[right].astype(np.float32))
    ok = np.concatenate(gaps)
    if len(ok) < NOT_CARRIED_MIN_RIGHT:
        return None
    return max(NOT_CARRIED_MARGIN, float(np.quantile(ok, 1.0 - known_loss)))


def write_not_carried(
    directory: Path, projection: Any, not_carried: npt.NDArray[np.float32], feats: Features,
    sel: Selection | None,
) -> dict[str, Any] | None:
    """Write the rejection rows (index space, unit rows) into a snapshot being built, with the margin the
    store photos calibrate (``not_carried_margin``); the manifest's ``extra["not_carried"]`` entry, or None
    when there are none."""
    from storelens.fsutil import atomic_write_bytes
    from storelens.projection import normalize_rows

    if not len(not_carried) or sel is None:
        return None
    x = normalize_rows(not_carried)
    rows = projection.apply(x) if projection is not None else x
    rows = np.ascontiguousarray(normalize_rows(rows), dtype="<f4")
    record_of = sel.record_of()
    is_store = np.array([r.source in record_of for r in feats.rows], dtype=bool)
    margin = not_carried_margin(normalize_rows(feats.vectors), [r.sku for r in feats.rows], is_store, x)
    if margin is None:
        _LOGGER.warning("%d not-carried photos not shipped: too few store photos to calibrate them", len(x))
        return None
    atomic_write_bytes(Path(directory) / NOT_CARRIED_FILE, rows.tobytes())
    return {"file": NOT_CARRIED_FILE, "count": len(rows), "margin": round(margin, 6)}


def centre_crop(image: npt.NDArray[np.uint8], share: float = STORE_VIEW_CROP) -> npt.NDArray[np.uint8]:
    """The centre ``share`` of each side of an image (at least one pixel)."""
    h, w = image.shape[:2]
    ch, cw = max(1, round(h * share)), max(1, round(w * share))
    y, x = (h - ch) // 2, (w - cw) // 2
    return np.ascontiguousarray(image[y : y + ch, x : x + cw])


def store_photo_views(
    feats: Features, sel: Selection, embedder: Any, cache: Any = None, fingerprint: str = ""
) -> dict[str, npt.NDArray[np.float32]]:
    """Model-space vectors of a centre crop (``STORE_VIEW_CROP``) of each store photo in ``feats``, by
    crop path (the row's source): extra samples for the snapshot's LDA fit. ``cache`` (a
    ``cloud.cache.EmbeddingCache``) keeps them under ``fingerprint`` + the view's tag. A crop that cannot
    be read or decoded is skipped (its photo was embedded, so this is rare) and logged."""
    from models.errors import ModelError
    from models.images import decode_image

    record_of = sel.record_of()
    model = f"{fingerprint}:{STORE_VIEW_TAG}"
    out: dict[str, npt.NDArray[np.float32]] = {}
    todo: list[tuple[str, str, npt.NDArray[np.uint8]]] = []
    for r in feats.rows:
        if r.source not in record_of or r.source in out:
            continue
        hit = cache.get(r.image_sha256, model, feats.dim) if cache is not None else None
        if hit is not None:
            out[r.source] = np.asarray(hit, np.float32)
            continue
        try:
            image = decode_image(Path(r.source).read_bytes())
        except (OSError, ModelError, ValueError) as exc:
            _LOGGER.warning("store photo %s: no view for the fit (%s)", r.source, exc)
            continue
        todo.append((r.source, r.image_sha256, centre_crop(image)))
    for start in range(0, len(todo), 32):
        chunk = todo[start : start + 32]
        vecs = np.asarray(embedder.embed([im for _, _, im in chunk]), np.float32)
        for (src, sha, _), v in zip(chunk, vecs, strict=True):
            out[src] = v
            if cache is not None:
                cache.put(sha, model, v)
    return out


def view_rows(
    feats: Features, views: dict[str, npt.NDArray[np.float32]]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The views of the store photos still in ``feats`` (after the mis-tap filter and the cap), with the
    row of ``feats`` each is a view of: what ``open_set.fit_for_snapshot`` adds to the LDA fit."""
    rows = [i for i, r in enumerate(feats.rows) if r.source in views]
    if not rows:
        return np.zeros((0, feats.dim), np.float32), np.zeros(0, np.int64)
    vecs = np.stack([views[feats.rows[i].source] for i in rows]).astype(np.float32)
    return vecs, np.asarray(rows, np.int64)

"""Retrieval quality: a catalog-fitted adapter, item-level scoring and a calibrated "no match" threshold.

What pays on the grocery data set (see scripts/eval_grocery.py for the figures):
- an LDA adapter fitted at snapshot build time on the catalog's own vectors (plus augmented views of
  each catalog image), shipped as the snapshot's ``projection.bin``; the kiosk applies it with one
  small matmul (``Adapter.apply``);
- scoring items, not images: an item's score is its best image (``item_scores``);
- averaging the unit embeddings of the steady frames the kiosk already has (``aggregate_frames``);
- a threshold calibrated from catalog-only statistics by simulating unseen items and held-out images
  (``cloud.open_set``, built on ``holdout_round`` and ``_simulate`` here).
Nothing here ever sees query photos.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from storelens.projection import Adapter as Adapter  # re-exported: part of the catalog API
from storelens.projection import normalize_rows as normalize_rows

_LOGGER = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

# Shrinkage of the within-item scatter towards its mean eigenvalue: 0 trusts a few hundred photos per
# 1280 dims (overfits the catalog), 1 is plain class-mean projection; 0.2-0.5 measured flat, 0.3 chosen.
DEFAULT_SHRINKAGE = 0.3
# Output dims: LDA has at most n_items - 1 useful directions; 256 caps big catalogs (and the snapshot).
MAX_OUT_DIM = 256
# Share of correct in-catalog answers the calibrated threshold may turn into "no match".
DEFAULT_MAX_KNOWN_LOSS = 0.03
# Share of items treated as unseen in each calibration round (mirrors the 20% open-set protocol).
HOLDOUT_FRACTION = 0.2
CALIBRATION_ROUNDS = 5
# Below these a threshold is a guess: right held-out answers over all rounds (5 rounds x 4 items), and
# distinct items with two or more images (more rounds over one item's photos only repeat that item).
MIN_KNOWN_ANSWERS = 20
MIN_MULTI_IMAGE_ITEMS = 4


class CalibrationError(ValueError):
    """The catalog cannot calibrate a "no match" threshold: too few items have a second image to hold out.

    On the grocery data set with one studio image per item (protocol A of scripts/eval_grocery.py), a rule
    calibrated on augmented views of each image, the only other thing to query with, turned away 83-96%
    of the right answers to store photos (in-catalog R@1 0.02-0.07 at its threshold against 0.42 free):
    store photos sit far below studio-to-studio similarity, even that of other items' studio images
    (median confidence 0.91 against 0.77 for store photos answered right)."""


def fit_lda_adapter(
    vectors: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    shrinkage: float = DEFAULT_SHRINKAGE,
    out_dim: int | None = None,
) -> Adapter:
    """Fit a shrinkage-LDA adapter on catalog vectors (originals plus augmented views) and their item labels.

    Whitens the within-item scatter (shrunk towards isotropic) and keeps the directions that best
    separate item means: same item -> close, different items -> far, fitted in well under a second.
    """
    x = np.asarray(vectors, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"vectors {x.shape} and labels {y.shape} do not match")
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
    items, inverse = np.unique(y, return_inverse=True)
    if len(items) < 2:
        raise ValueError("an adapter needs at least two items")
    dim = x.shape[1]
    counts = np.bincount(inverse).astype(np.float64)
    means = np.zeros((len(items), dim))
    np.add.at(means, inverse, x)
    means /= counts[:, None]
    mu = x.mean(0)
    within = x - means[inverse]
    sw = within.T @ within / len(x)
    sw = (1.0 - shrinkage) * sw + shrinkage * (np.trace(sw) / dim + 1e-12) * np.eye(dim)
    eig_w, vec_w = np.linalg.eigh(sw)
    whiten = vec_w / np.sqrt(np.maximum(eig_w, 1e-12))
    centred = (means - mu) @ whiten
    sb = centred.T @ centred / len(items)
    eig_b, vec_b = np.linalg.eigh(sb)
    keep = min(out_dim or MAX_OUT_DIM, len(items) - 1, dim)
    order = np.argsort(-eig_b)[:keep]
    matrix = whiten @ vec_b[:, order]
    _LOGGER.info("LDA adapter: %d vectors, %d items, %d -> %d dims", len(x), len(items), dim, keep)
    return Adapter(mu.astype(np.float32), matrix.astype(np.float32))


def item_scores(
    similarities: npt.ArrayLike, vector_items: npt.ArrayLike, n_items: int, per_item: int = 1
) -> F32:
    """(q, n_vectors) similarities -> (q, n_items): each item scores its best image (-inf if absent).

    ``per_item`` > 1 is class-level scoring: the mean of the item's ``per_item`` best images (all of them
    when it has fewer). `make eval` measures it; snapshots score by the best image (docs/NOTES.md).
    """
    s = np.asarray(similarities, dtype=np.float32)
    items = np.asarray(vector_items, dtype=np.int64)
    if per_item < 1:
        raise ValueError(f"per_item must be >= 1, got {per_item}")
    out = np.full((s.shape[0], n_items), -np.inf, dtype=np.float32)
    order = np.argsort(items, kind="stable")
    sorted_items = items[order]
    starts = np.flatnonzero(np.r_[True, sorted_items[1:] != sorted_items[:-1]])
    if per_item == 1:
        out[:, sorted_items[starts]] = np.maximum.reduceat(s[:, order], starts, axis=1)
        return out
    for start, stop in zip(starts, np.r_[starts[1:], len(order)], strict=True):
        cols = s[:, order[start:stop]]
        k = min(per_item, cols.shape[1])
        out[:, sorted_items[start]] = -np.partition(-cols, k - 1, axis=1)[:, :k].mean(axis=1)
    return out


def aggregate_frames(vectors: npt.ArrayLike) -> F32:
    """One model-space query vector from the unit embeddings of several steady frames (their mean)."""
    v = np.asarray(vectors, dtype=np.float32)
    if v.ndim != 2 or len(v) == 0:
        raise ValueError(f"need a non-empty (n, dim) array, got shape {v.shape}")
    out: F32 = normalize_rows(normalize_rows(v).mean(0))[0]
    return out


def holdout_round(x: F32, y: I64, neighbours: int, rng: np.random.Generator) -> tuple[I64, I64, I64]:
    """One simulation round: (fit rows, known-query rows, unseen items). Each item with several images
    gives one held-out known query and takes its ``neighbours`` nearest same-item images (cosine in model
    space) out of the catalog with it, leaving at least one image of the item behind; an item's only
    image stays in the index (see ``CalibrationError``)."""
    items = np.unique(y)
    unseen = rng.choice(items, size=max(1, round(HOLDOUT_FRACTION * len(items))), replace=False)
    fit: list[int] = []
    known: list[int] = []
    for item in np.setdiff1d(items, unseen):
        idx = np.flatnonzero(y == item)
        if len(idx) < 2:  # nothing to hold out: an item's only image stays in the index
            fit.append(int(idx[0]))
            continue
        held = int(rng.choice(idx))
        rest = idx[idx != held]
        drop = min(neighbours, len(rest) - 1)
        if drop > 0:
            sims = x[rest] @ x[held]
            rest = rest[np.argsort(-sims, kind="stable")[drop:]]
        known.append(held)
        fit.extend(int(i) for i in rest)
    return np.asarray(sorted(fit), np.int64), np.asarray(known, np.int64), unseen.astype(np.int64)


@dataclass(frozen=True, slots=True)
class _Round:
    """One calibration round as the snapshot build would see it: an adapter refitted without the held-out
    images, the projected catalog that remains, and the projected queries (known ones first)."""

    fit: I64  # catalog rows kept this round
    catalog: F32
    queries: F32
    known_labels: I64  # labels of the first len(known_labels) queries; the rest are unseen items


def _aug_inputs(
    aug_vectors: npt.ArrayLike | None, aug_source: npt.ArrayLike | None
) -> tuple[F32 | None, I64 | None]:
    xa = None if aug_vectors is None else np.asarray(aug_vectors, dtype=np.float32)
    src = None if aug_source is None else np.asarray(aug_source, dtype=np.int64)
    if (xa is None) != (src is None):
        raise ValueError("aug_vectors and aug_source go together")
    return xa, src


def _simulate(
    x: F32,
    y: I64,
    xa: F32 | None,
    src: I64 | None,
    split: tuple[I64, I64, I64],
    *,
    fit_adapter: bool,
    fit_with_aug: bool,
    shrinkage: float,
) -> _Round:
    """Refit on ``split``'s fit rows (plus their views), project the catalog and the held-out queries.

    Augmented views only ever join the fit (and the unseen-item queries): a view of an image that stays
    in the index is a near-duplicate of it, not a stand-in for a store photo."""
    fit, known, unseen = split
    fit_x, fit_y = x[fit], y[fit]
    if xa is not None and src is not None and fit_with_aug:
        use = np.isin(src, fit)
        fit_x, fit_y = np.vstack([fit_x, xa[use]]), np.concatenate([fit_y, y[src[use]]])
    if fit_adapter:
        adapter = fit_lda_adapter(fit_x, fit_y, shrinkage=shrinkage)
    else:
        adapter = Adapter.identity(x.shape[1])
    unseen_rows = np.flatnonzero(np.isin(y, unseen))
    q_parts = [x[known], x[unseen_rows]]
    if xa is not None and src is not None:
        q_parts.append(xa[np.isin(src, unseen_rows)])
    return _Round(fit, adapter.apply(x[fit]), adapter.apply(np.vstack(q_parts)), y[known])


class MultiImage(NamedTuple):
    """How many items have a second image to hold out, and whether that is enough to calibrate on."""

    multi: int  # items with two or more images
    items: int

    @property
    def needed(self) -> int:
        """``MIN_MULTI_IMAGE_ITEMS``, or every item of a smaller catalog."""
        return min(MIN_MULTI_IMAGE_ITEMS, self.items)

    @property
    def enough(self) -> bool:
        return self.multi >= self.needed


def multi_image_items(labels: npt.ArrayLike) -> MultiImage:
    """Count the items of ``labels`` (one per image) that have two or more images."""
    counts = np.unique(np.asarray(labels), return_counts=True)[1]
    return MultiImage(int(np.sum(counts >= 2)), len(counts))


def check_enough_answers(right: int, labels: I64) -> None:
    """CalibrationError unless enough items have a second image (``MultiImage.enough``) and the
    simulation answered ``MIN_KNOWN_ANSWERS`` held-out queries right."""
    m = multi_image_items(labels)
    if right < MIN_KNOWN_ANSWERS or not m.enough:
        raise CalibrationError(
            f"{m.multi} of {m.items} items have two or more images ({m.needed} needed; {right} "
            f"held-out right answers, {MIN_KNOWN_ANSWERS} needed); an item's only image cannot be held "
            "out as a store photo"
        )

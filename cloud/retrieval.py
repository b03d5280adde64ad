"""Retrieval quality: a catalog-fitted adapter, item-level scoring and a calibrated "no match" threshold.

What pays on the grocery data set (see scripts/eval_grocery.py for the figures):
- an LDA adapter fitted at snapshot build time on the catalog's own vectors (plus augmented views of
  each catalog image), shipped as the snapshot's ``projection.bin``; the kiosk applies it with one
  small matmul (``Adapter.apply``);
- scoring items, not images: an item's score is its best image (``item_scores``);
- averaging the unit embeddings of the steady frames the kiosk already has (``aggregate_frames``);
- a threshold calibrated from catalog-only statistics by simulating unseen items and held-out images
  (``calibrate_threshold``).
Nothing here ever sees query photos.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

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


def item_scores(similarities: npt.ArrayLike, vector_items: npt.ArrayLike, n_items: int) -> F32:
    """(q, n_vectors) similarities -> (q, n_items): each item scores its best image (-inf if absent)."""
    s = np.asarray(similarities, dtype=np.float32)
    items = np.asarray(vector_items, dtype=np.int64)
    out = np.full((s.shape[0], n_items), -np.inf, dtype=np.float32)
    order = np.argsort(items, kind="stable")
    sorted_items = items[order]
    starts = np.flatnonzero(np.r_[True, sorted_items[1:] != sorted_items[:-1]])
    out[:, sorted_items[starts]] = np.maximum.reduceat(s[:, order], starts, axis=1)
    return out


def aggregate_frames(vectors: npt.ArrayLike) -> F32:
    """One model-space query vector from the unit embeddings of several steady frames (their mean)."""
    v = np.asarray(vectors, dtype=np.float32)
    if v.ndim != 2 or len(v) == 0:
        raise ValueError(f"need a non-empty (n, dim) array, got shape {v.shape}")
    out: F32 = normalize_rows(normalize_rows(v).mean(0))[0]
    return out


@dataclass(frozen=True, slots=True)
class Calibration:
    """A "no match" threshold and the catalog-only simulation it came from."""

    threshold: float
    known_correct: int  # held-out in-catalog queries answered right before thresholding
    known_total: int
    known_kept: float  # share of those correct answers still above the threshold
    unseen_total: int
    unseen_rejected: float  # share of unseen-item queries whose top-1 falls below the threshold
    notes: dict[str, float] = field(default_factory=dict)


def _split_round(labels: I64, aug_source: I64 | None, rng: np.random.Generator) -> tuple[I64, I64, I64, I64]:
    """One simulation round: (fit originals, known-query originals, known-query aug views, unseen items)."""
    items = np.unique(labels)
    n_unseen = max(1, round(HOLDOUT_FRACTION * len(items)))
    unseen = rng.choice(items, size=n_unseen, replace=False)
    fit: list[int] = []
    known_orig: list[int] = []
    known_aug: list[int] = []
    for item in np.setdiff1d(items, unseen):
        idx = np.flatnonzero(labels == item)
        if len(idx) >= 2:
            held = int(rng.choice(idx))
            known_orig.append(held)
            fit.extend(int(i) for i in idx if i != held)
        else:
            fit.append(int(idx[0]))
            if aug_source is not None:
                known_aug.extend(int(a) for a in np.flatnonzero(aug_source == idx[0]))
    return (np.asarray(fit, np.int64), np.asarray(known_orig, np.int64),
            np.asarray(known_aug, np.int64), unseen.astype(np.int64))  # fmt: skip


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
    split: tuple[I64, I64, I64, I64],
    *,
    fit_adapter: bool,
    fit_with_aug: bool,
    shrinkage: float,
) -> _Round:
    """Refit on ``split``'s fit rows (plus their views), project the catalog and the held-out queries."""
    fit, known_orig, known_aug, unseen = split
    fit_x, fit_y = x[fit], y[fit]
    if xa is not None and src is not None and fit_with_aug:
        use = np.isin(src, fit)
        fit_x, fit_y = np.vstack([fit_x, xa[use]]), np.concatenate([fit_y, y[src[use]]])
    if fit_adapter:
        adapter = fit_lda_adapter(fit_x, fit_y, shrinkage=shrinkage)
    else:
        adapter = Adapter.identity(x.shape[1])
    q_parts, q_labels = [x[known_orig]], [y[known_orig]]
    if xa is not None and src is not None and len(known_aug):
        q_parts.append(xa[known_aug])
        q_labels.append(y[src[known_aug]])
    unseen_rows = np.flatnonzero(np.isin(y, unseen))
    q_parts.append(x[unseen_rows])
    if xa is not None and src is not None:
        q_parts.append(xa[np.isin(src, unseen_rows)])
    return _Round(fit, adapter.apply(x[fit]), adapter.apply(np.vstack(q_parts)), np.concatenate(q_labels))


def calibrate_threshold(
    vectors: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    aug_vectors: npt.ArrayLike | None = None,
    aug_source: npt.ArrayLike | None = None,
    fit_adapter: bool = True,
    fit_with_aug: bool = True,
    shrinkage: float = DEFAULT_SHRINKAGE,
    max_known_loss: float = DEFAULT_MAX_KNOWN_LOSS,
    rounds: int = CALIBRATION_ROUNDS,
    seed: int = 0,
) -> Calibration:
    """Choose the "no match" threshold from the catalog alone.

    Each round hides 20% of the items (their images become unseen-item queries) and one image of every
    other item that has several (a known query; for single-image items, its augmented views are), refits
    the adapter on the rest as the snapshot build would, and records top-1 similarities. The threshold is
    the highest one that keeps all but ``max_known_loss`` of the correct known answers.
    ``aug_source[j]`` is the row of ``vectors`` that augmented view ``j`` was made from; the views join
    the adapter fit only with ``fit_with_aug`` (as in the snapshot build being simulated).
    """
    x = np.asarray(vectors, dtype=np.float32)
    y = np.asarray(labels, dtype=np.int64)
    xa, src = _aug_inputs(aug_vectors, aug_source)
    rng = np.random.default_rng(seed)
    correct_sims: list[float] = []
    unseen_sims: list[float] = []
    known_total = 0
    for _ in range(rounds):
        r = _simulate(x, y, xa, src, _split_round(y, src, rng), fit_adapter=fit_adapter,
                      fit_with_aug=fit_with_aug, shrinkage=shrinkage)  # fmt: skip
        n_known = len(r.known_labels)
        sims = r.queries @ r.catalog.T
        top = sims.argmax(1)
        best = sims[np.arange(len(sims)), top]
        right = y[r.fit][top[:n_known]] == r.known_labels
        correct_sims.extend(best[:n_known][right].tolist())
        unseen_sims.extend(best[n_known:].tolist())
        known_total += n_known
    if not correct_sims:
        raise ValueError("calibration found no correct in-catalog answers; is the catalog labelled?")
    ok = np.sort(np.asarray(correct_sims))
    threshold = float(np.quantile(ok, max_known_loss))
    unseen_arr = np.asarray(unseen_sims)
    cal = Calibration(
        threshold=threshold,
        known_correct=len(ok),
        known_total=known_total,
        known_kept=float(np.mean(ok >= threshold)),
        unseen_total=len(unseen_arr),
        unseen_rejected=float(np.mean(unseen_arr < threshold)) if len(unseen_arr) else float("nan"),
        notes={"max_known_loss": max_known_loss, "rounds": float(rounds)},
    )
    _LOGGER.info(
        "threshold %.4f: keeps %.3f of %d correct known answers, rejects %.3f of %d unseen",
        cal.threshold, cal.known_kept, cal.known_correct, cal.unseen_rejected, cal.unseen_total,
    )  # fmt: skip
    return cal


# ---- open set: "no match" from a calibrated rule on item scores ----

OPEN_SET_KIND = "top1+margin/1"
# Weight of the top-1 minus top-2 item margin added to the top-1 similarity: measured best of top-1,
# margin, ratio, per-item LOO-normalised, kNN-fraction and Mahalanobis scores (scripts/eval_grocery.py).
DEFAULT_MARGIN_WEIGHT = 1.0
# Catalog images removed around each held-out one in calibration: store photos come from other sessions
# than the catalog, so a held-out image's near-duplicates must not stay behind to answer it.
DEFAULT_HOLDOUT_NEIGHBOURS = 8


def open_set_score(scores: npt.ArrayLike, margin_weight: float = DEFAULT_MARGIN_WEIGHT) -> F32:
    """Per-query confidence from (q, n_items) or (n_items,) item scores: top1 + w * (top1 - top2).

    With fewer than two finite item scores the margin term is 0 (nothing to be confused with).
    """
    s = np.asarray(scores, dtype=np.float32)
    rows = s[None, :] if s.ndim == 1 else s
    if rows.shape[1] == 0:
        raise ValueError("no items to score")
    if rows.shape[1] == 1:
        top1 = rows[:, 0]
        top2 = np.full_like(top1, -np.inf)
    else:
        part = -np.partition(-rows, 1, axis=1)
        top1, top2 = part[:, 0], part[:, 1]
    margin = np.where(np.isfinite(top2), top1 - top2, 0.0).astype(np.float32)
    out: F32 = (top1 + np.float32(margin_weight) * margin).astype(np.float32)
    return out


@dataclass(frozen=True, slots=True)
class OpenSetRule:
    """When the kiosk answers "no match": ``open_set_score(item scores) < threshold``.

    ``to_dict`` is what a snapshot ships (manifest ``extra["open_set"]``); the kiosk needs only
    ``threshold`` and ``margin_weight``; the rest records the catalog-only simulation it came from.
    """

    threshold: float
    margin_weight: float = DEFAULT_MARGIN_WEIGHT
    max_known_loss: float = DEFAULT_MAX_KNOWN_LOSS
    sim_known_kept: float = float("nan")  # share of correct held-out answers kept, in the simulation
    sim_unseen_rejected: float = float("nan")  # share of unseen-item queries rejected, in the simulation
    sim_known_correct: int = 0
    sim_unseen_total: int = 0

    def to_dict(self) -> dict[str, float | int | str]:
        """A small JSON-ready dict (floats rounded to 6 places)."""
        return {
            "kind": OPEN_SET_KIND,
            "threshold": round(self.threshold, 6),
            "margin_weight": round(self.margin_weight, 6),
            "max_known_loss": round(self.max_known_loss, 6),
            "sim_known_kept": round(self.sim_known_kept, 4),
            "sim_unseen_rejected": round(self.sim_unseen_rejected, 4),
            "sim_known_correct": self.sim_known_correct,
            "sim_unseen_total": self.sim_unseen_total,
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> OpenSetRule:
        """Parse ``to_dict`` output; ValueError on another kind or a missing/non-finite threshold."""
        if d.get("kind") != OPEN_SET_KIND:
            raise ValueError(f"open-set rule kind {d.get('kind')!r} is not {OPEN_SET_KIND!r}")

        def num(key: str, default: float) -> float:
            v = d.get(key, default)
            if not isinstance(v, int | float) or isinstance(v, bool):
                raise ValueError(f"open-set rule field {key!r} is {v!r}, not a number")
            return float(v)

        threshold = num("threshold", float("nan"))
        weight = num("margin_weight", DEFAULT_MARGIN_WEIGHT)
        if not (np.isfinite(threshold) and np.isfinite(weight)):
            raise ValueError("open-set rule needs a finite threshold and margin_weight")
        return cls(
            threshold=threshold, margin_weight=weight,
            max_known_loss=num("max_known_loss", DEFAULT_MAX_KNOWN_LOSS),
            sim_known_kept=num("sim_known_kept", float("nan")),
            sim_unseen_rejected=num("sim_unseen_rejected", float("nan")),
            sim_known_correct=int(num("sim_known_correct", 0)),
            sim_unseen_total=int(num("sim_unseen_total", 0)),
        )  # fmt: skip


def is_match(rule: OpenSetRule, item_scores_row: npt.ArrayLike) -> bool:
    """True to answer with the top item of one query's (n_items,) item scores, False for "no match"."""
    row = np.asarray(item_scores_row, dtype=np.float32)
    if row.ndim != 1:
        raise ValueError(f"is_match takes one query's item scores, got shape {row.shape}")
    return bool(open_set_score(row, rule.margin_weight)[0] >= rule.threshold)


def _open_set_round(
    x: F32, y: I64, aug_source: I64 | None, neighbours: int, rng: np.random.Generator
) -> tuple[I64, I64, I64, I64]:
    """Like ``_split_round``, but each held-out image also takes its ``neighbours`` nearest same-item
    images (cosine in model space) out of the catalog, leaving at least one image of the item behind."""
    items = np.unique(y)
    unseen = rng.choice(items, size=max(1, round(HOLDOUT_FRACTION * len(items))), replace=False)
    fit: list[int] = []
    known_orig: list[int] = []
    known_aug: list[int] = []
    for item in np.setdiff1d(items, unseen):
        idx = np.flatnonzero(y == item)
        if len(idx) >= 2:
            held = int(rng.choice(idx))
            rest = idx[idx != held]
            drop = min(neighbours, len(rest) - 1)
            if drop > 0:
                sims = x[rest] @ x[held]
                rest = rest[np.argsort(-sims, kind="stable")[drop:]]
            known_orig.append(held)
            fit.extend(int(i) for i in rest)
        else:
            fit.append(int(idx[0]))
            if aug_source is not None:
                known_aug.extend(int(a) for a in np.flatnonzero(aug_source == idx[0]))
    return (np.asarray(sorted(fit), np.int64), np.asarray(known_orig, np.int64),
            np.asarray(known_aug, np.int64), unseen.astype(np.int64))  # fmt: skip


def calibrate_open_set(
    vectors: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    aug_vectors: npt.ArrayLike | None = None,
    aug_source: npt.ArrayLike | None = None,
    fit_adapter: bool = True,
    fit_with_aug: bool = True,
    shrinkage: float = DEFAULT_SHRINKAGE,
    max_known_loss: float = DEFAULT_MAX_KNOWN_LOSS,
    margin_weight: float = DEFAULT_MARGIN_WEIGHT,
    holdout_neighbours: int = DEFAULT_HOLDOUT_NEIGHBOURS,
    rounds: int = CALIBRATION_ROUNDS,
    seed: int = 0,
) -> OpenSetRule:
    """The snapshot's "no match" rule, from the catalog alone (model-space vectors, item labels).

    Each round hides 20% of the items (their images and views become unseen-item queries) and, per
    remaining item, one image together with its ``holdout_neighbours`` nearest same-item images (the
    held image is the known query; single-image items use their augmented views instead), refits the
    adapter on the rest as the build does, and scores every query with ``open_set_score``. The threshold
    keeps all but ``max_known_loss`` of the correctly answered known queries.
    """
    if not 0.0 <= max_known_loss < 1.0:
        raise ValueError(f"max_known_loss must be in [0, 1), got {max_known_loss}")
    x = normalize_rows(vectors)
    y = np.asarray(labels, dtype=np.int64)
    xa, src = _aug_inputs(aug_vectors, aug_source)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} vectors but {len(y)} labels")
    items = np.unique(y)
    rng = np.random.default_rng(seed)
    known_scores: list[F32] = []
    unseen_scores: list[F32] = []
    for _ in range(rounds):
        split = _open_set_round(x, y, src, holdout_neighbours, rng)
        r = _simulate(x, y, xa, src, split, fit_adapter=fit_adapter, fit_with_aug=fit_with_aug,
                      shrinkage=shrinkage)  # fmt: skip
        n_known = len(r.known_labels)
        # Item columns are the catalog's items in sorted order (absent ones are simply not columns).
        kept_items = np.unique(y[r.fit])
        col = np.searchsorted(kept_items, y[r.fit])
        scores = item_scores(r.queries @ r.catalog.T, col, len(kept_items))
        conf = open_set_score(scores, margin_weight)
        right = kept_items[scores[:n_known].argmax(1)] == r.known_labels
        known_scores.append(conf[:n_known][right])
        unseen_scores.append(conf[n_known:])
    ok = np.concatenate(known_scores)
    if not len(ok):
        raise ValueError("calibration found no correct in-catalog answers; is the catalog labelled?")
    threshold = float(np.quantile(ok, max_known_loss))
    un = np.concatenate(unseen_scores)
    rule = OpenSetRule(
        threshold=threshold, margin_weight=float(margin_weight), max_known_loss=float(max_known_loss),
        sim_known_kept=float(np.mean(ok >= threshold)),
        sim_unseen_rejected=float(np.mean(un < threshold)) if len(un) else float("nan"),
        sim_known_correct=len(ok), sim_unseen_total=len(un),
    )  # fmt: skip
    _LOGGER.info(
        "open-set rule over %d items: threshold %.4f keeps %.3f of %d correct, rejects %.3f of %d unseen",
        len(items), threshold, rule.sim_known_kept, len(ok), rule.sim_unseen_rejected, len(un),
    )  # fmt: skip
    return rule

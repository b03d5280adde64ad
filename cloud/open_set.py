"""The snapshot's "no match" rule: ``top1 + w * (top1 - top2)`` over item scores, calibrated on the catalog.

``calibrate_open_set`` simulates, from the catalog alone, store photos of items the catalog has (an image
held out together with its near-duplicates) and of items it does not (20% of the items hidden), and picks
the threshold that keeps all but a small share of the right answers. A held-out image is the only honest
stand-in for a store photo: an augmented view of an image that stays in the index is a near-duplicate of
it (see ``cloud.retrieval.CalibrationError`` for what that did). Items with a single image therefore only
stay in the index; a catalog with too few items that have two images gets no rule (``CalibrationError``)
and the build ships a snapshot that always answers with its nearest items, saying so in its report.

``fit_for_snapshot`` is what ``cloud.build`` ships: the adapter plus this rule, or for catalogs of fewer
than ``MIN_ADAPTER_ITEMS`` items a plain top-1 threshold (``plain_threshold``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from cloud.retrieval import (
    CALIBRATION_ROUNDS,
    DEFAULT_MAX_KNOWN_LOSS,
    DEFAULT_SHRINKAGE,
    F32,
    MIN_KNOWN_ANSWERS,
    Adapter,
    CalibrationError,
    _aug_inputs,
    _simulate,
    check_enough_answers,
    fit_lda_adapter,
    holdout_round,
    item_scores,
    multi_image_items,
    normalize_rows,
)
from storelens.matching import OPEN_SET_KIND
from storelens.snapshot import SnapshotManifest

_LOGGER = logging.getLogger(__name__)

# Weight of the top-1 minus top-2 item margin added to the top-1 similarity: measured best of top-1,
# margin, ratio, per-item LOO-normalised, kNN-fraction and Mahalanobis scores (scripts/eval_grocery.py).
DEFAULT_MARGIN_WEIGHT = 1.0
# Catalog images removed around each held-out one in calibration: store photos come from other sessions
# than the catalog, so a held-out image's near-duplicates must not stay behind to answer it.
DEFAULT_HOLDOUT_NEIGHBOURS = 8
MAX_ROUNDS = 50  # a 4-item catalog with 4 images each answers ~3 held-out queries a round
SMALL_CATALOG = 2000  # vectors; above, each round refits the adapter for seconds: no extra rounds


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
    held image is the known query; single-image items stay in the index and give no query), refits the
    adapter on the rest as the build does (with the kept images' augmented views when ``fit_with_aug``),
    and scores every query with ``open_set_score``. The threshold keeps all but ``max_known_loss`` of the
    correctly answered known queries. A small catalog runs more rounds (up to ``MAX_ROUNDS``) until
    ``MIN_KNOWN_ANSWERS`` known queries were answered right; CalibrationError if it never gets there
    (too few items with a second image).
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
    right_total, done = 0, 0
    # A small catalog answers few held-out queries a round: run more rounds (cheap at that size).
    max_rounds = MAX_ROUNDS if len(x) <= SMALL_CATALOG else rounds
    more = multi_image_items(y).enough
    while more and (done < rounds or (right_total < MIN_KNOWN_ANSWERS and done < max_rounds)):
        done += 1
        split = holdout_round(x, y, holdout_neighbours, rng)
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
        right_total += int(right.sum())
        if done >= rounds and right_total * max_rounds < MIN_KNOWN_ANSWERS * done:
            break  # at this rate even max_rounds would not get there: fail now, not after minutes
    ok = np.concatenate(known_scores) if known_scores else np.zeros(0, np.float32)
    check_enough_answers(len(ok), y)
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


# ---- what a snapshot build ships ----

MIN_ADAPTER_ITEMS = 3  # LDA needs a few items to find directions that separate them
# Share of right answers (simulated on the catalog) the "no match" rule may reject. The simulation is
# optimistic for photos unlike the catalog (measured: 3% asked for, about half lost in the grocery demo),
# and a wrong "ask staff" costs a store more than showing near candidates, so ask for little.
OPEN_SET_KNOWN_LOSS = 0.01
NEVER_NO_MATCH = -1.0  # the threshold of a snapshot without a "no match" rule: every similarity clears it
POS_PASS = 0.95  # share of same-item matches that must clear the threshold


def _uncalibrated(why: str) -> str:
    return (f"kiosks will never answer \"no match\": {why}; add a second photo (a store-like one) of more "
            "items to calibrate it")


def plain_threshold(vectors: npt.NDArray[np.float32], skus: list[str]) -> tuple[float, dict[str, Any]]:
    """A top-1 similarity threshold for catalogs too small for the adapter; (threshold, statistics).

    Leave one image out: for every catalog vector, ``pos`` is its best similarity to another image of the
    same item and ``neg`` its best similarity to any other item; the threshold is the point that best
    separates the two (Youden's J), capped so at least ``POS_PASS`` of ``pos`` pass. Fewer than 10
    ``pos``: no threshold (``NEVER_NO_MATCH``), as for the rule."""
    n = len(skus)
    if n < 2:
        why = f"the catalog has {n} image(s)"
        return NEVER_NO_MATCH, {"method": "uncalibrated", "n": n, "warning": _uncalibrated(why)}
    ids = np.unique(np.asarray(skus), return_inverse=True)[1]
    pos, neg = np.full(n, np.nan, np.float32), np.full(n, -1.0, np.float32)
    for start in range(0, n, 1024):  # blocks keep memory at 1024 x n floats
        sims = vectors[start : start + 1024] @ vectors.T
        rows = np.arange(start, min(start + 1024, n))
        same = ids[rows][:, None] == ids[None, :]
        sims[np.arange(len(rows)), rows] = -np.inf  # never match itself
        neg[rows] = np.where(same, -np.inf, sims).max(axis=1)
        p = np.where(same, sims, -np.inf).max(axis=1)
        pos[rows] = np.where(np.isfinite(p), p, np.nan)
    pos_v = pos[np.isfinite(pos)]
    neg_v = neg[np.isfinite(neg)]
    stats: dict[str, Any] = {
        "n": n,
        "pos_n": int(pos_v.size),
        "neg_mean": round(float(neg_v.mean()), 4) if neg_v.size else None,
        "pos_mean": round(float(pos_v.mean()), 4) if pos_v.size else None,
    }
    if pos_v.size < 10:  # other items' catalog images are no stand-in for store photos
        why = f"only {pos_v.size} images have another image of the same item"
        stats.update(method="uncalibrated", warning=_uncalibrated(why))
        return NEVER_NO_MATCH, stats
    grid = np.linspace(-1, 1, 401)
    j = [(pos_v >= g).mean() + (neg_v < g).mean() for g in grid]
    youden = float(grid[int(np.argmax(j))])
    t = min(youden, float(np.quantile(pos_v, 1 - POS_PASS)))
    stats.update(method="youden_capped_pos_p05", youden=round(youden, 4))
    stats["pos_pass"] = round(float((pos_v >= t).mean()), 4)
    stats["neg_reject"] = round(float((neg_v < t).mean()), 4)
    return round(t, 4), stats


def fit_for_snapshot(
    vectors: npt.NDArray[np.float32],
    skus: list[str],
    adapter: str,
    fit_extra: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]] | None = None,
) -> tuple[Adapter | None, dict[str, Any]]:
    """What a snapshot ships to decide "no match": the catalog's LDA adapter (``adapter == "lda"``, three or
    more items) with the open-set rule calibrated through it; else no projection and ``plain_threshold``.
    Returns (adapter or None, statistics with the "threshold" and, for the rule, "open_set").

    A catalog that cannot calibrate the open-set rule (too few items with a second image) gets none:
    threshold ``NEVER_NO_MATCH`` (the kiosk always shows its nearest items) and a warning in the report,
    rather than a threshold fitted on near-duplicates that would turn most right answers away.

    ``fit_extra`` (view vectors, the row of ``vectors`` each is a view of): more samples for the adapter's
    fit only (views of the store photos, ``relearn.store_photo_views``); the rule's calibration refits
    with them as the build does (a held-out photo's view leaves the fit with it)."""
    ids = np.unique(np.asarray(skus), return_inverse=True)[1]
    if adapter == "lda" and ids.max(initial=0) + 1 >= MIN_ADAPTER_ITEMS:
        xa, src = fit_extra if fit_extra is not None and len(fit_extra[1]) else (None, None)
        if src is not None and (src.min() < 0 or src.max() >= len(ids)):
            raise ValueError(f"fit_extra sources must be rows of the {len(ids)} vectors")
        fit_x = vectors if xa is None else np.vstack([vectors, xa])
        proj = fit_lda_adapter(fit_x, ids if src is None else np.concatenate([ids, ids[src]]))
        try:
            rule = calibrate_open_set(vectors, ids, aug_vectors=xa, aug_source=src,
                                      max_known_loss=OPEN_SET_KNOWN_LOSS)  # fmt: skip
        except CalibrationError as e:
            _LOGGER.warning("no \"no match\" rule: %s", e)
            stats = {"method": "uncalibrated", "threshold": NEVER_NO_MATCH, "warning": _uncalibrated(str(e))}
            return proj, stats
        # The kiosk decides with storelens.matching.MatchRule (top1 + margin), see extra["open_set"].
        return proj, {"method": "cross_fitted_lda_open_set", "threshold": round(rule.threshold, 4),
                      "open_set": rule.to_dict()}
    t, stats = plain_threshold(vectors, skus)
    return None, {**stats, "threshold": t}


def recalibrate_reason(base: SnapshotManifest, skus: Sequence[str]) -> str | None:
    """Why a delta on ``base`` must be a full build: the base ships no "no match" rule and the catalog now
    has the photos to calibrate one (a delta inherits its base's rule). None otherwise."""
    stats = base.extra.get("threshold")
    if not (isinstance(stats, dict) and stats.get("method") == "uncalibrated"):
        return None
    if not multi_image_items(skus).enough:
        return None
    return "the base has no \"no match\" rule and the catalog now has the photos to calibrate one"

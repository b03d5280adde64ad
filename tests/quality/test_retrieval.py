"""Retrieval helpers on seeded synthetic clusters: adapter, item scoring, frames, calibration."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cloud.open_set import OpenSetRule, calibrate_open_set, is_match, open_set_score
from cloud.retrieval import (
    Adapter,
    CalibrationError,
    aggregate_frames,
    fit_lda_adapter,
    item_scores,
    normalize_rows,
)
from cloud.retrieval_augment import augmented_views, is_on_white


def _clusters(
    n_items: int = 12, per_item: int = 6, dim: int = 48, noise: float = 0.6, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_items, dim))
    nuisance = rng.normal(size=(1, dim)) * 3.0  # a shared direction LDA should suppress
    y = np.repeat(np.arange(n_items), per_item)
    x = centres[y] + noise * rng.normal(size=(len(y), dim)) + rng.normal(size=(len(y), 1)) * nuisance
    return normalize_rows(x), y


def test_projection_bytes_round_trip() -> None:
    """projection.bin written by the cloud must parse back bit-exactly on the kiosk side."""
    x, y = _clusters()
    a = fit_lda_adapter(x, y)
    b = Adapter.from_bytes(a.to_bytes(), a.in_dim, a.out_dim)
    assert np.array_equal(a.mean, b.mean) and np.array_equal(a.matrix, b.matrix)
    assert len(a.to_bytes()) == 4 * a.in_dim * (1 + a.out_dim)
    with pytest.raises(ValueError):
        Adapter.from_bytes(a.to_bytes()[:-4], a.in_dim, a.out_dim)


def test_lda_adapter_beats_raw_cosine_on_nuisance_direction() -> None:
    """The adapter must not do worse than raw cosine where a shared nuisance direction dominates."""
    x, y = _clusters(seed=1)
    q, qy = _clusters(seed=1, per_item=3)
    q = normalize_rows(q + 0.05)

    def r1(adapter: Adapter) -> float:
        s = item_scores(adapter.apply(q) @ adapter.apply(x).T, y, 12)
        return float(np.mean(s.argmax(1) == qy))

    a = fit_lda_adapter(x, y)
    assert a.out_dim == 11
    assert r1(a) >= r1(Adapter.identity(x.shape[1]))
    assert np.allclose(np.linalg.norm(a.apply(x), axis=1), 1.0, atol=1e-5)


def test_item_scores_takes_best_image_and_marks_absent_items() -> None:
    """An item's score is its best image; items with no vectors score -inf, never 0."""
    sims = np.array([[0.1, 0.9, 0.3, 0.2]], np.float32)
    s = item_scores(sims, np.array([2, 0, 2, 0]), 4)
    assert s[0, 0] == pytest.approx(0.9) and s[0, 2] == pytest.approx(0.3)
    assert np.isneginf(s[0, 1]) and np.isneginf(s[0, 3])


def test_item_scores_per_item_means_the_best_few_images() -> None:
    """Class-level scoring averages an item's k best images (all when it has fewer), never its worst."""
    sims = np.array([[0.1, 0.9, 0.3, 0.2, 0.7, 0.5]], np.float32)
    s = item_scores(sims, np.array([2, 0, 2, 0, 0, 1]), 4, per_item=2)
    assert s[0, 0] == pytest.approx(0.8)  # 0.9 and 0.7, not 0.2
    assert s[0, 2] == pytest.approx(0.2) and s[0, 1] == pytest.approx(0.5)
    assert np.isneginf(s[0, 3])
    best = item_scores(sims, np.array([2, 0, 2, 0, 0, 1]), 4, per_item=1)
    assert best[0, :3] == pytest.approx([0.9, 0.5, 0.3])  # k=1 is the best image again
    with pytest.raises(ValueError, match="per_item"):
        item_scores(sims, np.array([2, 0, 2, 0, 0, 1]), 4, per_item=0)


def test_aggregate_frames_is_unit_mean() -> None:
    """Averaging steady frames returns one unit vector; an empty set is an error."""
    v = aggregate_frames(np.eye(3, dtype=np.float32)[:2])
    assert np.allclose(v, np.array([1, 1, 0]) / np.sqrt(2))
    with pytest.raises(ValueError):
        aggregate_frames(np.zeros((0, 3), np.float32))


def test_calibration_separates_unseen_items() -> None:
    """On well-separated items the catalog-only threshold keeps known answers and rejects unseen ones."""
    x, y = _clusters(noise=0.3, seed=2)
    cal = calibrate_open_set(x, y, margin_weight=0.0, holdout_neighbours=0, seed=0)
    assert cal.sim_known_kept >= 0.95
    assert cal.sim_unseen_rejected > 0.5
    assert -1.0 <= cal.threshold <= 1.0


def test_augmented_views_are_deterministic_and_handle_white_shots() -> None:
    """Views depend only on the seed; an item on white gets composited, not just cropped."""
    img = np.full((120, 90, 3), 255, np.uint8)
    img[30:90, 20:70] = (40, 120, 200)
    assert is_on_white(img)
    a = augmented_views(img, 4, seed=7)
    b = augmented_views(img, 4, seed=7)
    assert len(a) == 4 and all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
    assert all(v.dtype == np.uint8 and v.ndim == 3 for v in a)
    assert not is_on_white(a[0])


def test_open_set_rule_round_trips_and_rejects_unseen_clusters() -> None:
    """calibrate_open_set on separable clusters: keeps known answers, rejects unseen ones, JSON round trip."""
    x, y = _clusters(n_items=15, per_item=12, noise=0.2, seed=3)
    known = y < 12
    rule = calibrate_open_set(x[known], y[known], holdout_neighbours=2, rounds=5, seed=0)
    assert rule.sim_known_kept >= 0.95 and rule.sim_unseen_rejected > 0.5
    back = OpenSetRule.from_dict(json.loads(json.dumps(rule.to_dict())))
    assert back.threshold == pytest.approx(rule.threshold, abs=1e-6)
    a = fit_lda_adapter(x[known], y[known])
    scores = item_scores(a.apply(x) @ a.apply(x[known]).T, y[known], 15)
    answered = np.array([is_match(back, row) for row in scores])
    assert answered[known].mean() >= 0.9
    assert (~answered[~known]).mean() > 0.5
    with pytest.raises(ValueError):
        OpenSetRule.from_dict({"kind": "something-else", "threshold": 0.5})
    with pytest.raises(ValueError):
        is_match(back, scores)


def test_open_set_rule_needs_items_with_a_second_image() -> None:
    """One image per item: no held-out image to stand in for a store photo, so no rule (not a threshold
    fitted on near-duplicate views, which rejected 95% of right answers on the grocery data); with a
    few multi-image items, only those give known queries."""
    x, y = _clusters(n_items=20, per_item=6, noise=0.2, seed=4)
    first = np.unique(y, return_index=True)[1]
    views = np.repeat(x[first], 4, axis=0) + 0.01
    with pytest.raises(CalibrationError, match="0 of 20 items have two or more images"):
        calibrate_open_set(x[first], y[first], aug_vectors=views, aug_source=np.repeat(np.arange(20), 4))
    multi = y < 6  # items 0-5 keep all their images, the rest one each
    rows = np.flatnonzero(multi | np.isin(np.arange(len(y)), first))
    single = np.flatnonzero(~multi[rows])  # positions in ``rows`` of the single-image items: 4 views each
    views, src = np.repeat(x[rows][single], 4, axis=0) + 0.01, np.repeat(single, 4)
    rule = calibrate_open_set(x[rows], y[rows], aug_vectors=views, aug_source=src, holdout_neighbours=2,
                              rounds=5, seed=0)  # fmt: skip
    assert 20 <= rule.sim_known_correct <= 5 * 6  # at most one held-out image per multi-image item a round
    assert rule.sim_known_kept >= 0.95
    small = y < 4  # four items with six images each: ~3 held-out answers a round, so more rounds
    rule = calibrate_open_set(x[small], y[small], holdout_neighbours=2, rounds=5, seed=0)
    assert rule.sim_known_correct >= 20 and rule.sim_unseen_total > 5 * 6
    few = (y < 3) | np.isin(np.arange(len(y)), first)  # 3 multi-image items: more rounds only repeat them
    with pytest.raises(CalibrationError, match="3 of 20 items have two or more images"):
        calibrate_open_set(x[few], y[few], holdout_neighbours=2, rounds=5, seed=0)


def test_open_set_score_handles_single_and_absent_items() -> None:
    """top1 + w * margin; -inf (absent) items never make the margin infinite."""
    s = open_set_score(np.array([[0.8, 0.5, -np.inf], [0.6, -np.inf, -np.inf]], np.float32), 1.0)
    assert s[0] == pytest.approx(1.1) and s[1] == pytest.approx(0.6)
    assert open_set_score(np.array([0.7], np.float32))[0] == pytest.approx(0.7)

"""The open-set ceiling (issue 19): the most unknown products any "not found" design here can turn away.

The loop's open-set target is >= 0.80 of unknown products answered "not found" at <= 3 points of R@1.
Before calling it blocked we measure what each design could reach with its knobs set by an ORACLE (the
thresholds and margins that do best on the queries themselves, which no calibration can beat), replayed in
numpy on cached pooled vectors like ``scripts/eval_levers.py``:

- ``rule``: the shipped "no match" rule alone, ``top1 + (top1 - top2)`` over item scores.
- ``rows``: the shipped rule plus the snapshot's not-carried rows as shipped (a query at least as near a
  not-carried photo as its best product plus a margin is "not found"); margin and threshold both oracle.
- ``soft``: one confidence, ``rule - w * max(0, gap + offset)`` (``gap`` = best not-carried similarity minus
  best product similarity), w and offset oracle.
- ``fit``: as ``rows``, with every not-carried photo also a class of its own in the snapshot's LDA fit.

World: 20% of the products unknown, half of them "asked before" (their photos are in the snapshot as
not-carried rows, as staff would mark them); k = 1, 3, 5, 10 store photos per known product and per asked
product (no mis-taps: a ceiling). ``train``: per seed, each product's train photos split in half at random,
store photos from one half, queries from the other (val never read); ``val``: eval_loop's draw and unknown
products, queries = val photos. Writes build/eval/openset_ceiling.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cloud.open_set import open_set_score  # noqa: E402
from cloud.retrieval import DEFAULT_SHRINKAGE, item_scores  # noqa: E402
from scripts import eval_levers as levers  # noqa: E402
from scripts.eval_data import OUT  # noqa: E402
from scripts.eval_loop import SEED, _asked_items, _unseen_items  # noqa: E402

KS = (1, 3, 5, 10)
COSTS = (0.01, 0.03)  # share of the known queries answered right that a design may turn away
TRAIN_SEEDS = (101, 102, 103)
MARGINS = (-0.05, 0.0, 0.02, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3, np.inf)  # inf: no rows
SOFT = [(w, off) for w in (1.0, 2.0, 5.0, 10.0) for off in (0.0, 0.05, 0.1, 0.15, 0.2)]


@dataclass
class World:
    unseen: np.ndarray
    asked: np.ndarray
    order: dict[int, np.ndarray]  # per product, its store photos in the order they arrive
    queries: np.ndarray
    q_labels: np.ndarray


def world(v: levers.Vectors, kind: str, seed: int) -> World:
    if kind == "val":
        rng = np.random.default_rng(SEED)
        order = {p: rng.permutation(np.flatnonzero(v.train_labels == p)) for p in range(levers.N_ITEMS)}
        return World(_unseen_items(), _asked_items(), order, v.val_single, v.val_labels)
    rng = np.random.default_rng(seed)
    unseen = np.sort(rng.choice(levers.N_ITEMS, round(0.2 * levers.N_ITEMS), replace=False))
    asked = np.sort(rng.choice(unseen, len(unseen) // 2, replace=False))
    order, qi = {}, []
    for p in range(levers.N_ITEMS):
        perm = rng.permutation(np.flatnonzero(v.train_labels == p))
        order[p] = perm[: len(perm) // 2]
        qi += perm[len(perm) // 2 :].tolist()
    q = np.asarray(qi)
    return World(unseen, asked, order, v.crops[q], v.train_labels[q])


def best_rejection(right: np.ndarray, known: np.ndarray, unknown: np.ndarray, cost: float) -> float:
    """Share of unknown queries below the highest threshold that turns away at most ``cost`` of the right
    answers (reject when score < threshold)."""
    ok = np.sort(known[right])
    m = int(np.floor(cost * len(right)))
    t = ok[m] if m < len(ok) else np.inf
    return float(np.mean(unknown < t))


def measure(v: levers.Vectors, w: World, k: int, design: str) -> dict[str, Any]:
    known = np.setdiff1d(np.arange(levers.N_ITEMS), w.unseen)
    store = np.concatenate([w.order[int(p)][:k] for p in known])
    nc = np.concatenate([w.order[int(p)][:k] for p in w.asked])
    views = v.crop_views["c80"]
    xs = [v.iconic[known], v.crops[store], views[store]]
    ys = [known, v.train_labels[store], v.train_labels[store]]
    if design == "fit":
        own = 10_000 + np.arange(len(nc))
        xs += [v.crops[nc], views[nc]]
        ys += [own, own]
    mean, mat = levers.fit_lda(np.vstack(xs), np.concatenate(ys), shrinkage=DEFAULT_SHRINKAGE, out_dim=None)
    rows = levers.project(mean, mat, np.vstack([v.iconic[known], v.crops[store]]))
    pq = levers.project(mean, mat, w.queries)
    s = item_scores(pq @ rows.T, np.concatenate([known, v.train_labels[store]]), levers.N_ITEMS)
    top1 = s.max(axis=1)
    rule = open_set_score(s)
    gap = (pq @ levers.project(mean, mat, v.crops[nc]).T).max(axis=1) - top1
    is_known = np.isin(w.q_labels, known)
    asked = np.isin(w.q_labels, w.asked)
    right = (s.argmax(axis=1) == w.q_labels)[is_known]
    if design == "rule":
        candidates = [rule]
    elif design == "soft":
        candidates = [rule - wt * np.maximum(0.0, gap + off) for wt, off in SOFT]
    else:
        candidates = [np.where(gap >= m, -np.inf, rule) for m in MARGINS]
    out: dict[str, Any] = {"r1_known": float(right.mean())}
    for cost in COSTS:
        best = max(candidates, key=lambda c: best_rejection(right, c[is_known], c[~is_known], cost))
        for name, group in (("unknown", ~is_known), ("asked", asked), ("never_asked", ~is_known & ~asked)):
            out[f"{name}_rejected@{cost}"] = best_rejection(right, best[is_known], best[group], cost)
    return out


def _line(kind: str, design: str, k: int, row: dict[str, float]) -> str:
    shares = ", ".join(
        f"{g.replace('_', ' ')} {row[f'{g}_rejected@0.01']:.2f} / {row[f'{g}_rejected@0.03']:.2f}"
        for g in ("unknown", "asked", "never_asked")
    )
    return f"{kind:5s} {design:4s} k={k:2d} R@1 known {row['r1_known']:.3f}, rejected at 1% / 3%: {shares}"


def main() -> int:
    from threadpoolctl import threadpool_limits

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="train,val")
    ap.add_argument("--designs", default="rule,rows,soft,fit")
    a = ap.parse_args()
    v = levers.replay_vectors()
    res: dict[str, Any] = {}
    with threadpool_limits(limits=1, user_api="blas"):
        for kind in a.worlds.split(","):
            seeds = (0,) if kind == "val" else TRAIN_SEEDS
            ws = [world(v, kind, s) for s in seeds]
            for design in a.designs.split(","):
                for k in KS:
                    runs = [measure(v, w, k, design) for w in ws]
                    row = {m: round(float(np.mean([r[m] for r in runs])), 3) for m in runs[0]}
                    res.setdefault(kind, {}).setdefault(design, {})[k] = row
                    print(_line(kind, design, k, row), flush=True)
    out = OUT / "openset_ceiling.json"
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

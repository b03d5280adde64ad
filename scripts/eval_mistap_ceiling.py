"""The mis-tap ceiling (issue 19): how close to the clean curve ANY mis-tap handling can bring the loop.

The loop's target: with 10% of confirmations on a wrong product and no human review, R@1 within 2 points
of the clean curve. Before calling it blocked we measure what a mis-tap detector could buy if it were an
ORACLE (it knows which photos are mis-taps, which nothing in the product can), replayed in numpy on cached
pooled vectors like ``scripts/eval_levers.py`` (its worlds, its fit: catalog + store photos + each photo's
0.8 centre crop, as the build ships):

- ``as_is``: mis-taps kept under the product the customer tapped (what the build does where the product's
  mis-tap filter cannot run: fewer than 5 store photos).
- ``drop c/f``: a detector that catches a share ``c`` of the mis-taps and wrongly drops a share ``f`` of the
  true photos; ``drop 1/0`` is the perfect one.
- ``relabel``: every mis-tap found (oracle) and given the product the snapshot without it ranks first,
  other than the one tapped (what a re-labelling rule could do at best).
- ``true``: every mis-tap given its true product (sanity: the clean curve).
- ``staff``: the product's own answer, review. The auto rule (``cloud.feedback.auto``: the tapped product
  ranks first, or within ``AGREE_MARGIN``, in the snapshot the photo arrived in) approves a photo as
  tapped; every photo it holds back gets its true product from staff (re-assign / approve), every one it
  approves stays as tapped. ``held`` is the share of photos staff had to look at.

Worlds: ``train`` / ``block`` (train photos split in half per product, at random / in file order; store
photos from one half, queries from the other; 5 seeds each; val never read) and ``val`` (eval_loop's draw,
queries = val photos). Single photo R@1, gap to the clean loop in points. Writes
build/eval/mistap_ceiling.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cloud.feedback.auto import AGREE_MARGIN  # noqa: E402
from scripts import eval_levers as levers  # noqa: E402
from scripts.eval_data import OUT  # noqa: E402

# (share of mis-taps caught, share of true photos wrongly dropped)
DETECTORS = ((1.0, 0.0), (0.75, 0.0), (0.5, 0.0), (1.0, 0.1), (0.75, 0.1), (0.5, 0.1))
FIT = levers.Variant(views_fit=("c80",))  # the shipped build's fit


def _relabelled(v: levers.Vectors, w: levers.World, mis: np.ndarray) -> tuple[np.ndarray, float]:
    """Labels with each mis-tap moved to the best other product of the snapshot fitted without them, and
    the share of those moves that found the true product."""
    s = levers.snapshot_scores(v, w.store_idx[~mis], w.store_labels[~mis], v.crops[w.store_idx[mis]])
    s[np.arange(int(mis.sum())), w.store_labels[mis]] = -np.inf
    labels = w.store_labels.copy()
    labels[mis] = np.argmax(s, axis=1)
    right = float(np.mean(labels[mis] == v.train_labels[w.store_idx[mis]])) if mis.any() else 1.0
    return labels, right


def _staff_labels(v: levers.Vectors, noisy: dict[int, levers.World]) -> dict[int, tuple[np.ndarray, float]]:
    """Per k: the labels after the auto rule and staff (held photos get their true product), and the
    share of the photos that arrived up to k which the rule held for staff."""
    decided: dict[int, int] = {}  # train row -> label it ended with
    held = 0
    out = {}
    for k, w in noisy.items():
        new = [i for i in range(len(w.store_idx)) if int(w.store_idx[i]) not in decided]
        rows = np.asarray(list(decided), np.int64)
        got = np.asarray(list(decided.values()), np.int64)
        s = levers.snapshot_scores(v, rows, got, v.crops[w.store_idx[new]])
        tapped = w.store_labels[new]
        approved = s[np.arange(len(new)), tapped] >= s.max(axis=1) - AGREE_MARGIN
        held += int((~approved).sum())
        for i, ok in zip(new, approved, strict=True):
            row = int(w.store_idx[i])
            decided[row] = int(w.store_labels[i]) if ok else int(v.train_labels[row])
        labels = np.asarray([decided[int(i)] for i in w.store_idx], np.int64)
        out[k] = (labels, held / max(1, len(decided)))
    return out


def measure(v: levers.Vectors, clean: levers.World, noisy: levers.World, staff: tuple[np.ndarray, float],
            seed: int, k: int) -> dict[str, float]:  # fmt: skip
    def r1(w: levers.World) -> float:
        return levers.evaluate(v, w, FIT)["single_r1"]

    true = v.train_labels[noisy.store_idx]
    mis = noisy.store_labels != true
    row = {"clean": r1(clean), "as_is": r1(noisy), "mistaps": float(mis.sum()), "photos": float(len(mis))}
    u = np.random.default_rng(1000 + 10 * seed + k).random(len(mis))
    for c, f in DETECTORS:
        drop = (mis & (u < c)) | (~mis & (u < f))
        row[f"drop {c:g}/{f:g}"] = r1(replace(noisy, store_idx=noisy.store_idx[~drop],
                                              store_labels=noisy.store_labels[~drop]))  # fmt: skip
    labels, row["relabel_right"] = _relabelled(v, noisy, mis)
    row["relabel"] = r1(replace(noisy, store_labels=labels))
    row["true"] = r1(replace(noisy, store_labels=true))
    row["staff"] = r1(replace(noisy, store_labels=staff[0]))
    row["held"] = staff[1]
    return row


def main() -> int:
    from threadpoolctl import threadpool_limits

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="train,block,val")
    a = ap.parse_args()
    v = levers.replay_vectors()
    res: dict[str, Any] = {}
    with threadpool_limits(limits=1, user_api="blas"):
        for kind in a.worlds.split(","):
            seeds = (0,) if kind == "val" else levers.TRAIN_SEEDS
            states = [(s, levers.worlds(v, kind, s, False), levers.worlds(v, kind, s, True)) for s in seeds]
            staff = [_staff_labels(v, noisy) for _, _, noisy in states]
            for k in levers.KS:
                runs = [measure(v, clean[k], noisy[k], st[k], s, k)
                        for (s, clean, noisy), st in zip(states, staff, strict=True)]  # fmt: skip
                row = {m: round(float(np.mean([r[m] for r in runs])), 4) for m in runs[0]}
                res.setdefault(kind, {})[k] = row
                gaps = " ".join(f"{d} {100 * (row['clean'] - row[d]):.1f}"
                                for d in row if d.startswith(("as_is", "drop", "relabel", "true", "staff"))
                                and d != "relabel_right")  # fmt: skip
                print(f"{kind:5s} k={k:2d} clean R@1 {row['clean']:.3f}, {row['mistaps']:.0f} of "
                      f"{row['photos']:.0f} photos mis-tapped; gap (points): {gaps}; "
                      f"relabel right {row['relabel_right']:.2f}; staff looked at {row['held']:.2f} "
                      "of the photos", flush=True)  # fmt: skip
    out = OUT / "mistap_ceiling.json"
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`make eval`'s store-domain rows: protocol A (one studio image per item) on products the bundle never saw.

The items are split in two halves; a bundle is tuned (models.tune) on one half's store photos (train +
iconic), and protocol A runs on the other half: catalog = its iconic images, queries = its val photos.
Both folds, pooled, next to the untuned base bundle on the same half catalogs (which start higher than
the 81-item catalog: fewer items to confuse). "random" halves share categories (other apple varieties);
"coarse" halves never do (a category and all its varieties stay on one side).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cloud.retrieval import fit_lda_adapter, item_scores
from cloud.retrieval_augment import augmented_views
from scripts.eval_data import DATA, N_ITEMS, OUT, Embeddings, Split, concat, only, seed_of, tuned_bundle

RANDOM_SEED = 11  # the random halves
COARSE_SEED = 5  # the order coarse categories are dealt into the first half
HALF = 41  # the first half takes whole coarse categories up to this many items


def halves(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint item sets covering all items: at random, or by whole coarse category."""
    if kind == "random":
        perm = np.random.default_rng(RANDOM_SEED).permutation(N_ITEMS)
        first = perm[:40]
    else:
        coarse: dict[int, int] = {}
        for line in (DATA / "train.txt").read_text().splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 3:
                coarse[int(parts[1])] = int(parts[2])
        cats = np.array(sorted(set(coarse.values())))
        np.random.default_rng(COARSE_SEED).shuffle(cats)
        picked: list[int] = []
        for c in cats:
            members = [item for item, cat in coarse.items() if cat == c]
            if len(picked) + len(members) <= HALF:
                picked += members
        first = np.array(picked)
    first = np.sort(first)
    return first, np.setdiff1d(np.arange(N_ITEMS), first)


def _recalls(
    queries: np.ndarray, q_labels: np.ndarray, catalog: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """(hits@1, hits@5) counts."""
    top = np.argsort(-item_scores(queries @ catalog.T, labels, N_ITEMS), axis=1)[:, :5]
    return np.array([np.sum(top[:, 0] == q_labels), np.sum((top == q_labels[:, None]).any(axis=1))])


def _fold(bundle: Path, iconic: Split, val: Split, views: int) -> tuple[dict[str, np.ndarray], int]:
    """Hit counts of one bundle on one half catalog, plain and adapted; and the images embedded now."""
    from models.embedder import Embedder

    with Embedder(bundle, mode="throughput") as embedder:
        emb = Embeddings(embedder, OUT / "cache")
        x = emb.get(iconic.paths, lambda im, sha: [im], "orig", 1)
        aug = emb.get(iconic.paths, lambda im, sha: augmented_views(im, views, seed_of(sha)), f"aug{views}",
                      views)  # fmt: skip
        q = emb.get(val.paths, lambda im, sha: [im], "orig", 1)
    labels = iconic.labels
    adapter = fit_lda_adapter(np.vstack([x, aug]), np.concatenate([labels, np.repeat(labels, views)]))
    hits = {
        "plain": _recalls(q, val.labels, x, labels),
        "adapted": _recalls(adapter.apply(q), val.labels, adapter.apply(x), labels),
    }
    return hits, emb.computed


def new_products(base: Path, iconic: Split, train: Split, val: Split, views: int) -> dict[str, Any]:
    """R@1/R@5 pooled over both folds, per split kind, for the base bundle and the store-domain one."""
    out: dict[str, Any] = {"embedded": 0}
    for kind in ("random", "coarse"):
        first, second = halves(kind)
        sums: dict[str, dict[str, np.ndarray]] = {}
        folds = []
        n = 0
        for k, (seen, new) in enumerate(((first, second), (second, first))):
            tag = f"domain{k}" + ("" if kind == "random" else kind)
            domain = tuned_bundle(base, only(concat(train, iconic), seen), tag)
            ic, va = only(iconic, new), only(val, new)
            n += len(va.paths)
            fold = {}
            for name, bundle in (("base", base), ("store-domain", domain)):
                fold[name], embedded = _fold(bundle, ic, va, views)
                out["embedded"] += embedded
            folds.append({b: {m: (c / len(va.paths)).round(3).tolist() for m, c in r.items()}
                          for b, r in fold.items()})  # fmt: skip
            for b, r in fold.items():
                for m, c in r.items():
                    sums.setdefault(b, {}).setdefault(m, np.zeros(2))
                    sums[b][m] = sums[b][m] + c
        out[kind] = {
            "pooled": {b: {m: {"r1": float(c[0] / n), "r5": float(c[1] / n)} for m, c in r.items()}
                       for b, r in sums.items()},
            "folds": folds, "queries": n, "items": [len(first), len(second)],
        }  # fmt: skip
    return out


def print_new_products(res: dict[str, Any]) -> None:
    print("\nstore-domain bundle, protocol A on products it never saw (2-fold halves: tuned on one half's "
          "store photos, A on the other's iconic images; pooled):")  # fmt: skip
    print(f"{'halves':8} {'bundle':13} {'plain R@1':>9} {'R@5':>6} {'+LDA, aug. views R@1':>21} {'R@5':>6}")
    for kind, r in res.items():
        pooled = r["pooled"]
        for b in ("base", "store-domain"):
            p, a = pooled[b]["plain"], pooled[b]["adapted"]
            print(f"{kind:8} {b:13} {p['r1']:9.3f} {p['r5']:6.3f} {a['r1']:21.3f} {a['r5']:6.3f}")

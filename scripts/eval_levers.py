"""Levers on the store-learning loop's cloud build, measured in seconds on cached pooled vectors (issue 19).

The loop (scripts/eval_loop.py) builds real snapshots; this script replays what the build fits, in numpy,
so that one variant costs seconds: catalog = the 81 iconic images + k store photos per product (crops as
the kiosk sends them, 10% mis-taps onto one of the 5 shown products in the ``mistap`` loop), the product's
mis-tap filter (``relearn.likely_mistaps``), a shrinkage-LDA fit on catalog + store photos, item scores.

Two worlds:
- ``train`` / ``block``: a lever is CHOSEN here. Per seed, each product's train photos are split in half
  (at random, or in file order for ``block``): store photos are drawn from one half, the other half are
  the queries (pseudo-val). Val is never read.
- ``val``: the loop's own draw (eval_loop.SEED's order of the train photos), queries = val photos; run once
  per chosen lever to confirm it.

Variants (``VARIANTS``): shrinkage / out_dim of the LDA, the iconic image's weight in the fit, item scoring
(best image, mean of the 2 best, best image + a share of the prototype's similarity), flipped views of the
store photos in the fit. Writes build/eval/levers.json.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cloud import retrieval  # noqa: E402
from cloud.feedback.relearn import likely_mistaps  # noqa: E402
from cloud.retrieval import DEFAULT_SHRINKAGE, MAX_OUT_DIM, Adapter, item_scores, normalize_rows  # noqa: E402
from cloud.retrieval_augment import augmented_views  # noqa: E402
from models.bundle import read_manifest  # noqa: E402
from scripts.eval_data import OUT, VIEWS, Embeddings, read_iconic, read_split, seed_of  # noqa: E402
from scripts.eval_loop import CROP_QUALITY, CROP_SIDE_PX, MISTAP_RATE, SEED, _crop_jpeg  # noqa: E402

KS = (1, 3, 5, 10)
VIEWS3 = ("c80", "c80flip")  # with flip_fit: the three extra views of a store photo
TRAIN_SEEDS = (101, 102, 103, 104, 105)
N_ITEMS = 81
ICONIC_VIEWS = 16  # as scripts/eval_grocery.py (same cache files)


@dataclass(frozen=True)
class Variant:
    """One way to fit and score a snapshot of catalog + store photos."""

    shrinkage: float = DEFAULT_SHRINKAGE
    out_dim: int | None = None
    iconic_weight: float = 1.0  # weight of the catalog image in the fit (store photos weigh 1)
    score: str = "max"  # max | top2 | proto:<alpha> (best image + alpha * prototype) | protorow
    flip_fit: bool = False  # flipped views of the store photos join the fit (not the index)
    views_fit: tuple[str, ...] = ()  # more views of the store photos in the fit: c80, c80flip
    flip_index: bool = False  # ... and the index
    iconic_aug_fit: bool = False  # the iconic image's augmented views join the fit
    shift: str = ""  # "index" | "fit": iconic rows moved by (store mean - iconic mean) in model space
    iconic_bias: float = 0.0  # added to an iconic row's similarity before an item's best image
    drop_iconic: bool = False  # no iconic row in the index for a product with a store photo
    mix: float = 0.0  # + mix * the model-space cosine (centred on the fit's mean) of query and row
    extra: dict[str, Any] = field(default_factory=dict)


def fit_lda(x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None, *, shrinkage: float,
            out_dim: int | None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """``cloud.retrieval.fit_lda_adapter`` with sample weights, solved in the span of the centred data
    (exact: outside it the shrunk scatter is isotropic and the class means have no component). Returns
    (mean, matrix)."""
    x = np.asarray(x, np.float64)
    w = np.ones(len(x)) if w is None else np.asarray(w, np.float64)
    items, inv = np.unique(y, return_inverse=True)
    dim = x.shape[1]
    cw = np.bincount(inv, weights=w)
    means = np.zeros((len(items), dim))
    np.add.at(means, inv, x * w[:, None])
    means /= cw[:, None]
    mu = (x * w[:, None]).sum(0) / w.sum()
    within = (x - means[inv]) * np.sqrt(w / w.sum() * len(x))[:, None]
    # An orthonormal basis containing the span of the within residuals and the centred means (extra
    # directions are harmless: no scatter and no mean there, as outside the span).
    stacked = np.vstack([within, means - mu]).T
    basis = np.linalg.qr(stacked)[0] if stacked.shape[1] < dim else np.eye(dim)
    wb = within @ basis
    sw_span = wb.T @ wb / len(x)
    trace = np.trace(sw_span)  # trace of the full within scatter: nothing outside the span
    iso = trace / dim + 1e-12
    sw = (1.0 - shrinkage) * sw_span + shrinkage * iso * np.eye(basis.shape[1])
    eig_w, vec_w = np.linalg.eigh(sw)
    whiten = basis @ (vec_w / np.sqrt(np.maximum(eig_w, 1e-12)))
    centred = (means - mu) @ whiten
    _, sv_b, vt_b = np.linalg.svd(centred, full_matrices=False)  # eigenvectors of the between scatter
    keep = min(out_dim or MAX_OUT_DIM, len(items) - 1, dim)
    order = np.argsort(-sv_b, kind="stable")[:keep]
    return mu.astype(np.float32), (whiten @ vt_b[order].T).astype(np.float32)


def fast_lda_adapter(vectors: Any, labels: Any, *, shrinkage: float = DEFAULT_SHRINKAGE,
                     out_dim: int | None = None) -> Adapter:  # fmt: skip
    """Drop-in for ``fit_lda_adapter`` (same result, solved in the data's span): the mis-tap filter's
    cross-fits run through it here."""
    return Adapter(*fit_lda(vectors, np.asarray(labels), shrinkage=shrinkage, out_dim=out_dim))


def project(mean: np.ndarray, matrix: np.ndarray, x: np.ndarray) -> np.ndarray:
    return normalize_rows((x - mean) @ matrix)


@dataclass
class Vectors:
    iconic: np.ndarray  # (81, d) unit, row i = product i
    iconic_aug: np.ndarray  # (81, ICONIC_VIEWS, d) augmented views of each (cloud.retrieval_augment)
    crops: np.ndarray  # (n_train, d) store-photo crops as the kiosk sends them
    crops_flip: np.ndarray | None
    crop_views: dict[str, np.ndarray]  # more views of the crops (cached by an earlier run), by VIEWS tag
    train_labels: np.ndarray
    val_single: np.ndarray
    val_frames: np.ndarray
    val_labels: np.ndarray


@dataclass
class World:
    """One catalog + store photos state: rows (model space) with labels, flags, and the queries."""

    store_idx: np.ndarray  # train rows used as store photos (after the mis-tap filter)
    store_labels: np.ndarray  # the label the photo got (mis-taps included)
    queries: dict[str, np.ndarray]
    q_labels: np.ndarray


def load(flip: bool, bundle: Path, views: tuple[str, ...] = ()) -> Vectors:
    """The cached pooled vectors; ``views`` (VIEWS tags of the store-photo crops) are embedded when missing,
    other crop views are read only if an earlier run cached them."""
    import cv2

    from scripts.eval_loop import _data

    d, embedder = _data(bundle)
    try:
        emb = Embeddings(embedder, OUT / "cache")
        iconic = emb.get(read_iconic().paths, lambda im, sha: [im], "orig", 1)
        ic = read_iconic()
        iconic_aug = emb.get(ic.paths, lambda im, sha: augmented_views(im, ICONIC_VIEWS, seed_of(sha)),
                             f"aug{ICONIC_VIEWS}", ICONIC_VIEWS)  # fmt: skip

        def crop_view(tag: str) -> Callable[[np.ndarray, str], list[np.ndarray]]:
            def make(im: np.ndarray, sha: str) -> list[np.ndarray]:
                c = cv2.imdecode(np.frombuffer(_crop_jpeg(im), np.uint8), cv2.IMREAD_COLOR)
                return [VIEWS[tag](c)]

            return make

        train = read_split("train").paths
        tag0 = f"crop{CROP_SIDE_PX}q{CROP_QUALITY}"
        flips = emb.get(train, crop_view("flip"), f"{tag0}flip", 1) if flip else None
        cached = [t for t in ("c80", "c80flip") if t not in views and emb.cached(train, tag0 + t)]
        crop_views = {t: normalize_rows(emb.get(train, crop_view(t), tag0 + t, 1)) for t in (*views, *cached)}
    finally:
        getattr(embedder, "close", lambda: None)()
    order = np.argsort(ic.labels)
    aug = normalize_rows(iconic_aug).reshape(len(order), ICONIC_VIEWS, -1)[order]
    return Vectors(normalize_rows(iconic[order]), aug, normalize_rows(d.crop_vecs),
                   None if flips is None else normalize_rows(flips), crop_views, d.train_labels,
                   normalize_rows(d.q_single), normalize_rows(d.q_frames), d.q_labels)  # fmt: skip


def replay_vectors(bundle: Path | None = None, views: tuple[str, ...] = ("c80",)) -> Vectors:
    """The cached vectors for a numpy replay of the build (the ceiling scripts): the adapter fit swapped for
    ``fast_lda_adapter``, the store photos' ``views`` embedded when missing."""
    retrieval.fit_lda_adapter = fast_lda_adapter  # type: ignore[assignment]
    from scripts.eval_grocery import _bundle

    return load(False, bundle or _bundle(), views)


def snapshot_scores(v: Vectors, store_idx: np.ndarray, store_labels: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Item scores (queries x N_ITEMS) of model-space queries ``q`` in the plain (baseline) snapshot of the
    catalog plus these store photos: what the kiosk ranks by and the auto rule judges in."""
    x = np.vstack([v.iconic, v.crops[store_idx]])
    y = np.concatenate([np.arange(N_ITEMS), store_labels])
    mean, mat = fit_lda(x, y, shrinkage=DEFAULT_SHRINKAGE, out_dim=None)
    scores: np.ndarray = item_scores(project(mean, mat, q) @ project(mean, mat, x).T, y, N_ITEMS)
    return scores


def _shown(v: Vectors, store_idx: np.ndarray, store_labels: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The 5 products the current (baseline) snapshot shows for model-space queries ``q``."""
    return np.argsort(-snapshot_scores(v, store_idx, store_labels, q), axis=1)[:, :5]


def worlds(v: Vectors, kind: str, seed: int, mistaps: bool) -> dict[int, World]:
    """The loop's states for k in KS: the store photos drawn (mis-taps labelled as the customer tapped,
    "shown" from the previous k's snapshot), then the product's mis-tap filter."""
    rng = np.random.default_rng(SEED if kind == "val" else seed)
    order: dict[int, np.ndarray] = {}
    queries: list[int] = []
    for p in range(N_ITEMS):
        perm = rng.permutation(np.flatnonzero(v.train_labels == p))
        if kind == "val":
            order[p] = perm
        elif kind == "block":  # file order ~ shooting order: one half stores, the other queries
            own = np.flatnonzero(v.train_labels == p)
            half = len(own) // 2
            pool, rest = (own[:half], own[half:]) if seed % 2 else (own[half:], own[:half])
            order[p], queries = rng.permutation(pool), [*queries, *rest.tolist()]
        else:
            half = len(perm) // 2
            order[p], queries = perm[:half], [*queries, *perm[half:].tolist()]
    if kind == "val":
        qs = {"single": v.val_single, "frames": v.val_frames}
        ql = v.val_labels
    else:
        qi = np.asarray(queries)
        qs, ql = {"single": v.crops[qi]}, v.train_labels[qi]
    mis_rng = np.random.default_rng((SEED if kind == "val" else seed) + 1)
    idx: list[int] = []
    lab: list[int] = []
    out: dict[int, World] = {}
    prev = 0
    for k in KS:
        new = [int(i) for p in range(N_ITEMS) for i in order[p][prev:k]]
        shown = _shown(v, np.asarray(idx, np.int64), np.asarray(lab, np.int64), v.crops[new])
        for i, sh in zip(new, shown, strict=True):
            p = int(v.train_labels[i])
            chosen = p
            if mistaps and mis_rng.random() < MISTAP_RATE:
                others = [int(s) for s in sh if s != p]
                chosen = others[int(mis_rng.integers(len(others)))]
            idx.append(i)
            lab.append(chosen)
        prev = k
        si, sl = np.asarray(idx), np.asarray(lab)
        x = np.vstack([v.iconic, v.crops[si]])
        y = np.concatenate([np.arange(N_ITEMS), sl])
        is_store = np.r_[np.zeros(N_ITEMS, bool), np.ones(len(si), bool)]
        suspect = likely_mistaps(x, [f"P{int(t):02d}" for t in y], is_store)[N_ITEMS:]
        out[k] = World(si[~suspect], sl[~suspect], qs, ql)
    return out


def evaluate(v: Vectors, w: World, var: Variant) -> dict[str, float]:
    """R@1 / R@5 of ``var``'s snapshot for world ``w``'s queries."""
    store = v.crops[w.store_idx]
    iconic = v.iconic
    if var.shift and len(store):
        iconic = normalize_rows(iconic + (store.mean(0) - v.iconic.mean(0)))
    fit_iconic = iconic if var.shift == "fit" else v.iconic
    x_fit = [fit_iconic, store]
    y_fit = [np.arange(N_ITEMS), w.store_labels]
    wt = [np.full(N_ITEMS, var.iconic_weight), np.ones(len(store))]
    if var.flip_fit and v.crops_flip is not None:
        x_fit.append(v.crops_flip[w.store_idx])
        y_fit.append(w.store_labels)
        wt.append(np.ones(len(store)))
    for tag in var.views_fit:
        x_fit.append(v.crop_views[tag][w.store_idx])
        y_fit.append(w.store_labels)
        wt.append(np.ones(len(store)))
    if var.iconic_aug_fit:
        x_fit.append(v.iconic_aug.reshape(-1, v.iconic_aug.shape[-1]))
        y_fit.append(np.repeat(np.arange(N_ITEMS), v.iconic_aug.shape[1]))
        wt.append(np.ones(N_ITEMS * v.iconic_aug.shape[1]))
    x, y = np.vstack(x_fit), np.concatenate(y_fit)
    mean, mat = fit_lda(x, y, np.concatenate(wt), shrinkage=var.shrinkage, out_dim=var.out_dim)
    ic_items = np.arange(N_ITEMS)
    if var.drop_iconic:
        ic_items = np.setdiff1d(ic_items, w.store_labels)
    rows_x = [iconic[ic_items], store]
    rows_y = [ic_items, w.store_labels]
    if var.flip_index and v.crops_flip is not None:
        rows_x.append(v.crops_flip[w.store_idx])
        rows_y.append(w.store_labels)
    idx_v = project(mean, mat, np.vstack(rows_x))
    idx_y = np.concatenate(rows_y)
    proto = normalize_rows(np.stack([idx_v[idx_y == p].mean(0) for p in range(N_ITEMS)]))
    out: dict[str, float] = {}
    for tag, q in w.queries.items():
        pq = project(mean, mat, q)
        sims = pq @ idx_v.T
        if var.mix:
            raw = normalize_rows(np.vstack(rows_x) - mean)
            sims = sims + var.mix * (normalize_rows(q - mean) @ raw.T)
        sims[:, : len(ic_items)] += var.iconic_bias
        if var.score == "max":
            s = item_scores(sims, idx_y, N_ITEMS)
        elif var.score == "top2":
            s = item_scores(sims, idx_y, N_ITEMS, per_item=2)
        elif var.score.startswith("proto:"):
            alpha = float(var.score.split(":")[1])
            s = (1 - alpha) * item_scores(sims, idx_y, N_ITEMS) + alpha * (pq @ proto.T)
        elif var.score.startswith("soft:"):
            t = float(var.score.split(":")[1])
            e = np.exp((sims - sims.max(1, keepdims=True)) / t)
            s = np.zeros((len(q), N_ITEMS), np.float32)
            np.add.at(s.T, idx_y, e.T)
            s = np.log(s + 1e-30)
        elif var.score == "protorow":
            s = np.maximum(item_scores(sims, idx_y, N_ITEMS), pq @ proto.T)
        else:
            raise ValueError(var.score)
        top = np.argsort(-s, axis=1)[:, :5]
        out[f"{tag}_r1"] = float(np.mean(top[:, 0] == w.q_labels))
        out[f"{tag}_r5"] = float(np.mean((top == w.q_labels[:, None]).any(1)))
    return out


VARIANTS: dict[str, Callable[[], Variant]] = {
    "base": lambda: Variant(),
    **{f"shrink{s}": (lambda s=s: Variant(shrinkage=s)) for s in (0.05, 0.1, 0.2, 0.5, 0.7)},
    **{f"dim{d}": (lambda d=d: Variant(out_dim=d)) for d in (64, 48, 32)},
    **{f"iconic_w{w}": (lambda w=w: Variant(iconic_weight=w)) for w in (0.5, 2.0, 4.0)},
    "top2": lambda: Variant(score="top2"),
    **{f"proto{a}": (lambda a=a: Variant(score=f"proto:{a}")) for a in (0.25, 0.5)},
    "protorow": lambda: Variant(score="protorow"),
    **{f"soft{t}": (lambda t=t: Variant(score=f"soft:{t}")) for t in (0.02, 0.05)},
    "iconic_aug": lambda: Variant(iconic_aug_fit=True),
    "shift_index": lambda: Variant(shift="index"),
    "shift_fit": lambda: Variant(shift="fit"),
    **{f"bias{b}": (lambda b=b: Variant(iconic_bias=b)) for b in (-0.1, -0.05, 0.05)},
    "drop_iconic": lambda: Variant(drop_iconic=True),
    **{f"mix{m}": (lambda m=m: Variant(mix=m)) for m in (0.25, 0.5, 1.0, 2.0)},
    "flip_fit": lambda: Variant(flip_fit=True),
    "views3_fit": lambda: Variant(flip_fit=True, views_fit=("c80", "c80flip")),
    "c80_fit": lambda: Variant(views_fit=("c80",)),
    **{f"views3_fit_shrink{x}": (lambda x=x: Variant(flip_fit=True, views_fit=VIEWS3, shrinkage=x))
       for x in (0.1, 0.5)},
    "views3_aug_fit": lambda: Variant(flip_fit=True, views_fit=("c80", "c80flip"), iconic_aug_fit=True),
    "flip_fit_index": lambda: Variant(flip_fit=True, flip_index=True),
}


def main() -> int:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):  # 2 threads spin against other work here
        return _main()


def _main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", choices=("train", "block", "val"), default="train")
    ap.add_argument("--variants", default="base", help="comma-separated names of VARIANTS, or 'all'")
    ap.add_argument("--loops", default="clean,mistap")
    ap.add_argument("--seeds", type=int, default=len(TRAIN_SEEDS), help="train world: how many seeds")
    ap.add_argument("--flip", action="store_true", help="embed/read flipped store crops (flip_* variants)")
    ap.add_argument("--out", default="levers")
    ap.add_argument("--bundle", type=Path, default=None,
                    help="another backbone's bundle (default: MobileNetV2, exported afresh)")
    a = ap.parse_args()
    names = list(VARIANTS) if a.variants == "all" else a.variants.split(",")
    retrieval.fit_lda_adapter = fast_lda_adapter  # type: ignore[assignment]
    from scripts.eval_grocery import _bundle

    bundle = a.bundle or _bundle()
    v = load(a.flip or any(n.startswith("flip") for n in names), bundle)
    model = read_manifest(bundle).model_id[:12]  # a world's vectors are one model's
    seeds = (0,) if a.world == "val" else TRAIN_SEEDS[: a.seeds]
    t0 = time.perf_counter()
    states = {}
    for loop in a.loops.split(","):
        for s in seeds:
            cached = OUT / "levers-worlds" / f"{model}-{a.world}-{loop}-{s}.pkl"
            if cached.exists():
                states[(loop, s)] = pickle.loads(cached.read_bytes())
            else:
                states[(loop, s)] = worlds(v, a.world, s, loop == "mistap")
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.write_bytes(pickle.dumps(states[(loop, s)]))
    print(f"worlds ready in {time.perf_counter() - t0:.0f} s", flush=True)
    res: dict[str, Any] = {}
    for name in names:
        var = VARIANTS[name]()
        t0 = time.perf_counter()
        for loop in a.loops.split(","):
            for k in KS:
                runs = [evaluate(v, states[(loop, s)][k], var) for s in seeds]
                res.setdefault(name, {}).setdefault(loop, {})[k] = {
                    m: round(float(np.mean([r[m] for r in runs])), 4) for m in runs[0]
                }
        line = " | ".join(
            f"{loop} " + " ".join(f"k{k}:{r['single_r1']:.3f}/{r['single_r5']:.3f}" for k, r in by_k.items())
            for loop, by_k in res[name].items()
        )
        print(f"{name:16s} {line}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        if a.world == "val":
            print(" " * 17 + "frames: " + " | ".join(
                f"{loop} " + " ".join(f"k{k}:{r['frames_r1']:.3f}" for k, r in by_k.items())
                for loop, by_k in res[name].items()), flush=True)  # fmt: skip
    path = OUT / f"{a.out}-{a.world}.json"
    prev = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**prev, **res}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

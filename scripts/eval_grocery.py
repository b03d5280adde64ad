"""`make eval`: retrieval quality on ../shared/data/grocery, baseline against each improvement.

Protocols: (A) catalog = the 81 iconic images; (B) catalog = train photos + iconic images; queries are
always the val photos, which nothing is ever fitted on. Open set: a fixed, seeded 20% of the items is
left out of the catalog (and out of everything fitted on it); their queries should get "no match" at
the threshold calibrated from the catalog alone (cloud.retrieval.calibrate_threshold).

Rows are cumulative. "Kiosk multi-frame proxy" rows average the embeddings of 5 views of each val
photo (itself, a flip, two 80% centre crops, an 87.5% centre crop) to stand in for the steady frames a
kiosk already embeds; they are not single-image results. "Tuned tail" rows use a bundle tuned
(models.tune) on that protocol's own catalog images, and their open-set columns one tuned without the
unseen items; tuned bundles are cached under build/eval/tuned-* (about 10 minutes to make all four).

Writes build/eval/grocery.json and build/eval/grocery.png; embeddings are cached under build/eval/cache
keyed by (image sha256 [+ view tag], model_id).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cloud.open_set import OPEN_SET_KNOWN_LOSS, calibrate_open_set, is_match  # noqa: E402
from cloud.retrieval import (  # noqa: E402
    Adapter,
    Calibration,
    CalibrationError,
    aggregate_frames,
    calibrate_threshold,
    fit_lda_adapter,
    item_scores,
)
from cloud.retrieval_augment import augmented_views  # noqa: E402

_LOGGER = logging.getLogger("eval_grocery")

SHARED = Path(os.environ.get("SHARED", REPO.parent / "shared")).resolve()
DATA = SHARED / "data" / "grocery"
SOURCE = SHARED / "models" / "coral" / "tf2_mobilenet_v2_1.0_224_ptq.tflite"
OUT = REPO / "build" / "eval"
N_ITEMS = 81
ICONIC_VIEWS = 16  # augmented views per iconic image (the only image of an item in protocol A)
PHOTO_VIEWS = 1  # per train photo: photos already vary; more views measured no better
OPEN_SET_SEED = 6
OPEN_SET_SHARE = 0.2
QUERY_CROP = 0.875  # a further centre crop of the query, on top of the recipe's own 0.875 (models/export.py)
Vec = np.ndarray


# ---- data and embeddings ----


@dataclass
class Split:
    paths: list[Path]
    labels: np.ndarray


def _read_split(name: str) -> Split:
    paths, labels = [], []
    for line in (DATA / f"{name}.txt").read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 2 and parts[0]:
            paths.append(DATA / parts[0])
            labels.append(int(parts[1]))
    return Split(paths, np.asarray(labels, np.int64))


def _read_iconic() -> Split:
    import csv

    paths, labels = [], []
    with open(DATA / "classes.csv", newline="", encoding="utf-8") as fh:
        rows = csv.reader(fh)
        next(rows)
        for row in rows:
            paths.append(DATA / row[4].lstrip("/"))
            labels.append(int(row[1]))
    return Split(paths, np.asarray(labels, np.int64))


def _centre(img: np.ndarray, share: float) -> np.ndarray:
    h, w = img.shape[:2]
    ch, cw = max(1, round(h * share)), max(1, round(w * share))
    y, x = (h - ch) // 2, (w - cw) // 2
    return np.ascontiguousarray(img[y : y + ch, x : x + cw])


VIEWS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "orig": lambda im: im,
    "flip": lambda im: np.ascontiguousarray(im[:, ::-1]),
    "c80": lambda im: _centre(im, 0.8),
    "c80flip": lambda im: np.ascontiguousarray(_centre(im, 0.8)[:, ::-1]),
    "c875": lambda im: _centre(im, QUERY_CROP),
}


@functools.cache
def _file_sha256(path: Path) -> str:
    """An image's sha256, read once per run (every bundle and view asks again)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Embeddings:
    """Embeds images through the bundle, caching one .npy per (image sha256 + view tag, model_id)."""

    def __init__(self, embedder: Any, cache_root: Path) -> None:
        self.embedder = embedder
        self.cache = cache_root / embedder.model_id[:16]
        self.cache.mkdir(parents=True, exist_ok=True)
        self.computed = 0

    def get(self, paths: list[Path], make: Callable[[np.ndarray, str], list[np.ndarray]], tag: str,
            per_image: int) -> np.ndarray:  # fmt: skip
        """(len(paths) * per_image, dim): ``make(image, sha)`` yields ``per_image`` crops per path."""
        from models.images import load_image

        out = np.zeros((len(paths) * per_image, self.embedder.dim), np.float32)
        todo: list[tuple[int, Path, str]] = []
        for i, p in enumerate(paths):
            sha = _file_sha256(p)
            f = self.cache / f"{sha}-{tag}.npy"
            if f.exists():
                out[i * per_image : (i + 1) * per_image] = np.load(f)
            else:
                todo.append((i, p, sha))
        for start in range(0, len(todo), 32):
            chunk = todo[start : start + 32]
            crops: list[np.ndarray] = []
            for _, p, sha in chunk:
                crops.extend(make(load_image(p), sha))
            vecs = self.embedder.embed(crops).reshape(len(chunk), per_image, -1)
            for (i, _, sha), v in zip(chunk, vecs, strict=True):
                np.save(self.cache / f"{sha}-{tag}.npy", v)
                out[i * per_image : (i + 1) * per_image] = v
            self.computed += len(crops)
        return out


def _seed(sha: str) -> int:
    return int(sha[:8], 16)


# ---- scoring ----


@dataclass
class Catalog:
    vectors: np.ndarray  # model space, originals
    labels: np.ndarray
    aug: np.ndarray | None  # model space, augmented views
    aug_source: np.ndarray | None  # row of ``vectors`` each view came from

    def subset(self, keep_items: np.ndarray) -> Catalog:
        rows = np.flatnonzero(np.isin(self.labels, keep_items))
        if self.aug is None or self.aug_source is None:
            return Catalog(self.vectors[rows], self.labels[rows], None, None)
        remap = -np.ones(len(self.labels), np.int64)
        remap[rows] = np.arange(len(rows))
        use = np.isin(self.aug_source, rows)
        return Catalog(self.vectors[rows], self.labels[rows], self.aug[use], remap[self.aug_source[use]])


@dataclass(frozen=True)
class Method:
    name: str
    adapter: bool
    augment: bool
    query: str  # key into the query sets
    proxy: bool = False
    tuned: bool = False  # embedded by a bundle tuned on the catalog (models.tune)


def _adapter(cat: Catalog, m: Method) -> Adapter:
    if not m.adapter:
        return Adapter.identity(cat.vectors.shape[1])
    if m.augment and cat.aug is not None and cat.aug_source is not None:
        x = np.vstack([cat.vectors, cat.aug])
        y = np.concatenate([cat.labels, cat.labels[cat.aug_source]])
        return fit_lda_adapter(x, y)
    return fit_lda_adapter(cat.vectors, cat.labels)


def _scores(adapter: Adapter, cat: Catalog, queries: np.ndarray) -> np.ndarray:
    sims = adapter.apply(queries) @ adapter.apply(cat.vectors).T
    return item_scores(sims, cat.labels, N_ITEMS)


def _recall(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    top = np.argsort(-scores, axis=1)[:, :k]
    return float(np.mean((top == labels[:, None]).any(axis=1)))


def _unseen_items() -> np.ndarray:
    rng = np.random.default_rng(OPEN_SET_SEED)
    return np.sort(rng.choice(N_ITEMS, size=round(OPEN_SET_SHARE * N_ITEMS), replace=False))


def _open_set(cat: Catalog, m: Method, queries: np.ndarray, qy: np.ndarray) -> dict[str, Any]:
    unseen = _unseen_items()
    known = np.setdiff1d(np.arange(N_ITEMS), unseen)
    sub = cat.subset(known)
    adapter = _adapter(sub, m)
    try:
        cal: Calibration = calibrate_threshold(
            sub.vectors, sub.labels, aug_vectors=sub.aug, aug_source=sub.aug_source,
            fit_adapter=m.adapter, fit_with_aug=m.augment,
        )  # fmt: skip
        cal_row: dict[str, Any] = {
            "known_kept": cal.known_kept, "unseen_rejected": cal.unseen_rejected,
            "known_correct": cal.known_correct, "unseen_total": cal.unseen_total}  # fmt: skip
        threshold = cal.threshold
    except CalibrationError as e:  # one image per item: nothing to calibrate on, never "no match"
        threshold, cal_row = -1.0, {"none": str(e)}
    scores = _scores(adapter, sub, queries)
    best = scores.max(1)
    top1 = scores.argmax(1)
    is_known = np.isin(qy, known)
    grid = np.linspace(-0.2, 1.0, 121)
    correct = top1[is_known] == qy[is_known]
    try:
        rule = calibrate_open_set(
            sub.vectors, sub.labels, aug_vectors=sub.aug, aug_source=sub.aug_source,
            fit_adapter=m.adapter, fit_with_aug=m.augment, max_known_loss=OPEN_SET_KNOWN_LOSS,
        )  # fmt: skip
        answered = np.array([is_match(rule, row) for row in scores])
        rule_row: dict[str, Any] = rule.to_dict()
    except CalibrationError as e:  # as the build: no rule, the kiosk always answers
        answered, rule_row = np.ones(len(scores), bool), {"kind": "none", "why": str(e)}
    return {
        "rule": {
            **rule_row,
            "no_match_unseen": float(np.mean(~answered[~is_known])),
            "known_r1_at_threshold": float(np.mean(correct & answered[is_known])),
        },
        "unseen_items": unseen.tolist(),
        "threshold": threshold,
        "calibration": cal_row,
        "no_match_unseen": float(np.mean(best[~is_known] < threshold)),
        "known_r1_free": float(np.mean(correct)),
        "known_r1_at_threshold": float(np.mean(correct & (best[is_known] >= threshold))),
        "known_false_no_match": float(np.mean(best[is_known] < threshold)),
        "curve": {
            "threshold": grid.round(3).tolist(),
            "known_r1": [float(np.mean(correct & (best[is_known] >= t))) for t in grid],
            "unseen_no_match": [float(np.mean(best[~is_known] < t)) for t in grid],
        },
    }  # fmt: skip


# ---- cost ----


def _timings(embedder: Any, img: np.ndarray, cat_b: Catalog, adapter: Adapter) -> dict[str, float]:
    """Median per-query times (ms): one embedding, baseline search, projection + projected search."""
    def median_ms(fn: Callable[[], object], n: int) -> float:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1000.0 * float(np.median(times))

    q = embedder.embed([img])
    raw = cat_b.vectors
    proj = adapter.apply(cat_b.vectors)
    embed_ms = median_ms(lambda: embedder.embed_one(img), 30)
    base_ms = median_ms(lambda: item_scores(q @ raw.T, cat_b.labels, N_ITEMS), 200)
    adapted_ms = median_ms(lambda: item_scores(adapter.apply(q) @ proj.T, cat_b.labels, N_ITEMS), 200)
    return {"embed_ms": embed_ms, "search_base_ms": base_ms, "search_adapter_ms": adapted_ms}


# ---- main ----


def _bundle() -> Path:
    """Export afresh every run (under a second): a bundle kept from an older export would measure the old
    graph; the embedding cache is keyed by model_id, so an unchanged graph still embeds nothing."""
    from models.export import export_model

    bundle = OUT / "bundle"
    _LOGGER.info("exporting %s to %s", SOURCE.name, bundle)
    export_model(str(SOURCE), bundle)
    return bundle


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, proto in zip(axes, ("A", "B"), strict=True):
        for name, style in (("baseline", "--"), (results["best"], "-")):
            o = results["protocols"][proto][name]["open_set"]
            c = o["curve"]
            ax.plot(c["threshold"], c["known_r1"], style, color="tab:blue", label=f"{name}: in-catalog R@1")
            ax.plot(c["threshold"], c["unseen_no_match"], style, color="tab:red",
                    label=f"{name}: unseen no match")  # fmt: skip
            ax.axvline(o["threshold"], linestyle=style, color="gray")
        ax.set_title(f"protocol {proto}: open set ({round(OPEN_SET_SHARE * 100)}% of items left out)")
        ax.set_xlabel("similarity threshold (vertical lines: calibrated from the catalog)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="center left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class Sets:
    """Everything one bundle embeds: both protocols' catalogs and the query sets."""

    embedder: Any
    emb: Embeddings
    cat_a: Catalog
    cat_b: Catalog
    queries: dict[str, np.ndarray]


def _embed_sets(bundle: Path, iconic: Split, train: Split, val: Split) -> Sets:
    from models.embedder import Embedder

    embedder = Embedder(bundle, mode="latency")
    emb = Embeddings(embedder, OUT / "cache")

    def one(tag: str) -> Callable[[np.ndarray, str], list[np.ndarray]]:
        return lambda im, sha: [VIEWS[tag](im)]

    def views(n: int) -> Callable[[np.ndarray, str], list[np.ndarray]]:
        return lambda im, sha: augmented_views(im, n, _seed(sha))

    ic_v = emb.get(iconic.paths, one("orig"), "orig", 1)
    ic_aug = emb.get(iconic.paths, views(ICONIC_VIEWS), f"aug{ICONIC_VIEWS}", ICONIC_VIEWS)
    tr_v = emb.get(train.paths, one("orig"), "orig", 1)
    tr_aug = emb.get(train.paths, views(PHOTO_VIEWS), f"aug{PHOTO_VIEWS}", PHOTO_VIEWS)
    qv = {tag: emb.get(val.paths, one(tag), tag, 1) for tag in VIEWS}
    queries = {
        "orig": qv["orig"],
        "c875": qv["c875"],
        "frames": np.stack(
            [aggregate_frames(np.stack([qv[t][i] for t in VIEWS])) for i in range(len(val.paths))]
        ),
    }
    n_ic = len(iconic.paths)
    cat_a = Catalog(ic_v, iconic.labels, ic_aug, np.repeat(np.arange(n_ic), ICONIC_VIEWS))
    cat_b = Catalog(
        np.vstack([tr_v, ic_v]), np.concatenate([train.labels, iconic.labels]),
        np.vstack([tr_aug, ic_aug]),
        np.concatenate([np.repeat(np.arange(len(tr_v)), PHOTO_VIEWS),
                        len(tr_v) + np.repeat(np.arange(n_ic), ICONIC_VIEWS)]),
    )  # fmt: skip
    return Sets(embedder, emb, cat_a, cat_b, queries)


def _row(cat: Catalog, m: Method, queries: dict[str, np.ndarray], labels: np.ndarray,
         open_sets: Sets | None = None, proto: str = "B") -> dict[str, Any]:  # fmt: skip
    """R@1/R@5 on ``cat``; open-set figures on ``open_sets`` (a bundle that never saw the unseen items)."""
    adapter = _adapter(cat, m)
    scores = _scores(adapter, cat, queries[m.query])
    o_cat = cat if open_sets is None else (open_sets.cat_a if proto == "A" else open_sets.cat_b)
    o_q = queries if open_sets is None else open_sets.queries
    return {
        "r1": _recall(scores, labels, 1), "r5": _recall(scores, labels, 5),
        "dim": adapter.out_dim, "multi_frame_proxy": m.proxy,
        "open_set": _open_set(o_cat, m, o_q[m.query], labels),
    }  # fmt: skip


def _tuned(base: Path, split: Split, tag: str) -> Path:
    """The base bundle tuned (models.tune) on ``split``'s images; cached by base model_id, data, settings."""
    from models import tune
    from models.bundle import read_manifest, verify_bundle
    from models.errors import ModelError
    from models.images import load_image

    key = hashlib.sha256(json.dumps({
        "base": read_manifest(base).model_id, "paths": [str(p.relative_to(DATA)) for p in split.paths],
        "labels": split.labels.tolist(), "epochs": tune.EPOCHS, "convs": tune.TUNE_CONVS,
        "views": tune.VIEWS_PER_IMAGE, "lr": tune.LEARNING_RATE, "augment": "store-v1",
    }).encode()).hexdigest()[:12]  # fmt: skip
    out = OUT / f"tuned-{tag}-{key}"
    try:
        verify_bundle(out)
        return out
    except ModelError:
        pass
    print(f"tuning the bundle on {len(split.paths)} images ({tag}); a few minutes, cached in {out.name}",
          flush=True)  # fmt: skip
    loaders = [lambda p=p: load_image(p) for p in split.paths]
    # The augmentation `storelens model tune` uses: store-like views (background swap for shots on white).
    _, report = tune.tune_bundle(base, loaders, split.labels.tolist(), out, catalog_id=f"grocery-{tag}",
                                 augment=augmented_views)  # fmt: skip
    print(f"  tuned in {report.seconds:.0f} s: {report.views} views, loss by epoch {report.loss}", flush=True)
    return out


def _concat(a: Split, b: Split) -> Split:
    return Split(a.paths + b.paths, np.concatenate([a.labels, b.labels]))


def _only(split: Split, items: np.ndarray) -> Split:
    keep = np.isin(split.labels, items)
    return Split([p for p, k in zip(split.paths, keep, strict=True) if k], split.labels[keep])


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not DATA.is_dir() or not SOURCE.is_file():
        print(f"make eval needs ../shared (looked for {DATA} and {SOURCE}); set SHARED=/path/to/shared")
        return 2
    from models.images import load_image

    t0 = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    iconic, train, val = _read_iconic(), _read_split("train"), _read_split("val")
    base_bundle = _bundle()
    base = _embed_sets(base_bundle, iconic, train, val)
    embed_s = time.perf_counter() - t0
    methods = [
        Method("baseline", adapter=False, augment=False, query="orig"),
        Method("+ LDA adapter", adapter=True, augment=False, query="orig"),
        Method("+ augmented views in fit", adapter=True, augment=True, query="orig"),
        Method("+ query centre crop", adapter=True, augment=True, query="c875"),
        Method("baseline, multi-frame proxy", adapter=False, augment=False, query="frames", proxy=True),
        Method("full, multi-frame proxy", adapter=True, augment=True, query="frames", proxy=True),
    ]
    tuned_methods = [
        Method("tuned tail", adapter=False, augment=False, query="orig", tuned=True),
        Method("tuned tail + LDA (as built)", adapter=True, augment=False, query="orig", tuned=True),
        Method("tuned tail + LDA, aug. views", adapter=True, augment=True, query="orig", tuned=True),
        Method("tuned tail + query centre crop", adapter=True, augment=True, query="c875", tuned=True),
        Method("tuned tail full, multi-frame", adapter=True, augment=True, query="frames", proxy=True,
               tuned=True),
    ]  # fmt: skip
    results: dict[str, Any] = {"protocols": {}, "best": "tuned tail + LDA, aug. views"}
    for proto, cat in (("A", base.cat_a), ("B", base.cat_b)):
        results["protocols"][proto] = {m.name: _row(cat, m, base.queries, val.labels) for m in methods}

    # A bundle tuned on each protocol's own catalog; open-set rows use one tuned without the unseen items.
    t1 = time.perf_counter()
    known = np.setdiff1d(np.arange(N_ITEMS), _unseen_items())
    cat_b_split = _concat(train, iconic)
    tuned_a = _embed_sets(_tuned(base_bundle, iconic, "A"), iconic, train, val)
    tuned_a_known = _embed_sets(_tuned(base_bundle, _only(iconic, known), "A-known"), iconic, train, val)
    tuned_b = _embed_sets(_tuned(base_bundle, cat_b_split, "B"), iconic, train, val)
    tuned_b_known = _embed_sets(_tuned(base_bundle, _only(cat_b_split, known), "B-known"), iconic, train, val)
    for m in tuned_methods:
        rows_a, rows_b = results["protocols"]["A"], results["protocols"]["B"]
        rows_a[m.name] = _row(tuned_a.cat_a, m, tuned_a.queries, val.labels, tuned_a_known, "A")
        rows_b[m.name] = _row(tuned_b.cat_b, m, tuned_b.queries, val.labels, tuned_b_known, "B")
    results["tuned"] = {
        "model_ids": {"A": tuned_a.embedder.model_id, "B": tuned_b.embedder.model_id,
                      "A_known": tuned_a_known.embedder.model_id, "B_known": tuned_b_known.embedder.model_id},
        "seconds": time.perf_counter() - t1,
    }  # fmt: skip
    methods += tuned_methods

    probe = load_image(val.paths[0])
    timing = _timings(base.embedder, probe, base.cat_b, _adapter(base.cat_b, methods[2]))
    timing["embed_tuned_ms"] = _timings(tuned_b.embedder, probe, tuned_b.cat_b,
                                        _adapter(tuned_b.cat_b, methods[2]))["embed_ms"]  # fmt: skip
    base_cost = timing["embed_ms"] + timing["search_base_ms"]
    results["timing_ms"] = timing
    cost = {"baseline": 1.0}
    for m in methods[1:]:
        embed = timing["embed_tuned_ms"] if m.tuned else timing["embed_ms"]
        search = timing["search_adapter_ms"] if m.adapter else timing["search_base_ms"]
        cost[m.name] = (embed + search) / base_cost
    results["relative_kiosk_cost"] = cost
    every = (base, tuned_a, tuned_a_known, tuned_b, tuned_b_known)
    results["embedded_now"] = sum(s.emb.computed for s in every)
    results["embed_s"] = embed_s
    results["model_id"] = base.embedder.model_id
    results["total_s"] = time.perf_counter() - t0

    (OUT / "grocery.json").write_text(json.dumps(results, indent=1) + "\n")
    _plot(results, OUT / "grocery.png")
    _print_table(results, methods)
    return 0


def _print_table(results: dict[str, Any], methods: list[Method]) -> None:
    head = (f"{'method (cumulative)':32} {'A R@1':>6} {'A R@5':>6} {'A noM':>6} {'A in@t':>12} "
            f"{'A rule':>6} {'B R@1':>6} {'B R@5':>6} {'B noM':>6} {'B in@t':>12} "
            f"{'B ruleNoM':>9} {'B rule in@t':>11} {'cost':>5}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for m in methods:
        if m.proxy and not methods[methods.index(m) - 1].proxy:
            print("kiosk multi-frame proxy (not single-image results):")
        if m.tuned and not methods[methods.index(m) - 1].tuned:
            print("bundle tuned on each protocol's own catalog (models.tune; open-set columns: tuned "
                  "without the unseen items):")
        cells = [f"{m.name:32}"]
        for proto in ("A", "B"):
            r = results["protocols"][proto][m.name]
            o = r["open_set"]
            cells.append(f"{r['r1']:6.3f} {r['r5']:6.3f} {o['no_match_unseen']:6.3f} "
                         f"{o['known_r1_at_threshold']:.3f}/{o['known_r1_free']:.3f}")  # fmt: skip
            if proto == "A":  # one image per item: no rule can be calibrated, the kiosk always answers
                cells.append(f"{'none' if o['rule']['kind'] == 'none' else 'yes':>6}")
        rb = results["protocols"]["B"][m.name]["open_set"]["rule"]
        cells.append(f"{rb['no_match_unseen']:9.3f} {rb['known_r1_at_threshold']:11.3f}")
        cells.append(f"{results['relative_kiosk_cost'][m.name]:5.3f}")
        print(" ".join(cells))
    t = results["timing_ms"]
    print(
        f"\nnoM: share of unseen-item queries answered 'no match' at the catalog-calibrated threshold "
        f"({round(OPEN_SET_SHARE * 100)}% of items left out, seed {OPEN_SET_SEED}); in@t: in-catalog R@1 at "
        f"that threshold / threshold-free. rule: the same for cloud.open_set.calibrate_open_set/is_match "
        f"(top-1 + margin, calibrated with near-duplicate-aware hold-outs, giving up "
        f"{OPEN_SET_KNOWN_LOSS:.0%} of simulated right answers as the build does; A's one image per item "
        f"gives none: the kiosk always answers). '(as built)': what `catalog build` ships. cost: per-query "
        f"kiosk time relative to baseline (embed "
        f"{t['embed_ms']:.2f} ms, search {t['search_base_ms']:.3f} -> {t['search_adapter_ms']:.3f} ms)."
    )
    print(f"R@k is item-level (distinct items). Wrote {OUT / 'grocery.json'} and {OUT / 'grocery.png'} "
          f"in {results['total_s']:.0f} s ({results['embedded_now']} images embedded now).")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())

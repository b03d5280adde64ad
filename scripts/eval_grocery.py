"""`make eval`: retrieval quality on ../shared/data/grocery, baseline against each improvement.

Protocols: (A) catalog = the 81 iconic images; (B) catalog = train photos + iconic images; queries are
always the val photos, which nothing is ever fitted on. Open set: a fixed, seeded 20% of the items is
left out of the catalog (and out of everything fitted on it); their queries should get "no match" at
the threshold calibrated from the catalog alone (cloud.open_set.calibrate_open_set, no margin term).

Rows are cumulative. "Kiosk multi-frame proxy" rows average the embeddings of 5 views of each val
photo (itself, a flip, two 80% centre crops, an 87.5% centre crop) to stand in for the steady frames a
kiosk already embeds; they are not single-image results. "Tuned tail" rows use a bundle tuned
(models.tune) on that protocol's own catalog images, and their open-set columns one tuned without the
unseen items; tuned bundles are cached under build/eval/tuned-* (about 10 minutes to make all four).
Last, protocol A on products the bundle never saw, with a store-domain bundle (scripts/eval_domain.py,
four more tuned bundles).

Writes build/eval/grocery.json and build/eval/grocery.png; embeddings are cached under build/eval/cache
keyed by (image sha256 [+ view tag], model_id).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cloud.open_set import (  # noqa: E402
    OPEN_SET_KNOWN_LOSS,
    calibrate_open_set,
    is_match,
)
from cloud.retrieval import (  # noqa: E402
    Adapter,
    CalibrationError,
    aggregate_frames,
    fit_lda_adapter,
    item_scores,
)
from cloud.retrieval_augment import augmented_views  # noqa: E402
from scripts.eval_data import (  # noqa: E402
    DATA,
    N_ITEMS,
    OPEN_SET_SEED,
    OPEN_SET_SHARE,
    OUT,
    SOURCE,
    VIEWS,
    Embeddings,
    Split,
    concat,
    only,
    read_iconic,
    read_split,
    seed_of,
    tuned_bundle,
)
from scripts.eval_domain import new_products, print_new_products  # noqa: E402
from scripts.eval_report import plot, print_table, print_written  # noqa: E402

_LOGGER = logging.getLogger("eval_grocery")

ICONIC_VIEWS = 16  # augmented views per iconic image (the only image of an item in protocol A)
PHOTO_VIEWS = 1  # per train photo: photos already vary; more views measured no better
Vec = np.ndarray


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
    per_item: int = 1  # an item's score: its best image (1) or the mean of its best few (class-level)


def _adapter(cat: Catalog, m: Method) -> Adapter:
    if not m.adapter:
        return Adapter.identity(cat.vectors.shape[1])
    if m.augment and cat.aug is not None and cat.aug_source is not None:
        x = np.vstack([cat.vectors, cat.aug])
        y = np.concatenate([cat.labels, cat.labels[cat.aug_source]])
        return fit_lda_adapter(x, y)
    return fit_lda_adapter(cat.vectors, cat.labels)


def _scores(adapter: Adapter, cat: Catalog, queries: np.ndarray, per_item: int = 1) -> np.ndarray:
    sims = adapter.apply(queries) @ adapter.apply(cat.vectors).T
    return item_scores(sims, cat.labels, N_ITEMS, per_item)


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
        cal = calibrate_open_set(  # a plain top-1 threshold: the rule without margin or neighbours
            sub.vectors, sub.labels, aug_vectors=sub.aug, aug_source=sub.aug_source,
            fit_adapter=m.adapter, fit_with_aug=m.augment, margin_weight=0.0, holdout_neighbours=0,
        )  # fmt: skip
        cal_row: dict[str, Any] = {
            "known_kept": cal.sim_known_kept, "unseen_rejected": cal.sim_unseen_rejected,
            "known_correct": cal.sim_known_correct, "unseen_total": cal.sim_unseen_total}  # fmt: skip
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


def _median_ms(fn: Callable[[], object], n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))


def _timings(embedders: tuple[Any, Any], img: np.ndarray, cat_b: Catalog,
             adapter: Adapter) -> dict[str, float]:  # fmt: skip
    """Median per-query times (ms): one embedding by the base and the tuned bundle (interleaved, so the
    machine's drift falls on both alike), baseline search, projection + projected search."""
    base, tuned = embedders
    q = base.embed([img])
    raw = cat_b.vectors
    proj = adapter.apply(cat_b.vectors)
    rounds: list[tuple[float, float]] = []
    for _ in range(6):
        rounds.append((_median_ms(lambda: base.embed_one(img), 10),
                       _median_ms(lambda: tuned.embed_one(img), 10)))  # fmt: skip
    base_ms = _median_ms(lambda: item_scores(q @ raw.T, cat_b.labels, N_ITEMS), 200)
    adapted_ms = _median_ms(lambda: item_scores(adapter.apply(q) @ proj.T, cat_b.labels, N_ITEMS), 200)
    return {"embed_ms": float(np.median([r[0] for r in rounds])),
            "embed_tuned_ms": float(np.median([r[1] for r in rounds])),
            "search_base_ms": base_ms, "search_adapter_ms": adapted_ms}  # fmt: skip


# ---- main ----


def _bundle() -> Path:
    """Export afresh every run (under a second): a bundle kept from an older export would measure the old
    graph; the embedding cache is keyed by model_id, so an unchanged graph still embeds nothing."""
    from models.export import export_model

    bundle = OUT / "bundle"
    _LOGGER.info("exporting %s to %s", SOURCE.name, bundle)
    export_model(str(SOURCE), bundle)
    return bundle


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
        return lambda im, sha: augmented_views(im, n, seed_of(sha))

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
    scores = _scores(adapter, cat, queries[m.query], m.per_item)
    row = {"r1": _recall(scores, labels, 1), "r5": _recall(scores, labels, 5), "dim": adapter.out_dim,
           "multi_frame_proxy": m.proxy, "per_item": m.per_item}  # fmt: skip
    if m.per_item > 1:  # the "no match" rule is calibrated on best-image scores: no open-set figures
        return {**row, "open_set": None}
    o_cat = cat if open_sets is None else (open_sets.cat_a if proto == "A" else open_sets.cat_b)
    o_q = queries if open_sets is None else open_sets.queries
    return {**row, "open_set": _open_set(o_cat, m, o_q[m.query], labels)}


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not DATA.is_dir() or not SOURCE.is_file():
        print(f"make eval needs ../shared (looked for {DATA} and {SOURCE}); set SHARED=/path/to/shared")
        return 2
    from models.images import load_image

    t0 = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    iconic, train, val = read_iconic(), read_split("train"), read_split("val")
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
        Method("baseline, item = top-5 mean", adapter=False, augment=False, query="orig", per_item=5),
        Method("+ LDA, item = top-5 mean", adapter=True, augment=False, query="orig", per_item=5),
    ]
    tuned_methods = [
        Method("tuned tail", adapter=False, augment=False, query="orig", tuned=True),
        Method("tuned tail + LDA (as built)", adapter=True, augment=False, query="orig", tuned=True),
        Method("tuned tail + LDA, aug. views", adapter=True, augment=True, query="orig", tuned=True),
        Method("tuned tail + query centre crop", adapter=True, augment=True, query="c875", tuned=True),
        Method("tuned tail full, multi-frame", adapter=True, augment=True, query="frames", proxy=True,
               tuned=True),
        Method("as built, item = top-5 mean", adapter=True, augment=False, query="orig", tuned=True,
               per_item=5),
    ]  # fmt: skip
    results: dict[str, Any] = {"protocols": {}, "best": "tuned tail + LDA, aug. views"}
    for proto, cat in (("A", base.cat_a), ("B", base.cat_b)):
        results["protocols"][proto] = {m.name: _row(cat, m, base.queries, val.labels) for m in methods}

    # A bundle tuned on each protocol's own catalog; open-set rows use one tuned without the unseen items.
    t1 = time.perf_counter()
    known = np.setdiff1d(np.arange(N_ITEMS), _unseen_items())
    cat_b_split = concat(train, iconic)
    tuned_a = _embed_sets(tuned_bundle(base_bundle, iconic, "A"), iconic, train, val)
    tuned_a_known = _embed_sets(tuned_bundle(base_bundle, only(iconic, known), "A-known"), iconic, train, val)
    tuned_b = _embed_sets(tuned_bundle(base_bundle, cat_b_split, "B"), iconic, train, val)
    b_known = tuned_bundle(base_bundle, only(cat_b_split, known), "B-known")
    tuned_b_known = _embed_sets(b_known, iconic, train, val)
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
    results["new_products"] = new_products(base_bundle, iconic, train, val, ICONIC_VIEWS)

    probe = load_image(val.paths[0])
    timing = _timings((base.embedder, tuned_b.embedder), probe, base.cat_b, _adapter(base.cat_b, methods[2]))
    base_cost = timing["embed_ms"] + timing["search_base_ms"]
    results["timing_ms"] = timing
    cost = {"baseline": 1.0}
    for m in methods[1:]:
        if m.per_item > 1:  # brute-force numpy here, not the kiosk's hnswlib search: not measured
            continue
        embed = timing["embed_tuned_ms"] if m.tuned else timing["embed_ms"]
        search = timing["search_adapter_ms"] if m.adapter else timing["search_base_ms"]
        cost[m.name] = (embed + search) / base_cost
    results["relative_kiosk_cost"] = cost
    every = (base, tuned_a, tuned_a_known, tuned_b, tuned_b_known)
    results["embedded_now"] = sum(s.emb.computed for s in every) + results["new_products"].pop("embedded")
    results["embed_s"] = embed_s
    results["model_id"] = base.embedder.model_id
    results["total_s"] = time.perf_counter() - t0

    (OUT / "grocery.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, OUT / "grocery.png")
    print_table(results, methods)
    print_new_products(results["new_products"])
    print_written(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

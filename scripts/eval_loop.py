"""`make eval`, the store-learning loop: protocol A (81 iconic images) taught by confirmed store photos.

For k = 1, 3, 5, 10 store photos per product, drawn (seeded) from the TRAIN photos, each confirmation goes
through the product's code path: the crop (longest side 384 px, JPEG) -> ``make_feedback`` -> bytes ->
``parse_feedback`` -> ``FeedbackStore.put`` -> the auto rule (``cloud.feedback.auto``) against the loop's
current snapshot -> ``build_snapshot(..., feedback=...)`` (real bundle, real featurize and calibration).
Queries are the val photos (nothing is fitted on them). Loops:

- ``clean``: every confirmation names the right product; all approved.
- ``mistap``: 10% name a wrong product (one of the 5 the kiosk showed, else any), no human review: every
  confirmation is used (approved ``sim:no-review``), the worst case for label noise.
- ``mistap_auto``: the same confirmations, but only what the auto rule pre-approves is used (the rest
  waits for a person who never comes).

Open set: the same loop builds a catalog without a fixed, seeded 20% of the products (their feedback is
skipped by the build as "not in the catalog"); their val queries should be answered "not found" by the
rule the build calibrated. In that world, customers holding half of those products (seeded) answered
"Not here" with their TRAIN photos and staff marked them "not carried": the snapshot ships them as rejection
rows; ``open_asked_rejected`` / ``open_never_asked_rejected`` split the figure. ``relearned`` rows: the
bundle tuned by the product's ``relearn_bundle`` on the loop's approved store photos (mis-taps included)
and the catalog, never on val; the open-set one tuned without the unknown products.
Writes build/eval/loop.json and build/eval/loop.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cloud.build import BuildSpec, build_snapshot  # noqa: E402
from cloud.feedback.auto import WHO, ReviewSpace, auto_review  # noqa: E402
from cloud.feedback.store import FeedbackStore  # noqa: E402
from cloud.open_set import open_set_score  # noqa: E402
from cloud.retrieval import aggregate_frames, item_scores  # noqa: E402
from scripts.eval_data import (  # noqa: E402
    N_ITEMS,
    OPEN_SET_SEED,
    OPEN_SET_SHARE,
    OUT,
    VIEWS,
    Embeddings,
    read_iconic,
    read_split,
)
from storelens.feedback import feedback_topic, make_feedback, parse_feedback  # noqa: E402
from storelens.matching import MatchRule  # noqa: E402

_LOGGER = logging.getLogger("eval_loop")

KS = (1, 3, 5, 10)
MISTAP_RATE = 0.10
SEED = 19  # which train photos are confirmed, and which confirmations are mis-taps
# The multi-frame figure: what the kiosk averages for a held item, its 3 steady frames with the second
# mirrored ([detection] mirror_one_frame); the frames' jitter stands in as a 0.8 centre crop. (Until
# 2026-12-07 this was 5 views with 2 mirrored, ~1.7 R@1 points above an unmirrored kiosk at k = 1.)
KIOSK_FRAMES = ("orig", "flip", "c80")
STORE, KIOSK = "grocery", "k1"
CROP_SIDE_PX = 384
CROP_QUALITY = 90
LOOP = OUT / "loop"


def _crop_jpeg(image: np.ndarray) -> bytes:
    """What the kiosk sends: the held item (here the whole photo), longest side 384 px, JPEG."""
    import cv2

    h, w = image.shape[:2]
    s = CROP_SIDE_PX / max(h, w)
    if s < 1:
        image = cv2.resize(image, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, CROP_QUALITY])
    assert ok
    return bytes(buf.tobytes())


def _unseen_items() -> np.ndarray:
    rng = np.random.default_rng(OPEN_SET_SEED)
    return np.sort(rng.choice(N_ITEMS, size=round(OPEN_SET_SHARE * N_ITEMS), replace=False))


def _asked_items() -> np.ndarray:
    """Half of the unseen products (seeded): customers asked about them at the kiosk before ("Not here",
    staff: "not carried"), so the snapshot carries photos of them as rejection rows; the other half never."""
    unseen = _unseen_items()
    rng = np.random.default_rng(OPEN_SET_SEED + 1)
    return np.sort(rng.choice(unseen, size=len(unseen) // 2, replace=False))


def sku(label: int) -> str:
    return f"P{int(label):02d}"


@dataclass
class Data:
    iconic_paths: list[Path]
    train_paths: list[Path]
    train_labels: np.ndarray
    crop_vecs: np.ndarray  # model-space vectors of the train photos' crops, as the kiosk embeds them
    q_single: np.ndarray
    q_frames: np.ndarray
    q_labels: np.ndarray


def _data(bundle: Path) -> tuple[Data, Any]:
    import cv2

    from models.embedder import Embedder

    iconic, train, val = read_iconic(), read_split("train"), read_split("val")
    embedder = Embedder(bundle, mode="latency")
    emb = Embeddings(embedder, OUT / "cache")

    def crop(im: np.ndarray, sha: str) -> list[np.ndarray]:
        return [cv2.imdecode(np.frombuffer(_crop_jpeg(im), np.uint8), cv2.IMREAD_COLOR)]

    crop_vecs = emb.get(train.paths, crop, f"crop{CROP_SIDE_PX}q{CROP_QUALITY}", 1)
    single, frames = _val_queries(emb, val.paths)
    return Data(iconic.paths, train.paths, train.labels, crop_vecs, single, frames, val.labels), embedder


def _val_queries(emb: Embeddings, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Single photos and the kiosk's multi-frame figure (``KIOSK_FRAMES`` averaged), cached by ``emb``."""
    qv = {tag: emb.get(paths, lambda im, sha, t=tag: [VIEWS[t](im)], tag, 1) for tag in KIOSK_FRAMES}
    frames = np.stack([aggregate_frames(np.stack([qv[t][i] for t in KIOSK_FRAMES]))
                       for i in range(len(paths))])  # fmt: skip
    return qv["orig"], frames


def _write_catalog(path: Path, iconic: list[Path], items: np.ndarray) -> Path:
    rows = [{"sku": sku(i), "title": f"product {i}", "images": [str(iconic[i])]} for i in items]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _queries(bundle: Path) -> tuple[np.ndarray, np.ndarray]:
    """The val queries as ``bundle`` embeds them: single photos and the multi-frame proxy (cached)."""
    from models.embedder import Embedder

    embedder = Embedder(bundle, mode="latency")
    try:
        return _val_queries(Embeddings(embedder, OUT / "cache"), read_split("val").paths)
    finally:
        getattr(embedder, "close", lambda: None)()


def _relearned(base: Path, catalog: Path, fb_root: Path, tag: str) -> Path:
    """The product's relearn step (``relearn_bundle``) on this loop's approved store photos; cached by the
    photos' contents and labels (a tune takes minutes on a CPU)."""
    from cloud.catalog import load_catalog
    from cloud.feedback.relearn import select_approved
    from cloud.feedback.relearn_model import (
        RELEARN_TUNE_CONVS,
        RELEARN_VIEWS_PER_IMAGE,
        relearn_bundle,
        training_set,
    )
    from models import tune
    from models.bundle import read_manifest, verify_bundle
    from models.errors import ModelError
    from scripts.eval_data import file_sha256

    cat = load_catalog(catalog)
    sel = select_approved(fb_root, STORE, cat.items)
    imgs = training_set(cat.items, sel)
    key = hashlib.sha256(json.dumps({
        "base": read_manifest(base).model_id, "epochs": tune.EPOCHS, "convs": RELEARN_TUNE_CONVS,
        "views": RELEARN_VIEWS_PER_IMAGE, "lr": tune.LEARNING_RATE,
        "images": [[file_sha256(Path(t.source) if t.store_photo else cat.base_dir / t.source), t.sku]
                   for t in imgs],
    }).encode()).hexdigest()[:12]  # fmt: skip
    out = OUT / "loop-tuned" / f"{tag}-{key}"
    try:
        verify_bundle(out)
        return out
    except ModelError:
        pass
    t0 = time.perf_counter()
    _, report = relearn_bundle(base, cat.items, sel, out, base_dir=cat.base_dir)
    print(f"  relearned {out.name} on {report.images} images in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def _evaluate(snap: Path, d: Data, known: np.ndarray | None) -> dict[str, float]:
    """R@1/R@5 (single photo and multi-frame proxy); with ``known``, the open-set figures of its rules:
    the calibrated "no match" rule plus the snapshot's not-carried rows, unseen products split into those
    customers asked about before (``asked``: not-carried photos in the snapshot) and the others."""
    from storelens.matching import NotCarried
    from storelens.snapshot import read_manifest_unverified

    space = ReviewSpace.load(snap)
    m = read_manifest_unverified(snap)
    rule = MatchRule.from_manifest(m.threshold, m.extra)
    nc = NotCarried.from_manifest(snap, m.extra, m.dim, list(m.files))
    names = sorted(set(space.skus))
    col = np.searchsorted(names, space.skus)
    label_of = np.array([int(n[1:]) for n in names])
    asked = np.isin(d.q_labels, _asked_items())
    out: dict[str, float] = {}
    for tag, q in (("", d.q_single), ("frames_", d.q_frames)):
        pq = space.project(q)
        s = item_scores(pq @ space.vectors.T, col, len(names))
        top = label_of[np.argsort(-s, axis=1)[:, :5]]
        if known is None:
            out[f"{tag}r1"] = round(float(np.mean(top[:, 0] == d.q_labels)), 4)
            out[f"{tag}r5"] = round(float(np.mean((top == d.q_labels[:, None]).any(1))), 4)
            continue
        accept = open_set_score(s, rule.margin_weight) >= rule.threshold
        if nc is not None:
            accept &= nc.best(pq) < s.max(axis=1) + nc.margin
        is_known = np.isin(d.q_labels, known)
        right = top[:, 0] == d.q_labels
        out[f"{tag}open_known_r1_free"] = round(float(np.mean(right[is_known])), 4)
        out[f"{tag}open_known_r1_rule"] = round(float(np.mean((right & accept)[is_known])), 4)
        out[f"{tag}open_unseen_rejected"] = round(float(np.mean(~accept[~is_known])), 4)
        out[f"{tag}open_asked_rejected"] = round(float(np.mean(~accept[~is_known & asked])), 4)
        out[f"{tag}open_never_asked_rejected"] = round(float(np.mean(~accept[~is_known & ~asked])), 4)
        out[f"{tag}open_r1_cost_pts"] = round(
            100 * (out[f"{tag}open_known_r1_free"] - out[f"{tag}open_known_r1_rule"]), 1)
    if known is not None:
        out["not_carried_rows"] = 0 if nc is None else len(nc.vectors)
    return out


def _loop(name: str, d: Data, bundle: Path, key: Any, mistaps: bool, policy: str, ks: tuple[int, ...] = KS,
          relearn_ks: tuple[int, ...] = (), relearn_open_ks: tuple[int, ...] = (),
          ) -> dict[str, Any]:  # fmt: skip
    """One loop: k = 0 (protocol A), then each k of ``KS``; returns its rows and the auto rule's tally."""
    root = LOOP / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    everything = np.arange(N_ITEMS)
    known = np.setdiff1d(everything, _unseen_items())
    asked = set(_asked_items().tolist())
    cat_all = _write_catalog(root / "catalog.jsonl", d.iconic_paths, everything)
    cat_known = _write_catalog(root / "catalog-known.jsonl", d.iconic_paths, known)
    fb = FeedbackStore(root / "feedback")
    cache = LOOP / "build-cache"  # shared: a crop is embedded once across loops

    fb_open = root / "feedback-open"  # the open-set world: the same confirmations + "not carried" photos
    not_here: list[bytes] = []

    def build(tag: str, catalog: Path, with_feedback: bool, model: Path = bundle) -> Path:
        out = root / tag
        feedback = (fb_open if catalog == cat_known else fb.root) if with_feedback else None
        build_snapshot(BuildSpec(catalog=catalog, store=STORE, out_dir=out, private_key=key, bundle=model,
                                 cache_dir=cache, progress=False, feedback=feedback))  # fmt: skip
        return out

    def open_world() -> None:
        """fb_open = fb + every "Not here" so far, each marked "not carried" by staff."""
        shutil.rmtree(fb_open, ignore_errors=True)
        shutil.copytree(fb.root, fb_open)
        store = FeedbackStore(fb_open)
        for raw in not_here:
            rid, _ = store.put(parse_feedback(feedback_topic(STORE, KIOSK), raw))
            store.decide(rid, "not_carried", who="sim:staff")

    rng = np.random.default_rng(SEED)  # the same draws in every loop: only the labels differ
    order = {int(p): rng.permutation(np.flatnonzero(d.train_labels == p)) for p in everything}
    mis_rng = np.random.default_rng(SEED + 1)
    snap = build("k0", cat_all, False)
    rows = [{"k": 0, **_evaluate(snap, d, None), **_evaluate(build("k0-open", cat_known, False), d, known)}]
    tally = {"confirmations": 0, "mistaps": 0, "auto_ok_right": 0, "auto_ok_mistap": 0}
    prev, n = 0, 0
    for k in ks:
        space = ReviewSpace.load(snap)
        for p in everything:
            for idx in order[int(p)][prev:k]:
                n += 1
                vec = d.crop_vecs[idx]
                proj = space.project(vec)[0]
                sims = space.vectors @ proj
                shown = list(dict.fromkeys(space.skus[i] for i in np.argsort(-sims)))[:5]
                from models.images import load_image

                crop = _crop_jpeg(load_image(d.train_paths[idx]))
                if p in asked:  # in the open-set world the store does not sell it: "Not here"
                    msg = make_feedback(
                        store=STORE, kiosk=KIOSK, match_id=f"n{n}", answer="not_here", chosen_sku=None,
                        shown=shown, model=space.model_id, snapshot=k, vector=vec, crop_jpeg=crop,
                        id=f"{name}-nh-{n}",
                    )  # fmt: skip
                    not_here.append(msg.to_bytes())
                wrong = mistaps and mis_rng.random() < MISTAP_RATE
                chosen = sku(int(p))
                if wrong:
                    others = [s for s in shown if s != chosen] or [sku(int(q)) for q in everything if q != p]
                    chosen = others[int(mis_rng.integers(len(others)))]
                msg = make_feedback(
                    store=STORE, kiosk=KIOSK, match_id=f"m{n}", answer="confirmed", chosen_sku=chosen,
                    shown=shown, model=space.model_id, snapshot=k, vector=vec, crop_jpeg=crop,
                    id=f"{name}-{n}",
                )  # fmt: skip
                msg = parse_feedback(feedback_topic(STORE, KIOSK), msg.to_bytes())
                rid, _ = fb.put(msg)
                auto = auto_review(fb, rid, space)
                tally["confirmations"] += 1
                tally["mistaps"] += wrong
                tally["auto_ok_mistap" if wrong else "auto_ok_right"] += auto is not None
                if auto is None and policy == "all":
                    fb.decide(rid, "approved", who="sim:no-review", sku=chosen)
        prev = k
        open_world()
        t0 = time.perf_counter()
        snap = build(f"k{k}", cat_all, True)
        row = {"k": k, **_evaluate(snap, d, None)}
        row.update(_evaluate(build(f"k{k}-open", cat_known, True), d, known))
        row["build_s"] = round(time.perf_counter() - t0, 1)
        row["store_photos"] = sum(1 for r in fb.approved(STORE))
        if k in relearn_ks:  # the model step: a bundle relearned on the store photos, and its snapshots
            t0 = time.perf_counter()
            tuned = _relearned(bundle, cat_all, fb.root, f"{name}-k{k}")
            q1, qf = _queries(tuned)
            dt = dataclasses.replace(d, q_single=q1, q_frames=qf)
            row["relearned"] = _evaluate(build(f"k{k}-tuned", cat_all, True, tuned), dt, None)
            if k in relearn_open_ks:  # the open-set world tunes without the products it does not carry
                tuned_known = _relearned(bundle, cat_known, fb.root, f"{name}-k{k}-known")
                q1, qf = _queries(tuned_known)
                dk = dataclasses.replace(d, q_single=q1, q_frames=qf)
                row["relearned"].update(_evaluate(build(f"k{k}-tuned-open", cat_known, True, tuned_known), dk,
                                                  known))  # fmt: skip
            row["relearned"]["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(f"  {name} k={k}: {row}", flush=True)
    assert all(r.decided_by in (WHO, "sim:no-review") for r in fb.approved(STORE))
    return {"rows": rows, "auto": tally}


def run(bundle: Path, loops: tuple[str, ...] = ("clean", "mistap", "mistap_auto"), ks: tuple[int, ...] = KS,
        relearn_ks: tuple[int, ...] = KS, relearn_open_ks: tuple[int, ...] = KS, out_name: str = "loop",
        relearn_loops: tuple[str, ...] = ("clean", "mistap")) -> dict[str, Any]:  # fmt: skip
    from storelens import signing

    LOOP.mkdir(parents=True, exist_ok=True)
    signing.generate_keypair(LOOP / "private.pem", LOOP / "public.pem") if not (
        LOOP / "private.pem").exists() else None  # fmt: skip
    key = signing.load_private_key(LOOP / "private.pem")
    d, embedder = _data(bundle)
    getattr(embedder, "close", lambda: None)()
    t0 = time.perf_counter()
    setups = {"clean": (False, "all"), "mistap": (True, "all"), "mistap_auto": (True, "auto")}
    res: dict[str, Any] = {
        name: _loop(name, d, bundle, key, mistaps=setups[name][0], policy=setups[name][1], ks=ks,
                    relearn_ks=relearn_ks if name in relearn_loops else (), relearn_open_ks=relearn_open_ks)
        for name in loops
    }  # fmt: skip
    res.update({
        "seconds": round(time.perf_counter() - t0, 1),
        "mistap_rate": MISTAP_RATE,
        "queries": len(d.q_labels),
    })
    (OUT / f"{out_name}.json").write_text(json.dumps(res, indent=1))
    _plot(res, OUT / f"{out_name}.png")
    return res


def _plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, style in (("clean", "-o"), ("mistap", "--s"), ("mistap_auto", ":^")):
        if name not in res:
            continue
        rows = res[name]["rows"]
        ks = [r["k"] for r in rows]
        ax.plot(ks, [r["r1"] for r in rows], style, label=f"R@1 {name}")
        ax.plot(ks, [r["frames_r1"] for r in rows], style, alpha=0.45, label=f"R@1 {name}, multi-frame")
        tuned = [(r["k"], r["relearned"]["r1"]) for r in rows if "relearned" in r]
        if tuned:
            ax.plot(*zip(*tuned, strict=True), style, lw=2.5, label=f"R@1 {name}, relearned bundle")
    if "mistap" in res:
        mis = res["mistap"]["rows"]
        ax.plot([r["k"] for r in mis], [r["open_unseen_rejected"] for r in mis], "-x", color="grey",
                label="unseen rejected (mistap)")  # fmt: skip
    ax.set_xlabel("confirmed store photos per product (k)")
    ax.set_ylabel("share of val queries")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Grocery, protocol A + store photos (MobileNetV2)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from scripts.eval_grocery import _bundle

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loops", default="clean,mistap,mistap_auto", help="which loops to run")
    ap.add_argument("--ks", default=",".join(map(str, KS)), help="store photos per product to measure at")
    # Defaults: what `make eval` reports (each tune is minutes on a CPU; 2 cached tunes + 1 open-set one).
    ap.add_argument("--relearn-ks", default="1,5",
                    help="ks at which to relearn the bundle too (minutes each, cached); empty: none")
    ap.add_argument("--relearn-open-ks", default="1",
                    help="ks at which the open-set world relearns too (a second tune each)")
    ap.add_argument("--relearn-loops", default="mistap", help="loops that relearn the bundle")
    ap.add_argument("--out", default="loop", help="name of the JSON and PNG under build/eval/")
    ap.add_argument("--bundle", type=Path, default=None,
                    help="another bundle to run the loop with (default: MobileNetV2, exported afresh)")
    a = ap.parse_args()
    ints = lambda s: tuple(int(x) for x in s.split(",") if x)  # noqa: E731
    res = run(a.bundle or _bundle(), tuple(a.loops.split(",")), ints(a.ks), ints(a.relearn_ks),
              ints(a.relearn_open_ks), a.out, tuple(a.relearn_loops.split(",")))  # fmt: skip
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

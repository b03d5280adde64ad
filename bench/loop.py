"""The store-learning loop's costs on the kiosk (issue 19): snapshot bytes per item and search latency at k.

k is the number of store photos (confirmed customer crops) per product that the relearned snapshot
carries beside the catalog photo. Two snapshots are built the way the product builds them
(``cloud.build.build_snapshot`` from a ``BuildSpec``; k = 10 with ``feedback=``: each store photo went
through the kiosk's crop encoder, a ``FeedbackEvent``, the feedback store and an approval), with the
bundle the kiosks run (MobileNetV2 from ``../shared``, else the seeded ``tiny`` one):

- ``k0``: the catalog only (one photo per product); ``k10``: the catalog + K store photos per product.
- ``bytes``: every file of the signed snapshot directory (index, rows, projection, thumbnails, manifest,
  signature, not-carried rows); ``bytes_per_item`` = bytes / products; ``bytes_per_item_ratio`` = k10 / k0.
- ``search_ms``: the kiosk's answer for one held item, as ``device.pipeline``'s search stage computes it on
  the snapshot it loaded (verified, canaries checked): ``aggregate`` over the item's steady frames'
  vectors (FRAME_CROPS: three, the kiosk's ``aggregate_frames``; its ``top_k``), then the "no match" rule
  and the not-carried rows. Timed one item at a time on one BLAS thread (as the kiosk runs), each item on
  k0 and k10 back to back, ROUNDS passes; ``search_p99_ratio`` / ``search_p50_ratio`` = k10 / k0.
- ``top1``: share of held items whose first answer is the right product. Grocery: val photos (never
  fitted on), the frames three centre crops of one photo; synthetic: store-photo renderings not used as
  store photos. Store photos: K train photos of each product (scripts/eval_loop.py's seeded draw), or
  renderings.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.models import _shared, export_bench_bundle
from cloud.build import BuildSpec, build_snapshot
from cloud.feedback.store import FeedbackStore
from device.config import DetectionConfig, FeedbackConfig
from device.feedback import encode_crop
from device.generations.canary import load_snapshot
from device.pipeline import aggregate
from device.sync.active import ActiveSnapshot
from storelens import signing
from storelens.feedback import feedback_topic, make_feedback, parse_feedback
from storelens.snapshot import verify_snapshot

_LOGGER = logging.getLogger(__name__)

K = 10  # store photos per product in the relearned snapshot (the figure)
# Passes over every held item; each item is searched on k0 and k10 back to back (order swapped every pass),
# so a burst of load on this shared machine hits both sides alike. 5 x 296 grocery items: p99 from ~1,500.
ROUNDS = 5
WARMUP_QUERIES = 20  # per snapshot before timing: first searches pay for page faults and caches
SEED = 19  # which train photos become store photos: the same draw as scripts/eval_loop.py's
SYNTHETIC_ITEMS = 40  # products when ../shared is absent
SYNTHETIC_HELD = 3  # held items per product when ../shared is absent
FRAME_CROPS = (1.0, 0.9, 0.8)  # the steady frames of one held item: the photo, then slightly zoomed in
STORE, KIOSK = "bench", "k1"
EMBED_BATCH = 32

Image = npt.NDArray[np.uint8]
Loader = Callable[[], Image]


@dataclass(frozen=True, slots=True)
class LoopData:
    """A catalog (one photo per product), K store photos per product, and held items to search for."""

    source: str  # "grocery" or "synthetic"
    catalog: Path  # JSON Lines, one row per product
    store_photos: list[tuple[str, Loader]]  # (sku, image), K per product
    held: list[tuple[str, Loader]]  # (right sku, photo) per held item


def _centre(img: Image, share: float) -> Image:
    h, w = img.shape[:2]
    ch, cw = max(1, round(h * share)), max(1, round(w * share))
    y, x = (h - ch) // 2, (w - cw) // 2
    return np.ascontiguousarray(img[y : y + ch, x : x + cw])


def _write_catalog(path: Path, rows: list[tuple[str, Path]]) -> Path:
    path.write_text("".join(json.dumps({"sku": s, "title": s, "price": "1.00", "images": [str(p)]}) + "\n"
                            for s, p in rows))  # fmt: skip
    return path


def _file(path: Path) -> Loader:
    """A loader of one photo file (read when the bench needs it, not all kept in memory)."""
    from models.images import load_image

    def load() -> Image:
        img: Image = load_image(path)
        return img

    return load


def grocery_data(data: Path, work: Path, k: int, items: int | None = None) -> LoopData:
    """Grocery: the iconic image per product; store photos: K train photos each; held items: val photos."""
    import csv

    def split(name: str) -> list[tuple[int, Path]]:
        out = []
        for line in (data / f"{name}.txt").read_text().splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) >= 2 and parts[0]:
                out.append((int(parts[1]), data / parts[0]))
        return out

    with open(data / "classes.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))[1:]
    iconic = {int(r[1]): data / r[4].lstrip("/") for r in rows}
    labels = sorted(iconic)[:items] if items else sorted(iconic)
    sku = {lab: f"P{lab:02d}" for lab in labels}
    catalog = _write_catalog(work / "catalog.jsonl", [(sku[lab], iconic[lab]) for lab in labels])
    rng = np.random.default_rng(SEED)
    train = split("train")
    photos: list[tuple[str, Loader]] = []
    for lab in labels:
        mine = [p for label, p in train if label == lab]
        for i in rng.permutation(len(mine))[:k]:
            photos.append((sku[lab], _file(mine[i])))
    held = [(sku[lab], _file(p)) for lab, p in split("val") if lab in sku]
    return LoopData("grocery", catalog, photos, held)


def synthetic_data(work: Path, k: int, items: int = SYNTHETIC_ITEMS) -> LoopData:
    """Rendered pack shots as the catalog; store photos and held items: store-photo renderings of them."""
    import cv2

    from device.camera.synthetic import render_items, store_photo

    imgs = render_items(items, seed=3)
    rows = []
    for i, img in enumerate(imgs):
        p = work / "catalog" / f"sku{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(p), img)
        rows.append((f"S{i:03d}", p))
    catalog = _write_catalog(work / "catalog.jsonl", rows)
    photos: list[tuple[str, Loader]] = [
        (rows[i][0], functools.partial(store_photo, img, seed=1000 * i + j))
        for i, img in enumerate(imgs) for j in range(k)
    ]  # fmt: skip
    held: list[tuple[str, Loader]] = [
        (rows[i][0], functools.partial(store_photo, img, seed=1000 * i + 500 + j))
        for i, img in enumerate(imgs) for j in range(SYNTHETIC_HELD)
    ]  # fmt: skip
    return LoopData("synthetic", catalog, photos, held)


def _embed(embedder: Any, images: list[Image]) -> npt.NDArray[np.float32]:
    out = [embedder.embed(images[i : i + EMBED_BATCH]) for i in range(0, len(images), EMBED_BATCH)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, embedder.dim), np.float32)


def confirm_store_photos(fb_dir: Path, photos: list[tuple[str, Loader]], embedder: Any) -> int:
    """Each photo as a confirmed, approved customer crop: the kiosk's JPEG encoder, the crop's vector, a
    parsed ``FeedbackEvent``, stored and approved in a feedback store (what the build reads)."""
    fb = FeedbackStore(fb_dir)
    quality = FeedbackConfig().jpeg_quality
    n = 0
    for start in range(0, len(photos), EMBED_BATCH):
        chunk = photos[start : start + EMBED_BATCH]
        crops = [load() for _, load in chunk]
        jpegs = [encode_crop(crop, quality) for crop in crops]
        vectors = _embed(embedder, crops)  # the kiosk's vector is the crop's; the build embeds the JPEG
        for (sku, _), jpeg, vec in zip(chunk, jpegs, vectors, strict=True):
            n += 1
            msg = make_feedback(store=STORE, kiosk=KIOSK, match_id=f"m{n}", answer="confirmed",
                                chosen_sku=sku, shown=[sku], model=embedder.model_id, snapshot=1, vector=vec,
                                crop_jpeg=jpeg, id=f"bench-{n}")  # fmt: skip
            rid, _ = fb.put(parse_feedback(feedback_topic(STORE, KIOSK), msg.to_bytes()))
            fb.decide(rid, "approved", who="bench", sku=sku)
    return n


def snapshot_bytes(directory: Path) -> dict[str, int]:
    """Bytes of every file of a snapshot directory by top-level entry (``thumbs`` summed) and ``total``."""
    parts: dict[str, int] = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            top = p.relative_to(directory).parts[0]
            parts[top] = parts.get(top, 0) + p.stat().st_size
    parts["total"] = sum(parts.values())
    return parts


def _held_frames(held: list[tuple[str, Loader]], embedder: Any) -> tuple[list[str], npt.NDArray[np.float32]]:
    """(right sku, model-space vectors of its steady frames) per held item: (n, frames, dim)."""
    skus: list[str] = []
    frames: list[Image] = []
    for sku, load in held:
        img = load()
        skus.append(sku)
        frames.extend(_centre(img, s) for s in FRAME_CROPS)
    vecs = _embed(embedder, frames)
    return skus, vecs.reshape(len(skus), len(FRAME_CROPS), -1)


def answer(
    snap: ActiveSnapshot, vectors: list[npt.NDArray[np.float32]], top_k: int
) -> tuple[str | None, bool]:
    """The kiosk's answer for one held item (the search stage's path): (top sku, matched)."""
    hits, _ = aggregate(vectors, snap, top_k)
    matched = bool(hits) and snap.rule.is_match([h.score for h in hits])
    matched = matched and not snap.not_carried(vectors, hits[0].score)
    return (hits[0].sku if hits else None), matched


def _time_searches(snaps: dict[str, ActiveSnapshot], skus: list[str], held: npt.NDArray[np.float32],
                   rounds: int) -> dict[str, dict[str, Any]]:  # fmt: skip
    from threadpoolctl import threadpool_limits

    top_k = DetectionConfig().top_k
    queries = [[np.ascontiguousarray(f) for f in item] for item in held]
    times: dict[str, list[float]] = {name: [] for name in snaps}
    right: dict[str, int] = dict.fromkeys(snaps, 0)
    matched: dict[str, int] = dict.fromkeys(snaps, 0)
    with threadpool_limits(limits=1, user_api="blas"):  # as device.pipeline.limit_blas_threads on a kiosk
        for snap in snaps.values():
            for q in queries[:WARMUP_QUERIES]:
                answer(snap, q, top_k)
        order = list(snaps.items())
        for r in range(rounds):
            for sku, q in zip(skus, queries, strict=True):
                for name, snap in order if r % 2 == 0 else order[::-1]:  # one held item on each in turn
                    t0 = time.perf_counter()
                    top, ok = answer(snap, q, top_k)
                    times[name].append((time.perf_counter() - t0) * 1000.0)
                    if r == 0:
                        right[name] += top == sku
                        matched[name] += ok
    return {
        name: {
            "search_ms": {"p50": round(statistics.median(ts), 4),
                          "p99": round(float(np.percentile(ts, 99)), 4),
                          "mean": round(statistics.fmean(ts), 4), "samples": len(ts)},
            "top1": round(right[name] / len(skus), 4),
            "matched_share": round(matched[name] / len(skus), 4),
        }
        for name, ts in times.items()
    }  # fmt: skip


def measure(work: Path, bundle: Path, data: LoopData, *, k: int = K, rounds: int = ROUNDS) -> dict[str, Any]:
    """Build the k0 and k snapshots of ``data`` with ``bundle`` in ``work``; their bytes and search times."""
    from models.embedder import Embedder

    signing.generate_keypair(work / "private.pem", work / "public.pem")
    key, public = signing.load_private_key(work / "private.pem"), signing.load_public_key(work / "public.pem")
    embedder = Embedder(bundle, mode="throughput")
    try:
        t0 = time.perf_counter()
        confirmed = confirm_store_photos(work / "feedback", data.store_photos, embedder)
        confirm_s = time.perf_counter() - t0
        skus, held = _held_frames(data.held, embedder)
        built: dict[str, Any] = {}
        snaps: dict[str, ActiveSnapshot] = {}
        for name, feedback in (("k0", None), (f"k{k}", work / "feedback")):
            out = work / name
            res = build_snapshot(BuildSpec(catalog=data.catalog, store=STORE, out_dir=out, private_key=key,
                                           embedder=embedder, cache_dir=work / "cache", progress=False,
                                           feedback=feedback))  # fmt: skip
            m = verify_snapshot(out, [public], model_id=embedder.model_id, model_dim=embedder.dim,
                                store=STORE)
            snaps[name] = load_snapshot(out, m)  # what the kiosk's sync does before it swaps the snapshot in
            sizes = snapshot_bytes(out)
            built[name] = {
                "items": m.item_count, "vectors": m.vector_count, "dim": m.dim, "model_dim": m.model_dim,
                "bytes": sizes, "bytes_per_item": round(sizes["total"] / m.item_count, 1),
                "bytes_per_vector": round(sizes["total"] / m.vector_count, 1),
                "build_s": res.report["build_s"],
                "store_photos": res.report.get("feedback", {}).get("store_photos", 0),
                "likely_mistaps_left_out": res.report.get("feedback", {}).get("likely_mistaps_left_out", 0),
            }  # fmt: skip
        load_before = os.getloadavg()[0]
        for name, row in _time_searches(snaps, skus, held, rounds).items():
            built[name].update(row)
        load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    finally:
        embedder.close()
    a, b = built["k0"], built[f"k{k}"]
    return {
        "data": data.source, "k": k, "model_id": embedder.model_id[:12], "held_items": len(skus),
        "frames_per_item": len(FRAME_CROPS), "top_k": DetectionConfig().top_k, "rounds": rounds,
        "confirmed_store_photos": confirmed, "confirm_s": round(confirm_s, 1), **built,
        "load_avg_1m": load,  # before / after the searches: this machine is shared, p99 follows its load
        "cpu_count": os.cpu_count(),
        "bytes_per_item_ratio": round(b["bytes_per_item"] / a["bytes_per_item"], 3),
        "search_p99_ratio": round(b["search_ms"]["p99"] / a["search_ms"]["p99"], 3),
        "search_p50_ratio": round(b["search_ms"]["p50"] / a["search_ms"]["p50"], 3),
    }  # fmt: skip


def run(out_dir: Path, *, synthetic: bool = False, items: int | None = None, k: int = K,
        rounds: int = ROUNDS) -> dict[str, Any]:  # fmt: skip
    """Grocery + MobileNetV2 when ../shared has them (``synthetic``: always rendered data, ``tiny``)."""
    shared = _shared()
    mnv2 = shared / "models" / "coral" / "tf2_mobilenet_v2_1.0_224_ptq.tflite"
    data_dir = shared / "data" / "grocery"
    real = not synthetic and mnv2.is_file() and (data_dir / "train.txt").is_file()
    work = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    try:
        key, source = ("mobilenet_v2_fp16", str(mnv2)) if real else ("tiny_fp16", "tiny")
        bundle = export_bench_bundle(work, f"loop-{key}", source, "fp16")
        data = grocery_data(data_dir, work, k, items) if real else synthetic_data(
            work, k, items or SYNTHETIC_ITEMS)  # fmt: skip
        result = {"model": key, **measure(work, bundle, data, k=k, rounds=rounds)}
        _LOGGER.info("loop bench: %s", result)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


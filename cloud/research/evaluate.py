"""Retrieval quality of a snapshot on labelled query photos: item-level recall@k and what gets confused."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cloud import delta as d
from cloud.catalog import FetchError, fetch_image_bytes
from cloud.featurize import DECODE_WORKERS, model_fingerprint
from cloud.retrieval import Adapter
from models.port import EmbedderPort
from storelens import vindex
from storelens.matching import MatchRule
from storelens.snapshot import read_manifest_unverified

VECTOR_K = 50  # vectors fetched per query before collapsing to items; several images per item share hits
EVAL_EF = 200  # higher than a kiosk's ef: evaluation measures the embedding, not the graph
BATCH = 32


class EvalError(Exception):
    """The queries file or snapshot cannot be evaluated."""


def load_queries(path: Path) -> list[tuple[str, str]]:
    """(image path, expected sku) rows from a CSV (``path,sku``, header optional) or JSON Lines file."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"queries file {path} does not exist")
    text = path.read_text(encoding="utf-8-sig")
    out: list[tuple[str, str]] = []
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        for line in text.splitlines():
            if line.strip():
                obj = json.loads(line)
                out.append((str(obj["path"]), str(obj["sku"])))
    else:
        for row in csv.reader(io.StringIO(text)):
            if len(row) >= 2 and row[0].strip() and row[0].strip().lower() != "path":
                out.append((row[0].strip(), row[1].strip()))
    base = path.resolve().parent
    return [(p if Path(p).is_absolute() else str(base / p), sku) for p, sku in out]


def _decode(src: str) -> npt.NDArray[np.uint8] | None:
    from models.images import decode_image

    try:
        return decode_image(fetch_image_bytes(src, Path(".")))
    except (FetchError, ValueError):
        return None


def evaluate(
    snapshot: Path, queries: Path, embedder: EmbedderPort, *, top_confused: int = 10
) -> dict[str, Any]:
    """Embed each query, search the snapshot, and report recall@1/@5 (items), similarities and confusions."""
    snapshot = Path(snapshot)
    m = read_manifest_unverified(snapshot)
    if m.model_id != embedder.model_id:
        raise EvalError(f"snapshot was built by model {m.model_id[:12]}, bundle is {embedder.model_id[:12]}")
    if m.kind != "full":
        raise EvalError("evaluate a full (or applied) snapshot, not a delta")
    label_sku = {int(r["label"]): str(r["sku"]) for r in d.read_rows(snapshot / d.VECTORS)}
    index = vindex.load(snapshot / d.INDEX, dim=m.dim, ef=max(m.hnsw.ef, EVAL_EF))
    adapter = None
    if m.projection is not None:  # queries go through the snapshot's catalog-fitted projection, as on a kiosk
        p = m.projection
        adapter = Adapter.from_bytes((snapshot / p.file).read_bytes(), p.in_dim, p.out_dim)
    rows = load_queries(queries)
    if not rows:
        raise EvalError(f"{queries} holds no queries")
    ranked: list[list[tuple[str, float]]] = []
    truths: list[str] = []
    skipped = 0
    with ThreadPoolExecutor(max_workers=DECODE_WORKERS, thread_name_prefix="eval-decode") as pool:
        for start in range(0, len(rows), BATCH):
            chunk = rows[start : start + BATCH]
            images = list(pool.map(_decode, [p for p, _ in chunk]))
            good = [(img, sku) for img, (_, sku) in zip(images, chunk, strict=True) if img is not None]
            skipped += len(chunk) - len(good)
            if not good:
                continue
            vecs = np.asarray(embedder.embed([g[0] for g in good]), np.float32)
            if adapter is not None:
                vecs = adapter.apply(vecs)
            labels, sims = index.search(vecs, VECTOR_K)
            for lab_row, sim_row, (_, sku) in zip(labels, sims, good, strict=True):
                ranked.append(_collapse(lab_row, sim_row, label_sku))
                truths.append(sku)
    rule = MatchRule.from_manifest(m.threshold, m.extra)
    return _metrics(ranked, truths, skipped, rule, top_confused) | {
        "snapshot_version": m.version,
        "store": m.store,
        "model": model_fingerprint(embedder)[:12],
        "items": m.item_count,
        "vectors": m.vector_count,
    }


def _collapse(
    labels: npt.NDArray[np.int64], sims: npt.NDArray[np.float32], label_sku: dict[int, str]
) -> list[tuple[str, float]]:
    """Vector hits -> items in rank order, each at its best similarity."""
    seen: dict[str, float] = {}
    for lbl, s in zip(labels.tolist(), sims.tolist(), strict=True):
        sku = label_sku.get(int(lbl))
        if sku is not None and sku not in seen:
            seen[sku] = float(s)
    return list(seen.items())


def _metrics(
    ranked: list[list[tuple[str, float]]], truths: list[str], skipped: int, rule: MatchRule, top: int
) -> dict[str, Any]:
    n = len(truths)
    if n == 0:
        raise EvalError("no query image could be decoded")
    top1 = [r[0] if r else ("", -1.0) for r in ranked]
    correct = [t == p[0] for t, p in zip(truths, top1, strict=True)]
    at5 = [t in [s for s, _ in r[:5]] for t, r in zip(truths, ranked, strict=True)]
    right = [p[1] for p, ok in zip(top1, correct, strict=True) if ok]
    wrong = [p[1] for p, ok in zip(top1, correct, strict=True) if not ok]
    # What the kiosk would answer: the snapshot's rule over each query's ranked item scores.
    conf = [rule.confidence([sc for _, sc in r]) for r in ranked]
    right_c = [c for c, ok in zip(conf, correct, strict=True) if ok]
    wrong_c = [c for c, ok in zip(conf, correct, strict=True) if not ok]
    confused = Counter((t, p[0]) for t, p, ok in zip(truths, top1, correct, strict=True) if not ok)
    return {
        "queries": n,
        "skipped": skipped,
        "recall@1": round(float(np.mean(correct)), 4),
        "recall@5": round(float(np.mean(at5)), 4),
        "mean_sim_correct": round(float(np.mean(right)), 4) if right else None,
        "mean_sim_wrong": round(float(np.mean(wrong)), 4) if wrong else None,
        "threshold": rule.threshold,
        "margin_weight": rule.margin_weight,
        "correct_kept": round(float(np.mean([c >= rule.threshold for c in right_c])), 4) if right_c else None,
        "wrong_rejected": round(float(np.mean([c < rule.threshold for c in wrong_c])), 4)
        if wrong_c
        else None,
        "confused": [{"true": t, "predicted": p, "count": c} for (t, p), c in confused.most_common(top)],
    }

"""Grocery data, embeddings and tuned bundles for `make eval` (scripts/eval_grocery.py): the val photos
are only ever embedded here, never fitted on."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cloud.retrieval_augment import augmented_views

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SHARED", REPO.parent / "shared")).resolve()
DATA = SHARED / "data" / "grocery"
SOURCE = SHARED / "models" / "coral" / "tf2_mobilenet_v2_1.0_224_ptq.tflite"
OUT = REPO / "build" / "eval"
N_ITEMS = 81
OPEN_SET_SEED = 6  # the open set: a fixed, seeded share of the items left out of the catalog
OPEN_SET_SHARE = 0.2
QUERY_CROP = 0.875  # a further centre crop of the query, on top of the recipe's own 0.875 (models/export.py)


@dataclass
class Split:
    paths: list[Path]
    labels: np.ndarray


def read_split(name: str) -> Split:
    paths, labels = [], []
    for line in (DATA / f"{name}.txt").read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 2 and parts[0]:
            paths.append(DATA / parts[0])
            labels.append(int(parts[1]))
    return Split(paths, np.asarray(labels, np.int64))


def read_iconic() -> Split:
    import csv

    paths, labels = [], []
    with open(DATA / "classes.csv", newline="", encoding="utf-8") as fh:
        rows = csv.reader(fh)
        next(rows)
        for row in rows:
            paths.append(DATA / row[4].lstrip("/"))
            labels.append(int(row[1]))
    return Split(paths, np.asarray(labels, np.int64))


def centre(img: np.ndarray, share: float) -> np.ndarray:
    h, w = img.shape[:2]
    ch, cw = max(1, round(h * share)), max(1, round(w * share))
    y, x = (h - ch) // 2, (w - cw) // 2
    return np.ascontiguousarray(img[y : y + ch, x : x + cw])


VIEWS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "orig": lambda im: im,
    "flip": lambda im: np.ascontiguousarray(im[:, ::-1]),
    "c80": lambda im: centre(im, 0.8),
    "c80flip": lambda im: np.ascontiguousarray(centre(im, 0.8)[:, ::-1]),
    "c875": lambda im: centre(im, QUERY_CROP),
}


@functools.cache
def file_sha256(path: Path) -> str:
    """An image's sha256, read once per run (every bundle and view asks again)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Embeddings:
    """Embeds images through the bundle, caching one .npy per (image sha256 + view tag, model_id)."""

    def __init__(self, embedder: Any, cache_root: Path) -> None:
        self.embedder = embedder
        self.cache = cache_root / embedder.model_id[:16]
        self.cache.mkdir(parents=True, exist_ok=True)
        self.computed = 0

    def _file(self, path: Path, tag: str) -> Path:
        return self.cache / f"{file_sha256(path)}-{tag}.npy"

    def cached(self, paths: list[Path], tag: str) -> bool:
        """True when every path's ``tag`` view is in the cache (``get`` would embed nothing)."""
        return all(self._file(p, tag).exists() for p in paths)

    def get(self, paths: list[Path], make: Callable[[np.ndarray, str], list[np.ndarray]], tag: str,
            per_image: int) -> np.ndarray:  # fmt: skip
        """(len(paths) * per_image, dim): ``make(image, sha)`` yields ``per_image`` crops per path."""
        from models.images import load_image

        out = np.zeros((len(paths) * per_image, self.embedder.dim), np.float32)
        todo: list[tuple[int, Path, str]] = []
        for i, p in enumerate(paths):
            sha = file_sha256(p)
            f = self._file(p, tag)
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
            for (i, p, _), v in zip(chunk, vecs, strict=True):
                np.save(self._file(p, tag), v)
                out[i * per_image : (i + 1) * per_image] = v
            self.computed += len(crops)
        return out


def seed_of(sha: str) -> int:
    return int(sha[:8], 16)


def tuned_bundle(base: Path, split: Split, tag: str) -> Path:
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


def concat(a: Split, b: Split) -> Split:
    return Split(a.paths + b.paths, np.concatenate([a.labels, b.labels]))


def only(split: Split, items: np.ndarray) -> Split:
    keep = np.isin(split.labels, items)
    return Split([p for p, k in zip(split.paths, keep, strict=True) if k], split.labels[keep])

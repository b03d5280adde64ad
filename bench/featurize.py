"""Catalog featurization bench: JPEG decode + embed of real catalog photos vs benchmark_app on the same IR.

``featurize_ratio`` = our images/s through ``cloud.featurize`` (file read, safe decode, host pre-size,
inference, thumbnails) / benchmark_app's throughput-hint FPS on the bundle's IR at its input size
(pre-generated tensors, no decode), in the Embedder's configuration (1 stream, 2 requests); the ratio
against benchmark_app's default 2-stream setting is reported beside it. Target >= 0.85. Uses the
grocery train photos when ../shared has them, otherwise generated JPEGs of the same size.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.models import _benchmark_app, _shared
from cloud.catalog import Item
from cloud.featurize import featurize
from models.embedder import Embedder
from models.export import export_model

_LOGGER = logging.getLogger(__name__)
N_IMAGES = 600  # ~3-5 s of work at MobileNetV2 speed: enough for a stable rate, keeps the bench short


def _images(out_dir: Path) -> list[Path]:
    train = _shared() / "data" / "grocery" / "train"
    if train.is_dir():
        return sorted(train.rglob("*.jpg"))[:N_IMAGES]
    gen = out_dir / "featurize-images"
    gen.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(N_IMAGES):
        p = gen / f"{i}.jpg"
        if not p.exists():
            img = cv2.GaussianBlur(rng.integers(0, 256, (348, 348, 3), dtype=np.uint8), (7, 7), 0)
            cv2.imwrite(str(p), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(p)
    return paths


def run(out_dir: Path) -> dict[str, Any]:
    """Export the bench bundle, featurize N catalog photos, compare with benchmark_app."""
    out_dir = Path(out_dir)
    mobilenet = _shared() / "models" / "coral" / "tf2_mobilenet_v2_1.0_224_ptq.tflite"
    source = str(mobilenet) if mobilenet.is_file() else "resnet18"
    bundle = out_dir / "featurize-bundle"
    manifest = export_model(source, bundle, precision="fp16")
    size = tuple(int(v) for v in manifest.preprocessing["size"])
    images = _images(out_dir)
    items = [
        Item(sku=f"SKU-{i:05d}", title="bench", price=None, location=None, stores=(), images=(str(p),), row=i)
        for i, p in enumerate(images)
    ]
    with Embedder(bundle, mode="throughput") as embedder:
        featurize(items[:16], embedder, base_dir=out_dir, progress=False)  # warm: threads, page cache
        t0 = time.perf_counter()
        feats = featurize(items, embedder, base_dir=out_dir, progress=False)
        ours_s = time.perf_counter() - t0
    ours_fps = feats.embedded / ours_s
    ref = _benchmark_app(bundle / "model.xml", "throughput", size, nstreams=1)  # type: ignore[arg-type]
    ref2 = _benchmark_app(bundle / "model.xml", "throughput", size)  # type: ignore[arg-type]
    result = {
        "model": manifest.name,
        "images": feats.embedded,
        "bad_images": len(feats.bad_images),
        "ours_images_per_s": round(ours_fps, 1),
        "benchmark_app_fps": ref["fps"],
        "featurize_ratio": round(ours_fps / ref["fps"], 3),
        "benchmark_app_2streams_fps": ref2["fps"],
        "featurize_vs_2streams_ratio": round(ours_fps / ref2["fps"], 3),
    }
    _LOGGER.info("featurize bench: %s", result)
    return result

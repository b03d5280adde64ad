"""Feedback (store-learning loop) costs: building one message at answer time, and what the frame path pays.

- ``build_ms``: one FeedbackEvent from a held item's crop (a 640x480 frame's item box, JPEG at the default
  quality, downscaled to the cap) and its three 1280-d vectors (MobileNetV2's pooled size): p50 / p99 over
  ITERATIONS, on the screen's thread when the customer answers, never on the frame path.
- ``remember_us``: filing an item's references under its match id (on the result path, once per item).
- ``frame_path_extra_us``: what the frame path does more per submitted crop: one more reference in the
  Pending record (Pending with the crop vs without), the only change there; ``frame_path_budget_ms`` is 1.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from device.camera.synthetic import make_scene, render_items
from device.config import FeedbackConfig
from device.feedback import FeedbackRecorder
from device.pipeline import ItemResult, ModelPair
from device.pipeline.stages import Pending
from device.screen.answers import Answer
from storelens.protocol import Topics

ITERATIONS = 200
DIM = 1280  # MobileNetV2's pooled features


def _pctl(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def run(out: Path) -> dict[str, Any]:
    """Time message builds and the frame path's extra work; the JSON is written by bench.__main__."""
    items = render_items(1, seed=2)
    scene = make_scene(items, seed=2)
    frame = scene.frame(scene.n_frames // 2)  # 640x480 BGR, an item held
    crop = frame[100:420, 180:460]  # an item box, a view as the detector gives it
    rng = np.random.default_rng(0)
    vecs = tuple((v / np.linalg.norm(v)).astype(np.float32) for v in rng.normal(size=(3, DIM)))
    result = ItemResult(1, True, (), 0.5, 3, 7, 1.0, 0.0, model_id="ab" * 32, crop=crop, vectors=vecs)
    sent: list[bytes] = []
    rec = FeedbackRecorder(FeedbackConfig(enabled=True, max_per_hour=10**9), Topics("s1", "k1"),
                           lambda _t, p: sent.append(p))
    build_ms, remember_us = [], []
    for i in range(ITERATIONS):
        mid = f"m{i}"
        t0 = time.perf_counter()
        rec.remember(mid, result)
        t1 = time.perf_counter()
        rec.on_answer(Answer(mid, "confirmed", "a", ("a", "b", "c", "d"), 2.0))
        t2 = time.perf_counter()
        remember_us.append((t1 - t0) * 1e6)
        build_ms.append((t2 - t1) * 1e3)
    pair = ModelPair.__new__(ModelPair)
    with_crop, without = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(10_000):
            Pending(1, 1, 0.0, 0.1, 0.2, 0.3, pair, 0, crop)
        t1 = time.perf_counter()
        for _ in range(10_000):
            Pending(1, 1, 0.0, 0.1, 0.2, 0.3, pair, 0)
        t2 = time.perf_counter()
        with_crop.append((t1 - t0) / 10_000 * 1e6)
        without.append((t2 - t1) / 10_000 * 1e6)
    return {
        "iterations": ITERATIONS,
        "crop_px": list(crop.shape[:2]),
        "dim": DIM,
        "build_ms": {"p50": round(statistics.median(build_ms), 3), "p99": round(_pctl(build_ms, 0.99), 3)},
        "message_bytes": len(sent[-1]),
        "remember_us": {"p50": round(statistics.median(remember_us), 2)},
        "frame_path_extra_us": round(statistics.median(with_crop) - statistics.median(without), 3),
        "pending_us": {"with_crop": round(statistics.median(with_crop), 3),
                       "without": round(statistics.median(without), 3)},
        "frame_path_budget_ms": 1.0,
    }

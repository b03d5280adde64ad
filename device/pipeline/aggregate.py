"""One answer per held item: mean embedding + per-frame score voting, then the snapshot's threshold."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from device.sync.active import ActiveSnapshot, Hit


@dataclass(frozen=True, slots=True)
class ItemResult:
    """The answer for one held item (``hits`` best first; ``matched`` False means "ask staff")."""

    item_id: int
    matched: bool
    hits: tuple[Hit, ...]
    threshold: float
    frames: int
    snapshot_version: int
    agreement: float  # share of steady frames whose own top-1 is the answer's top-1
    t_capture_last: float  # monotonic capture time of the last aggregated frame
    latency_ms: dict[str, float] = field(default_factory=dict)
    model_id: str = ""  # the model that embedded the item (the pair it was searched with)
    snapshot_dir: Path | None = None  # where that snapshot's thumbnails are
    # For the store-learning loop (device.feedback), references only: the last embedded crop (a view of
    # its frame) and the item's model-space vectors (before the snapshot's projection), not copied.
    crop: npt.NDArray[Any] | None = None
    vectors: tuple[npt.NDArray[np.float32], ...] = ()


def aggregate(
    vectors: Sequence[npt.NDArray[np.float32]], snapshot: ActiveSnapshot, k: int
) -> tuple[list[Hit], float]:
    """Rank skus for the steady frames of one item; return (top-k hits, agreement).

    Score = the mean of two votes: the similarity to the renormalised mean embedding (robust to sensor
    noise) and the frames' average similarity (robust to one bad frame pulling the mean away); a sku
    missing from a list gets that list's lowest score, a lower bound of its true one.
    """
    if len(vectors) == 1:  # one frame: its own vector is the mean and both votes are its scores
        hits = snapshot.search(np.asarray(vectors[0], dtype=np.float32)[None, :], k)[0]
        # Hit(...) rather than dataclasses.replace (half the cost; this runs for every held item).
        rounded = [
            Hit(sku=h.sku, title=h.title, price=h.price, location=h.location, thumbnail=h.thumbnail,
                score=round(h.score, 6))
            for h in hits
        ]  # fmt: skip
        return rounded, 1.0 if hits else 0.0
    v = np.stack([np.asarray(x, dtype=np.float32) for x in vectors])
    mean = v.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    mean = mean / norm if norm > 0 else v[0]
    lists = snapshot.search(np.vstack([mean[None, :], v]).astype(np.float32), k)
    mean_hits, frame_hits = lists[0], lists[1:]
    by_sku: dict[str, Hit] = {}
    for hits in lists:
        for h in hits:
            by_sku.setdefault(h.sku, h)
    if not by_sku:
        return [], 0.0

    def score_in(hits: list[Hit]) -> dict[str, float]:
        return {h.sku: h.score for h in hits}

    mean_scores = score_in(mean_hits)
    mean_floor = min(mean_scores.values(), default=0.0)
    voted = dict.fromkeys(by_sku, 0.0)
    for hits in frame_hits:
        scores = score_in(hits)
        floor = min(scores.values(), default=0.0)
        for sku in voted:
            voted[sku] += scores.get(sku, floor) / len(frame_hits)
    final = {sku: 0.5 * (mean_scores.get(sku, mean_floor) + voted[sku]) for sku in by_sku}
    ranked = sorted(final, key=lambda s: (-final[s], s))[:k]
    top = ranked[0]
    agreement = sum(1 for hits in frame_hits if hits and hits[0].sku == top) / len(frame_hits)
    out = [
        Hit(by_sku[s].sku, by_sku[s].title, by_sku[s].price, by_sku[s].location, by_sku[s].thumbnail,
            round(float(final[s]), 6))
        for s in ranked
    ]
    return out, agreement

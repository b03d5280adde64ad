"""The "no match" decision a kiosk makes from a snapshot's manifest (shared with the cloud's calibration).

A snapshot calibrated with an open-set rule (``manifest.extra["open_set"]``, kind ``top1+margin/1``) says
"no match" when ``top1 + w * (top1 - top2) < threshold`` over the best score of each distinct item;
a snapshot without one compares the top-1 similarity with ``manifest.threshold``.

A snapshot may also ship rejection rows (``manifest.extra["not_carried"]``: a file of unit float32 rows
in the index's space): photos of products the store does not carry, which customers held up and staff
confirmed ("Not here" -> "not carried"). A query at least as similar to one of them as to its best
product (plus ``margin``) is answered "no match". Kiosks that predate them ignore the key (and answer as
before); the file is listed and hashed in the signed manifest like every other file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

OPEN_SET_KIND = "top1+margin/1"
NOT_CARRIED_KEY = "not_carried"
NOT_CARRIED_FILE = "not_carried.f32"  # little-endian float32 rows, ``dim`` columns, in the index's space
MAX_NOT_CARRIED_ROWS = 100_000  # a sanity bound on what a kiosk loads


@dataclass(frozen=True, slots=True)
class NotCarried:
    """Rejection rows: unit vectors (index space) of photos of products the store does not sell."""

    vectors: npt.NDArray[np.float32]  # (n, dim)
    margin: float = 0.0

    @classmethod
    def from_manifest(cls, directory: Path, extra: dict[str, Any], dim: int, files: Sequence[str]) -> (
            NotCarried | None):  # fmt: skip
        """The rows a verified snapshot ships (None without any); ValueError when they are malformed."""
        spec = extra.get(NOT_CARRIED_KEY)
        if not isinstance(spec, dict):
            return None
        name, count, margin = spec.get("file"), spec.get("count"), spec.get("margin", 0.0)
        if name != NOT_CARRIED_FILE or name not in files:
            raise ValueError(f"not-carried rows file {name!r} is not a file of the snapshot")
        if not isinstance(count, int) or not 0 < count <= MAX_NOT_CARRIED_ROWS:
            raise ValueError(f"not-carried row count {count!r} out of range")
        if not isinstance(margin, int | float) or not math.isfinite(margin) or abs(margin) > 1.0:
            raise ValueError(f"not-carried margin {margin!r} out of range")
        data = (Path(directory) / NOT_CARRIED_FILE).read_bytes()
        if len(data) != count * dim * 4:
            raise ValueError(f"{NOT_CARRIED_FILE}: {len(data)} bytes, expected {count} x {dim} float32")
        vecs = np.frombuffer(data, dtype="<f4").reshape(count, dim).astype(np.float32)
        return cls(vecs, float(margin))

    def best(self, queries: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Per query row (index space, unit), its best similarity to a not-carried photo."""
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        out: npt.NDArray[np.float32] = (q @ self.vectors.T).max(axis=1).astype(np.float32)
        return out

    def rejects(self, top1: float, not_carried_best: float) -> bool:
        """True when the query is nearer a not-carried photo than its best product (plus ``margin``)."""
        return not_carried_best >= top1 + self.margin


@dataclass(frozen=True, slots=True)
class MatchRule:
    threshold: float
    margin_weight: float = 0.0

    @classmethod
    def from_manifest(cls, threshold: float, extra: dict[str, Any]) -> MatchRule:
        """The rule a manifest ships: its open-set rule when present, else a plain top-1 threshold."""
        rule = extra.get("open_set")
        if isinstance(rule, dict) and rule.get("kind") == OPEN_SET_KIND:
            w = rule.get("margin_weight", 0.0)
            if isinstance(w, int | float) and 0.0 <= w <= 10.0:
                return cls(threshold=threshold, margin_weight=float(w))
        return cls(threshold=threshold)

    def confidence(self, item_scores: Sequence[float]) -> float:
        """top1 + w * (top1 - top2) from per-item best scores in descending order (margin 0 if one item)."""
        if not item_scores:
            return float("-inf")
        top1 = float(item_scores[0])
        top2 = float(item_scores[1]) if len(item_scores) > 1 else top1
        return top1 + self.margin_weight * (top1 - top2)

    def is_match(self, item_scores: Sequence[float]) -> bool:
        """True to answer with the top item, False for "no match"."""
        return self.confidence(item_scores) >= self.threshold

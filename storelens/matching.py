"""The "no match" decision a kiosk makes from a snapshot's manifest (shared with the cloud's calibration).

A snapshot calibrated with an open-set rule (``manifest.extra["open_set"]``, kind ``top1+margin/1``) says
"no match" when ``top1 + w * (top1 - top2) < threshold`` over the best score of each distinct item;
a snapshot without one compares the top-1 similarity with ``manifest.threshold``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

OPEN_SET_KIND = "top1+margin/1"


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

"""The kiosk's "no match" rule as shipped in a snapshot manifest."""

from __future__ import annotations

import math

from storelens.matching import OPEN_SET_KIND, MatchRule


def test_plain_threshold_without_open_set_rule() -> None:
    r = MatchRule.from_manifest(0.6, {})
    assert r.margin_weight == 0.0 and r.is_match([0.61, 0.60]) and not r.is_match([0.59])


def test_margin_rule_rejects_a_close_second() -> None:
    """Guards answering confidently when two items score almost the same (a sibling product)."""
    r = MatchRule.from_manifest(0.8, {"open_set": {"kind": OPEN_SET_KIND, "margin_weight": 1.0}})
    assert r.is_match([0.75, 0.60])  # 0.75 + 0.15
    assert not r.is_match([0.78, 0.77])  # 0.78 + 0.01
    assert r.confidence([0.7]) == 0.7 and r.confidence([]) == -math.inf


def test_unknown_or_hostile_rule_falls_back_to_top1() -> None:
    for extra in (
        {"open_set": {"kind": "other"}},
        {"open_set": {"kind": OPEN_SET_KIND, "margin_weight": 1e9}},
        {"open_set": "x"},
    ):
        assert MatchRule.from_manifest(0.5, extra).margin_weight == 0.0

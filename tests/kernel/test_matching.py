"""The kiosk's "no match" rule as shipped in a snapshot manifest."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from storelens.matching import NOT_CARRIED_FILE, NOT_CARRIED_KEY, OPEN_SET_KIND, MatchRule, NotCarried


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


def _rows_file(tmp_path: Path, rows: np.ndarray) -> Path:
    (tmp_path / NOT_CARRIED_FILE).write_bytes(np.ascontiguousarray(rows, dtype="<f4").tobytes())
    return tmp_path


def test_not_carried_rows_reject_a_query_nearer_them_than_any_product(tmp_path: Path) -> None:
    """Guards the kiosk answering with a product for an item the store said it does not sell."""
    rows = np.eye(4, dtype=np.float32)[:2]
    extra = {NOT_CARRIED_KEY: {"file": NOT_CARRIED_FILE, "count": 2, "margin": 0.0}}
    nc = NotCarried.from_manifest(_rows_file(tmp_path, rows), extra, 4, [NOT_CARRIED_FILE])
    assert nc is not None
    best = nc.best(np.array([[0.8, 0.6, 0, 0], [0, 0, 1, 0]], np.float32))
    assert best.tolist() == pytest.approx([0.8, 0.0])
    assert nc.rejects(top1=0.7, not_carried_best=0.8) and not nc.rejects(top1=0.9, not_carried_best=0.8)
    assert NotCarried.from_manifest(tmp_path, {}, 4, []) is None  # an older snapshot: none


@pytest.mark.parametrize(
    ("spec", "files", "dim"),
    [
        ({"file": "../x.f32", "count": 2}, ["../x.f32"], 4),  # another name than the contract's
        ({"file": NOT_CARRIED_FILE, "count": 2}, [], 4),  # not a signed file of the snapshot
        ({"file": NOT_CARRIED_FILE, "count": 3}, [NOT_CARRIED_FILE], 4),  # size disagrees
        ({"file": NOT_CARRIED_FILE, "count": 2}, [NOT_CARRIED_FILE], 5),  # dim disagrees
        ({"file": NOT_CARRIED_FILE, "count": 2, "margin": float("nan")}, [NOT_CARRIED_FILE], 4),
    ],
)
def test_malformed_not_carried_rows_are_refused(
    tmp_path: Path, spec: dict[str, object], files: list[str], dim: int
) -> None:
    """A manifest entry that disagrees with its file must not load (the kiosk refuses the snapshot)."""
    _rows_file(tmp_path, np.eye(4, dtype=np.float32)[:2])
    with pytest.raises(ValueError):
        NotCarried.from_manifest(tmp_path, {NOT_CARRIED_KEY: spec}, dim, files)

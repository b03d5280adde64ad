"""The loop bench (bench/loop.py) on a small rendered catalog and the tiny bundle: its keys and figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import loop
from bench.__main__ import SUITES
from device.config import DetectionConfig


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_loop_bench_reports_bytes_and_search_times_at_k0_and_k10(tmp_path: Path) -> None:
    """Guards the issue 19 figures in `make bench`: a renamed key, a k=10 snapshot that did not take the
    store photos (as big as k0), or search times that were never measured."""
    result = loop.run(tmp_path, synthetic=True, items=6, rounds=1)
    json.dumps(result)  # bench.__main__ writes it as JSON
    assert "loop" in SUITES
    assert len(loop.FRAME_CROPS) == DetectionConfig().aggregate_frames  # a held item as the kiosk sees it
    assert result["data"] == "synthetic" and result["k"] == loop.K == 10
    k0, k10 = result["k0"], result["k10"]
    assert k0["items"] == k10["items"] == 6
    assert k0["vectors"] == 6 and k10["store_photos"] >= 6 * 9  # the mis-tap filter may hold back a few
    assert k10["vectors"] == 6 + k10["store_photos"]
    assert k10["bytes"]["total"] > k0["bytes"]["total"] and k10["bytes_per_item"] > k0["bytes_per_item"]
    assert result["bytes_per_item_ratio"] > 1.0
    for row in (k0, k10):
        ms = row["search_ms"]
        assert ms["samples"] == 6 * loop.SYNTHETIC_HELD and 0 < ms["p50"] <= ms["p99"]
        assert 0.0 <= row["top1"] <= 1.0
    for key in ("search_p99_ratio", "search_p50_ratio"):
        assert result[key] > 0

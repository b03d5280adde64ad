"""Benchmarks: each module has run(out_dir) -> dict; `python -m bench [names]` runs them side by side."""

from __future__ import annotations

import os


def quick() -> bool:
    """True under ``make bench QUICK=1`` (``BENCH_QUICK``): suites measure MobileNetV2 only."""
    return os.environ.get("BENCH_QUICK", "") not in ("", "0")

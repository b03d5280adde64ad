"""The tally itself: a case recorded shows up in the counts."""

from __future__ import annotations

from tests.adversarial.conftest import _TALLY, Tally


def test_tally_counts_by_family_and_outcome(tally: Tally) -> None:
    tally.record("selftest:demo", "refused")
    tally.record("selftest:demo", "refused")
    assert _TALLY["selftest:demo"]["refused"] >= 2
    _TALLY.pop("selftest:demo")

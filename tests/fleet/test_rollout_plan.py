"""Rollout staging and halting against a scripted channel (no broker)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import pytest

from cloud.fleet.channel import KioskView
from cloud.fleet.rollout import Outcome, plan_stages, run_rollout
from storelens.protocol import DesiredRelease

KIOSKS = [KioskView(s, f"k{i}", state="online") for s in ("s1", "s2") for i in range(1, 4)]
DESIRED = DesiredRelease(
    kiosk="t", store="t", release="rel2", sequence=2, url="file:///r", sig_url="file:///s"
)


class ScriptedChannel:
    """Kiosks answer a stage with whatever ``behave(view)`` returns on the next poll."""

    def __init__(self, behave: Callable[[KioskView], KioskView]) -> None:
        self.behave = behave
        self.staged: list[list[str]] = []
        self.halted: list[str] = []
        self._views = {k.key: k for k in KIOSKS}

    def discover(self, stores: Sequence[str], *, timeout_s: float) -> list[KioskView]:
        return list(self._views.values())

    def stage(self, kiosks: Sequence[KioskView], desired: DesiredRelease, *, stage: int) -> None:
        self.staged.append([f"{k.store}/{k.kiosk}" for k in kiosks])
        for k in kiosks:
            self._views[k.key] = self.behave(self._views[k.key])

    def poll(self, kiosks: Sequence[KioskView]) -> list[KioskView]:
        return [self._views[k.key] for k in kiosks]

    def halt(self, reason: str) -> None:
        self.halted.append(reason)

    def close(self) -> None:
        pass


def _done(v: KioskView) -> KioskView:
    return replace(v, release="rel2", step="done", ok=True)


def test_plan_puts_canaries_in_different_stores_then_batches() -> None:
    """Canaries must be spread over stores, and every kiosk staged exactly once."""
    stages = plan_stages(KIOSKS, canary=2, batch_size=3)
    assert [[k.key for k in s] for s in stages] == [
        [("s1", "k1"), ("s2", "k1")],
        [("s1", "k2"), ("s1", "k3"), ("s2", "k2")],
        [("s2", "k3")],
    ]
    with pytest.raises(ValueError):
        plan_stages(KIOSKS, canary=1, batch_size=0)


def test_good_release_reaches_every_stage() -> None:
    """All kiosks done -> every stage staged in order and the rollout reports done."""
    ch = ScriptedChannel(_done)
    report = run_rollout(ch, DESIRED, KIOSKS, canary=1, batch_size=5, poll_interval_s=0.0)
    assert report.outcome is Outcome.DONE and [len(s) for s in ch.staged] == [1, 5] and not ch.halted


def test_failed_canary_halts_and_leaves_the_rest_untouched() -> None:
    """A canary that rolls back must stop the rollout before any other kiosk is staged."""
    ch = ScriptedChannel(
        lambda v: replace(v, release="rel2", step="rolled_back", ok=False, detail="selftest")
    )
    report = run_rollout(ch, DESIRED, KIOSKS, canary=1, batch_size=5, poll_interval_s=0.0)
    assert report.outcome is Outcome.HALTED and len(ch.staged) == 1 and ch.halted
    assert len(report.untouched) == 5 and "rolled_back" in report.reason


def test_offline_kiosk_in_a_stage_is_a_health_failure() -> None:
    """A staged kiosk going offline is a health regression: halt."""
    ch = ScriptedChannel(lambda v: replace(v, state="offline"))
    report = run_rollout(ch, DESIRED, KIOSKS, canary=2, batch_size=5, poll_interval_s=0.0)
    assert report.outcome is Outcome.HALTED and "offline" in report.reason


def test_stage_that_never_finishes_times_out() -> None:
    """No answer within the stage timeout must halt, naming the step each kiosk was stuck at."""
    ch = ScriptedChannel(lambda v: replace(v, release="rel2", step="download"))
    report = run_rollout(
        ch, DESIRED, KIOSKS, canary=1, batch_size=5, stage_timeout_s=0.05, poll_interval_s=0.01
    )
    assert report.outcome is Outcome.HALTED and "timeout at step download" in report.reason

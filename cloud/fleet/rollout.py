"""Staged rollout: canary kiosks first, then batches; halt at the first failed stage.

A stage succeeds when every kiosk in it reports ``done`` for the release (after its probation). It fails
on any ``failed`` / ``rolled_back`` report, a kiosk going offline or degraded (health regression), or the
stage timeout. On failure the remaining kiosks are never staged, and the channel is told to halt.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from cloud.fleet.channel import KioskView, RolloutChannel
from storelens.protocol import DesiredRelease
from storelens.release import ReleaseManifest

_LOGGER = logging.getLogger(__name__)

_FAILED_STEPS = ("failed", "rolled_back")
_UNHEALTHY_STATES = ("offline", "degraded")


class Outcome(StrEnum):
    DONE = "done"
    HALTED = "halted"
    NOTHING = "nothing_to_do"


@dataclass(slots=True)
class StageReport:
    index: int
    kiosks: list[tuple[str, str]]
    ok: bool = False
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


@dataclass(slots=True)
class RolloutReport:
    release: str
    outcome: Outcome
    stages: list[StageReport]
    untouched: list[tuple[str, str]]
    seconds: float
    reason: str = ""


def plan_stages(kiosks: Sequence[KioskView], *, canary: int, batch_size: int) -> list[list[KioskView]]:
    """Canary stage (spread over stores, round robin) then batches of ``batch_size`` in store order."""
    if batch_size < 1 or canary < 0:
        raise ValueError("batch size must be >= 1 and canary >= 0")
    by_store: dict[str, list[KioskView]] = {}
    for k in sorted(kiosks, key=lambda v: v.key):
        by_store.setdefault(k.store, []).append(k)
    picks: list[KioskView] = []
    while len(picks) < min(canary, len(kiosks)):
        for ks in by_store.values():
            taken = {p.key for p in picks}
            nxt = next((k for k in ks if k.key not in taken), None)
            if nxt is not None and len(picks) < canary:
                picks.append(nxt)
    chosen = {p.key for p in picks}
    rest = [k for k in sorted(kiosks, key=lambda v: v.key) if k.key not in chosen]
    stages = [picks] if picks else []
    stages += [rest[i : i + batch_size] for i in range(0, len(rest), batch_size)]
    return stages


def desired_for(
    release: ReleaseManifest, url: str, sig_url: str, *, deadline_s: float, probation_s: float | None = None
) -> DesiredRelease:
    """The desired-release template (kiosk/store are filled per kiosk by the channel)."""
    return DesiredRelease(
        kiosk="template",
        store="template",
        release=release.release,
        sequence=release.sequence,
        url=url,
        sig_url=sig_url,
        deadline_s=deadline_s,
        probation_s=probation_s,
    )


def _stage_state(views: Sequence[KioskView], release: str) -> tuple[bool, list[str]]:
    """(all done, failures) for one poll of a stage."""
    failures, done = [], 0
    for v in views:
        who = f"{v.store}/{v.kiosk}"
        if v.release == release and v.step in _FAILED_STEPS:
            failures.append(f"{who}: {v.step} ({v.detail})")
        elif v.state in _UNHEALTHY_STATES:
            failures.append(f"{who}: {v.state}")
        elif v.release == release and v.step == "done":
            done += 1
    return done == len(views), failures


def run_rollout(
    channel: RolloutChannel,
    desired: DesiredRelease,
    kiosks: Sequence[KioskView],
    *,
    canary: int = 1,
    batch_size: int = 10,
    stage_timeout_s: float = 1800.0,
    poll_interval_s: float = 1.0,
    stop: threading.Event | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> RolloutReport:
    """Stage ``desired`` to ``kiosks``; returns when the fleet is done or a stage failed."""
    stop = stop or threading.Event()
    say = on_progress or (lambda line: _LOGGER.info("%s", line))
    t0 = time.monotonic()
    stages = plan_stages(kiosks, canary=canary, batch_size=batch_size)
    reports: list[StageReport] = []
    if not stages:
        return RolloutReport(desired.release, Outcome.NOTHING, [], [], 0.0, "no kiosks")
    for i, members in enumerate(stages):
        rep = StageReport(i, [k.key for k in members])
        reports.append(rep)
        ts = time.monotonic()
        kind = "canary" if i == 0 and canary else "batch"
        say(f"stage {i} ({kind}): {', '.join('/'.join(k.key) for k in members)}")
        channel.stage(members, desired, stage=i)
        deadline = ts + stage_timeout_s
        while True:
            views = channel.poll(members)
            done, failures = _stage_state(views, desired.release)
            if failures or done:
                break
            if time.monotonic() >= deadline:
                failures = [
                    f"{v.store}/{v.kiosk}: timeout at step {v.step if v.release == desired.release else None}"
                    for v in views
                    if not (v.release == desired.release and v.step == "done")
                ]
                break
            if stop.wait(poll_interval_s):
                failures = ["rollout interrupted"]
                break
        rep.seconds = round(time.monotonic() - ts, 3)
        if failures:
            rep.failures = failures
            reason = f"stage {i} failed: {'; '.join(failures)}"
            channel.halt(reason)
            untouched = [k.key for s in stages[i + 1 :] for k in s]
            say(f"HALTED {reason}; {len(untouched)} kiosk(s) left untouched")
            return RolloutReport(
                desired.release, Outcome.HALTED, reports, untouched, round(time.monotonic() - t0, 3), reason
            )
        rep.ok = True
        say(f"stage {i} done in {rep.seconds:.1f} s")
    total = round(time.monotonic() - t0, 3)
    say(f"release {desired.release} on all {len(kiosks)} kiosk(s) in {total:.1f} s")
    return RolloutReport(desired.release, Outcome.DONE, reports, [], total)

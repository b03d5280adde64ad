"""What snapshot sync produces: a verified snapshot of the serving model, placed, not serving yet.

Sync downloads, verifies (pinned keys, store, model: the pairing rule), applies a delta onto a private copy
with its proof chain and places the result; it never swaps. The switcher (``device.generations``) loads the
new index off the hot path, runs its canaries, commits the pointer and swaps it in between frames.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from device.sync.active import ActiveSnapshot
from storelens.snapshot import SnapshotManifest


@dataclass(frozen=True, slots=True)
class SnapshotCandidate:
    """A verified snapshot directory for the serving model and how to commit it."""

    directory: Path
    manifest: SnapshotManifest  # verified (an applied delta's: re-derived from its signed chain)
    identity: tuple[int, str]  # (version, signed manifest sha256): what the next delta names as its base
    commit: Callable[[], None]  # write the pointer naming it: the commit point of the switch
    rollback: bool = False  # back to the previous snapshot (older by design: not a replay)


# The switch a candidate is handed to: the snapshot serving afterwards, or SnapshotRefused.
SnapshotSwitch = Callable[[SnapshotCandidate], ActiveSnapshot]

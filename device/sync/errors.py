"""The one error snapshot sync reports: an install or a stored generation refused, with a stable name."""

from __future__ import annotations

from storelens.errors import ReasonError


class SnapshotRefused(ReasonError[str]):
    """An install was refused; ``reason`` is a stable string (RejectReason values and a few of ours)."""

    what = "snapshot refused"

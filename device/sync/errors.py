"""The one error snapshot sync reports: an install or a stored generation refused, with a stable name."""

from __future__ import annotations


class SnapshotRefused(Exception):
    """An install was refused; ``reason`` is a stable string (RejectReason values and a few of ours)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"snapshot refused ({reason}): {detail}")
        self.reason = reason
        self.detail = detail

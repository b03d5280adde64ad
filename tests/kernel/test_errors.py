"""The one refusal shape: every (reason, detail) error of the packages is a storelens ReasonError."""

from __future__ import annotations

from cloud.feedback.verify import Reason, Refused
from device.generations.canary import UpdateFailed
from device.generations.child import CompileFailed
from device.sync import DownloadError, SnapshotLoadError, SnapshotRefused
from storelens.errors import ReasonError
from storelens.release import ReleaseRejected
from storelens.snapshot import RejectReason, SnapshotRejected


def test_refusals_share_one_base_and_keep_their_messages() -> None:
    """Status, alerts and counters read ``reason``/``detail`` off any of them; their texts must not move."""
    cases: list[tuple[ReasonError[str], str]] = [
        (SnapshotRejected(RejectReason.SYMLINK, "a/b"), "snapshot refused (symlink): a/b"),
        (SnapshotRefused("io_error", "disk"), "snapshot refused (io_error): disk"),
        (ReleaseRejected("bad_signature", "x"), "release refused (bad_signature): x"),
        (DownloadError("timeout", "slow"), "timeout: slow"),
        (SnapshotLoadError("bad_items", "row 3"), "bad_items: row 3"),
        (CompileFailed("memory", "killed"), "memory: killed"),
        (Refused(Reason.FORGED, "store"), "forged: store"),
        (UpdateFailed("compile", "crash", "sig 11"), "compile/crash: sig 11"),
    ]
    for exc, text in cases:
        assert isinstance(exc, ReasonError) and str(exc) == text and exc.detail == text.rsplit(": ", 1)[1]
    assert SnapshotRejected(RejectReason.SYMLINK, "").reason is RejectReason.SYMLINK

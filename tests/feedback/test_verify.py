"""The collector's checks without a broker: known snapshots, crop decoding caps, per-kiosk buckets."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from cloud.feedback.verify import KnownSnapshots, Reason, Refused, TokenBuckets, check_crop
from tests.feedback.conftest import MODEL, STORE, flat_jpeg, publish_snapshot_archive


def test_a_snapshot_published_after_start_becomes_known(snapshots: Path) -> None:
    """A kiosk answering with a version published after the collector started must not be refused for
    good; a forged version must not make it rescan the folder on every message."""
    now = [0.0]
    known = KnownSnapshots(STORE, snapshots_dir=snapshots, clock=lambda: now[0])
    known.check(MODEL, 3)
    known.check(MODEL[:12], 3)  # a kiosk may name the model by a prefix
    publish_snapshot_archive(snapshots, STORE, 4, "cd" * 32)
    now[0] = 1.0  # within RESCAN_MIN_S of the last scan: not read yet
    with pytest.raises(Refused) as exc:
        known.check("cd" * 32, 4)
    assert exc.value.reason is Reason.UNKNOWN_SNAPSHOT
    now[0] = 10.0
    known.check("cd" * 32, 4)
    with pytest.raises(Refused, match="unknown_snapshot"):
        known.check(MODEL, 4)  # v4 was built with another model
    publish_snapshot_archive(snapshots, "other", 9, MODEL)
    now[0] = 20.0
    with pytest.raises(Refused, match="unknown_snapshot"):
        known.check(MODEL, 9)  # another store's snapshot


def test_a_broken_archive_is_skipped_not_fatal(snapshots: Path) -> None:
    """One unreadable archive in the folder must not stop the collector from knowing the others."""
    bad = snapshots / STORE / "v7" / "snapshot.tar"
    bad.parent.mkdir()
    bad.write_bytes(b"not a tar")
    assert KnownSnapshots(STORE, snapshots_dir=snapshots).versions() == {3: MODEL}


def test_crop_caps_refuse_before_decoding() -> None:
    """A JPEG whose header claims a huge image (a decompression bomb) must be refused from its header."""
    assert check_crop(flat_jpeg(100, 80)) == (100, 80)
    for side, needle in ((9_000, "9000x9000 px"), (60_000, "decompression bomb")):
        bomb = bytearray(flat_jpeg(64, 64))
        sof = bomb.index(b"\xff\xc0")
        bomb[sof + 5 : sof + 9] = struct.pack(">HH", side, side)  # height, width in the SOF0 header
        with pytest.raises(Refused, match=needle):
            check_crop(bytes(bomb))
    with pytest.raises(Refused, match="does not decode"):
        check_crop(flat_jpeg(64, 64)[:200])  # truncated
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 64
    with pytest.raises(Refused) as exc:
        check_crop(png)
    assert exc.value.reason is Reason.BAD_IMAGE


def test_token_bucket_refills_per_kiosk() -> None:
    """A kiosk over its burst is limited until its bucket refills; others are not affected."""
    now = [0.0]
    b = TokenBuckets(per_hour=3600.0, burst=2, clock=lambda: now[0])
    assert [b.take("kA") for _ in range(3)] == [True, True, False]
    assert b.take("kB")
    now[0] = 1.0
    assert b.take("kA") and not b.take("kA")
    with pytest.raises(ValueError):
        TokenBuckets(per_hour=0, burst=1)

"""storelens.archive.unpack refuses archives that are not whole, or that name a member twice."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from storelens.archive import pack, unpack
from storelens.snapshot import RejectReason, SnapshotRejected, verify_snapshot
from tests.device.sync.snapbuild import build_snapshot


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _member_ends(archive: Path) -> list[int]:
    """Byte offsets where each member's data (padded to a block) ends: cutting there leaves whole members."""
    with tarfile.open(archive, mode="r:") as tar:
        return [info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE for info in tar]


def test_whole_archive_unpacks(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """Guards the baseline: the end-marker check must not refuse what pack() writes."""
    built = build_snapshot(tmp_path / "src", key, version=1)
    pack(built.directory, tmp_path / "s.tar")
    unpack(tmp_path / "s.tar", tmp_path / "out", max_total_bytes=1 << 30)
    assert verify_snapshot(tmp_path / "out", [key.public_key()]).version == 1


def test_archive_without_end_marker_is_refused_at_unpack(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """Guards: an archive cut between members (or right after the last one) extracting as if whole;
    tarfile stops quietly at a missing header, so the partial directory used to reach verification."""
    built = build_snapshot(tmp_path / "src", key, version=1)
    pack(built.directory, tmp_path / "s.tar")
    data = (tmp_path / "s.tar").read_bytes()
    ends = _member_ends(tmp_path / "s.tar")
    cuts = [*ends[1::5], ends[-1], ends[-1] + tarfile.BLOCKSIZE]  # the last: one zero block, not two
    assert len(cuts) >= 4
    for i, cut in enumerate(cuts):
        (tmp_path / f"t{i}.tar").write_bytes(data[:cut])
        with pytest.raises(SnapshotRejected) as exc:
            unpack(tmp_path / f"t{i}.tar", tmp_path / f"out{i}", max_total_bytes=1 << 30)
        assert exc.value.reason == RejectReason.BAD_ARCHIVE, cut
        assert "end-of-archive" in exc.value.detail
        assert not (tmp_path / f"out{i}").exists()
    (tmp_path / "whole.tar").write_bytes(data[: ends[-1] + 2 * tarfile.BLOCKSIZE])  # padding is optional
    unpack(tmp_path / "whole.tar", tmp_path / "whole", max_total_bytes=1 << 30)


def test_duplicate_member_names_are_refused(tmp_path: Path) -> None:
    """Guards: a second copy of a member silently replacing the first on extraction."""
    archive = tmp_path / "dup.tar"
    with tarfile.open(archive, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("manifest.json", b"{}"), ("index.bin", b"one"), ("index.bin", b"two")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(SnapshotRejected) as exc:
        unpack(archive, tmp_path / "out", max_total_bytes=1 << 20)
    assert exc.value.reason == RejectReason.BAD_ARCHIVE and "twice" in exc.value.detail
    assert not (tmp_path / "out").exists()

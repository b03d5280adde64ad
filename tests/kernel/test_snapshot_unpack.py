"""storelens.archive.unpack refuses archives that are not whole, or that name a member twice; a snapshot
given as a folder is copied under the same limits (copy_snapshot_dir)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from storelens.archive import copy_snapshot_dir, pack, unpack
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


def test_a_snapshot_folder_copies_whole(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """Guards the baseline: the folder copy's checks must not refuse what the build writes."""
    built = build_snapshot(tmp_path / "src", key, version=1)
    copy_snapshot_dir(built.directory, tmp_path / "out", max_total_bytes=1 << 30)
    assert verify_snapshot(tmp_path / "out", [key.public_key()]).version == 1


def test_a_folder_that_is_no_snapshot_or_holds_the_store_is_refused_before_any_copy(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    """Guards: `[snapshots] initial = ""` (the config's own folder) copied into the kiosk's state folder
    inside it until RecursionError, and a folder as large as `/` copied whole before verification."""
    (tmp_path / "cfg" / "state").mkdir(parents=True)
    (tmp_path / "cfg" / "kiosk.toml").write_text("[kiosk]\n")
    staged = tmp_path / "cfg" / "state" / "install-1"
    with pytest.raises(SnapshotRejected) as exc:
        copy_snapshot_dir(tmp_path / "cfg", staged, max_total_bytes=1 << 30)
    assert exc.value.reason is RejectReason.MISSING_MANIFEST and not staged.exists()

    built = build_snapshot(tmp_path / "snap", key, version=1)
    with pytest.raises(SnapshotRejected) as exc:  # a snapshot folder that holds the store itself
        copy_snapshot_dir(built.directory, built.directory / "state" / "install-1", max_total_bytes=1 << 30)
    assert exc.value.reason is RejectReason.UNEXPECTED_FILE and not (built.directory / "state").exists()

    size = sum(p.stat().st_size for p in built.directory.rglob("*") if p.is_file())
    with pytest.raises(SnapshotRejected, match=f"more than {size - 1} bytes"):
        copy_snapshot_dir(built.directory, tmp_path / "big", max_total_bytes=size - 1)
    with pytest.raises(SnapshotRejected, match="more than 2 files"):
        copy_snapshot_dir(built.directory, tmp_path / "many", max_total_bytes=1 << 30, max_members=2)
    (built.directory / "extra").symlink_to("/etc/passwd")
    with pytest.raises(SnapshotRejected) as exc:
        copy_snapshot_dir(built.directory, tmp_path / "link", max_total_bytes=1 << 30)
    assert exc.value.reason is RejectReason.SYMLINK
    assert not any((tmp_path / d).exists() for d in ("big", "many", "link"))

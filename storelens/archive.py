"""The snapshot's transport archive: an uncompressed tar of the flat directory, extracted defensively
(regular files with safe names only, no member twice, whole: the end-of-archive marker present); a
snapshot given as a folder is copied under the same limits (``copy_snapshot_dir``)."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

from storelens.fsutil import atomic_write_bytes, fsync_dir
from storelens.snapshot import MANIFEST, SIGNATURE, RejectReason, SnapshotRejected, is_safe_name, scan_files

_END_MARKER_BYTES = 2 * tarfile.BLOCKSIZE  # POSIX: an archive ends with two zero blocks


def pack(directory: Path, archive: Path) -> None:
    """Write the snapshot directory as one tar file (atomically), manifest first.

    Every regular file goes in as it is (a nested file named like the manifest too: the kiosk refuses
    what is unlisted); SnapshotRejected (``symlink``) rather than packing what a symlink points at.
    """
    directory = Path(directory)
    buf = io.BytesIO()
    names = [MANIFEST, SIGNATURE, *sorted(scan_files(directory) - {MANIFEST, SIGNATURE})]
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            info = tar.gettarinfo(str(directory / name), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            with open(directory / name, "rb") as fh:
                tar.addfile(info, fh)
    atomic_write_bytes(Path(archive), buf.getvalue())


def unpack(archive: Path, dest: Path, *, max_total_bytes: int, max_members: int = 100_000) -> None:
    """Extract a snapshot archive into a new directory ``dest``: regular files with safe names only.

    The archive must be whole: a tar without its end-of-archive marker (two zero blocks after the last
    member: a cut-short download or upload) is refused, as is one naming a member twice (the later copy
    would silently replace the earlier one on extraction).
    """
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} already exists")
    try:
        with tarfile.open(archive, mode="r:") as tar:
            members = []
            names: set[str] = set()
            total = 0
            for i, info in enumerate(tar):
                if i >= max_members:
                    raise SnapshotRejected(RejectReason.BAD_ARCHIVE, "too many members")
                if not info.isreg():
                    raise SnapshotRejected(RejectReason.BAD_ARCHIVE, f"{info.name!r} is not a regular file")
                if not _member_ok(info.name):
                    raise SnapshotRejected(RejectReason.UNSAFE_NAME, f"archive member {info.name!r}")
                if info.name in names:
                    raise SnapshotRejected(RejectReason.BAD_ARCHIVE, f"member {info.name!r} appears twice")
                names.add(info.name)
                total += info.size
                if total > max_total_bytes:
                    raise SnapshotRejected(
                        RejectReason.BAD_ARCHIVE, f"archive exceeds {max_total_bytes} bytes"
                    )
                members.append(info)
            _check_end_marker(Path(archive), tar.offset)
            tmp = dest.with_name(f".{dest.name}.partial")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            tar.extractall(tmp, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise SnapshotRejected(RejectReason.BAD_ARCHIVE, f"cannot read archive: {exc}") from exc
    fsync_dir(tmp)
    tmp.rename(dest)
    fsync_dir(dest.parent)


def _check_end_marker(archive: Path, offset: int) -> None:
    """tarfile stops quietly at a missing header; demand the two zero blocks that end a whole archive."""
    with open(archive, "rb") as fh:
        fh.seek(offset)
        tail = fh.read(_END_MARKER_BYTES)
    if len(tail) < _END_MARKER_BYTES or tail.count(0) != _END_MARKER_BYTES:
        raise SnapshotRejected(
            RejectReason.BAD_ARCHIVE, f"no end-of-archive marker at byte {offset}: the archive is cut short"
        )



def copy_snapshot_dir(src: Path, dest: Path, *, max_total_bytes: int, max_members: int = 100_000) -> None:
    """Copy a snapshot folder into a new directory ``dest`` under :func:`unpack`'s limits.

    A folder is a path someone typed (``[snapshots] initial``): one without a manifest is refused before
    anything is read, so a typo naming the config's own folder, or ``/``, is not copied whole (the kiosk's
    state folder inside it made the copy recurse until Python gave up). Regular files with safe names only,
    no symlinks, at most ``max_members`` files and ``max_total_bytes``.
    """
    src, dest = Path(src), Path(dest)
    if not (src / MANIFEST).is_file():
        raise SnapshotRejected(RejectReason.MISSING_MANIFEST, f"{src} is not a snapshot folder (no manifest)")
    if dest.resolve().is_relative_to(src.resolve()):
        raise SnapshotRejected(RejectReason.UNEXPECTED_FILE, f"{src} holds the kiosk's own snapshot store")
    try:
        files = _listing(src, max_total_bytes, max_members)
        dest.mkdir(parents=True)
        for rel in files:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, dest / rel, follow_symlinks=False)
    except OSError as exc:
        raise SnapshotRejected(RejectReason.MISSING_FILE, f"cannot copy {src}: {exc}") from exc


def _listing(src: Path, max_total_bytes: int, max_members: int) -> list[str]:
    """Every file below ``src`` (relative names; symlinks and special files refused by ``scan_files``),
    checked as :func:`unpack` checks archive members."""
    files = sorted(scan_files(src))
    if len(files) > max_members:
        raise SnapshotRejected(RejectReason.BAD_ARCHIVE, f"more than {max_members} files")
    total = 0
    for rel in files:
        if not _member_ok(rel):
            raise SnapshotRejected(RejectReason.UNSAFE_NAME, f"file {rel!r}")
        total += (src / rel).stat().st_size
        if total > max_total_bytes:
            raise SnapshotRejected(RejectReason.BAD_ARCHIVE, f"more than {max_total_bytes} bytes")
    return files


def _member_ok(name: str) -> bool:
    """The signed pair at the top, or a safe snapshot file name (an archive member or a folder's file)."""
    return name in (MANIFEST, SIGNATURE) or is_safe_name(name)

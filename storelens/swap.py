"""Crash-safe replacement of a build's output: the snapshot directory ``DIR`` and its archive ``DIR.tar``.

Two paths cannot be renamed at once, so the swap is a small journal with one commit point. The new
snapshot is complete, signed and fsynced in ``.DIR.partial`` and its archive in ``.DIR.partial.tar``
before anything else moves; then:

1. ``.DIR.swap`` is written atomically (temp, fsync, rename, fsync the folder): the commit point.
   Before it exists a crash rolls back (the old ``DIR``/``DIR.tar`` stand, the partial files go);
   after it, forward (the partial files are complete and become ``DIR``/``DIR.tar``).
2. ``DIR`` -> ``.DIR.old``, ``.DIR.partial`` -> ``DIR``, ``.DIR.partial.tar`` -> ``DIR.tar`` (a plain
   ``rename`` that replaces the old archive in one step; without an archive the old one is removed, as it
   would no longer agree), fsync the folder.
3. ``.DIR.swap`` removed, fsync, then ``.DIR.old`` deleted.

``recover_output`` finishes or undoes an interrupted swap; the next build runs it first (and removes an
unfinished build's staged files), and so does every command that reads ``DIR`` (verify, publish, a
delta's ``--base``), so a crash at any step leaves the old or the new snapshot, with an archive that
agrees, where the next step reads it. It also restores a
``.DIR.old`` left without ``DIR`` by the swap that came before this one. Builder and readers take
``.DIR.lock`` (``flock``) around the swap and the recovery, so a reader never recovers a swap in flight.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from storelens.fsutil import atomic_write_bytes, fsync_dir

_LOGGER = logging.getLogger(__name__)


def _names(out_dir: Path) -> dict[str, Path]:
    p, n = out_dir.parent, out_dir.name
    return {
        "tar": p / f"{n}.tar",
        "new": p / f".{n}.partial",
        "new_tar": p / f".{n}.partial.tar",
        "old": p / f".{n}.old",
        "marker": p / f".{n}.swap",
        "lock": p / f".{n}.lock",
    }


def staging_dir(out_dir: Path) -> Path:
    """Where a build writes the new snapshot before ``install_output``."""
    return _names(Path(out_dir))["new"]


def staging_archive(out_dir: Path) -> Path:
    """Where a build writes the new archive before ``install_output``."""
    return _names(Path(out_dir))["new_tar"]


@contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    lock = _names(out_dir)["lock"]
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _leftovers(out_dir: Path) -> bool:
    n = _names(out_dir)
    temps = any(out_dir.parent.glob(f".{out_dir.name}.*.tmp")) or any(
        out_dir.parent.glob(f"..{out_dir.name}.*.tmp")
    )
    return temps or any(n[k].exists() for k in ("new", "new_tar", "old", "marker"))


def install_output(out_dir: Path, *, archive: bool) -> None:
    """Switch ``DIR`` (and ``DIR.tar`` when ``archive``) to the staged snapshot, crash-safe (see module)."""
    out_dir = Path(out_dir)
    n = _names(out_dir)
    with _locked(out_dir):
        _recover_locked(out_dir, discard_staged=False)
        if not n["new"].is_dir() or (archive and not n["new_tar"].is_file()):
            raise FileNotFoundError(f"nothing staged to install at {n['new']}")
        if not archive:
            n["new_tar"].unlink(missing_ok=True)
        fsync_tree(n["new"])
        atomic_write_bytes(n["marker"], json.dumps({"archive": archive}).encode())  # the commit point
        _roll_forward(out_dir, archive)


def recover_output(out_dir: Path, *, discard_staged: bool = False) -> None:
    """Finish or undo a swap a crash interrupted (a no-op when nothing is left over).

    Readers leave staged files alone (a build may be writing them); the next build passes
    ``discard_staged`` and removes an unfinished build's partial snapshot, archive and temp files.
    """
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir() or not _leftovers(out_dir):
        return
    with _locked(out_dir):
        _recover_locked(out_dir, discard_staged=discard_staged)


def recover_for_reading(path: Path) -> None:
    """``recover_output`` for a reader given ``DIR`` or ``DIR.tar`` (any other path: nothing to do)."""
    path = Path(path)
    out_dir = path.with_name(path.name[: -len(".tar")]) if path.name.endswith(".tar") else path
    if out_dir.name and not out_dir.name.startswith("."):
        recover_output(out_dir)


def fsync_tree(directory: Path) -> None:
    """fsync every file and folder under ``directory`` (hnswlib's save does not), deepest first."""
    for p in sorted(Path(directory).rglob("*"), key=lambda q: len(q.parts), reverse=True):
        if p.is_file() and not p.is_symlink():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        elif p.is_dir():
            fsync_dir(p)
    fsync_dir(directory)


def _recover_locked(out_dir: Path, *, discard_staged: bool) -> None:
    n = _names(out_dir)
    if n["marker"].exists():
        try:
            archive = bool(json.loads(n["marker"].read_bytes())["archive"])
        except (OSError, ValueError, KeyError, TypeError):
            archive = n["new_tar"].exists()  # written atomically, so unreadable means never written
        _LOGGER.warning("%s: finishing a swap a crash interrupted", out_dir)
        _roll_forward(out_dir, archive)
        return
    if not out_dir.exists() and n["old"].is_dir():
        _LOGGER.warning("%s: restoring the previous snapshot left in %s", out_dir, n["old"].name)
        os.rename(n["old"], out_dir)
        fsync_dir(out_dir.parent)
    shutil.rmtree(n["old"], ignore_errors=True)
    if discard_staged:
        shutil.rmtree(n["new"], ignore_errors=True)
        n["new_tar"].unlink(missing_ok=True)
        for pattern in (f".{out_dir.name}.*.tmp", f"..{out_dir.name}.*.tmp"):
            for tmp in out_dir.parent.glob(pattern):
                tmp.unlink(missing_ok=True)


def _roll_forward(out_dir: Path, archive: bool) -> None:
    n = _names(out_dir)
    if n["new"].is_dir():  # not yet moved: whatever stands at DIR is the old snapshot
        if out_dir.exists():
            shutil.rmtree(n["old"], ignore_errors=True)
            os.rename(out_dir, n["old"])
        os.rename(n["new"], out_dir)
    if archive:
        if n["new_tar"].exists():
            os.rename(n["new_tar"], n["tar"])
    else:
        n["tar"].unlink(missing_ok=True)
    fsync_dir(out_dir.parent)
    n["marker"].unlink()
    fsync_dir(out_dir.parent)
    shutil.rmtree(n["old"], ignore_errors=True)

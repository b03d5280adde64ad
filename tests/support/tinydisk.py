"""A real, tiny filesystem (tmpfs) that a test fills to ENOSPC and drains again."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

_BALLAST_CHUNK = 64 * 1024


class TinyDisk:
    """A tmpfs of ``size_kb`` mounted at ``path``; ``fill()`` writes ballast until the disk is full."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._ballast: list[Path] = []

    def fill(self) -> None:
        """Write ballast files until the filesystem answers ENOSPC (every byte taken)."""
        chunk = _BALLAST_CHUNK
        while chunk >= 1:
            f = self.path / f"ballast{len(self._ballast)}"
            self._ballast.append(f)
            try:
                with open(f, "wb") as fh:
                    while True:
                        fh.write(b"\0" * chunk)
                        fh.flush()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
            chunk //= 4

    def drain(self) -> None:
        """Delete the ballast: space returns."""
        for f in self._ballast:
            f.unlink(missing_ok=True)
        self._ballast.clear()

    @property
    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[TinyDisk]:
    """A 16 MiB tmpfs under tmp_path (needs root or CAP_SYS_ADMIN: skipped with the reason otherwise).

    Larger than SQLite's WAL at its auto-checkpoint (1000 pages, ~4 MB), so draining it really frees room.
    """
    mnt = tmp_path / "tinydisk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {res.stderr.strip()}")
    try:
        yield TinyDisk(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)

"""``catalog build``'s output swap killed at every rename/fsync/write/unlink: old or new, never neither."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from storelens.archive import pack, unpack
from storelens.snapshot import manifest_sha256, verify_snapshot
from storelens.swap import recover_for_reading, recover_output, staging_dir
from tests.adversarial.conftest import Tally
from tests.adversarial.crash import KILLED, crash_points, need_strace
from tests.device.snapshots import make_snapshot

pytestmark = pytest.mark.slow

_CHILD = """
import sys
from pathlib import Path
from storelens.archive import pack
from storelens.swap import install_output, staging_archive, staging_dir
out = Path(sys.argv[1])
pack(staging_dir(out), staging_archive(out))  # the build's last steps: archive, then the swap
install_output(out, archive=True)
"""


def _identity(path: Path) -> str:
    return manifest_sha256(path)


def _tar_identity(tar: Path) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp) / "t"
        unpack(tar, dest, max_total_bytes=tar.stat().st_size)
        return manifest_sha256(dest)


def test_a_build_killed_at_any_step_leaves_the_old_or_the_new_snapshot(
    tmp_path: Path, tally: Tally
) -> None:
    """Guards: no DIR (only .DIR.old), or DIR at the new version beside DIR.tar at the old, after a kill."""
    strace = need_strace()
    key = Ed25519PrivateKey.generate()
    vecs = np.random.default_rng(3).standard_normal((6, 16)).astype(np.float32)
    skus = [f"s{i}" for i in range(6)]
    tpl = tmp_path / "tpl"
    old = make_snapshot(tpl / "old", vecs, skus, key, model_id="a" * 64, version=1)
    new = make_snapshot(tpl / "new", vecs[::-1].copy(), skus, key, model_id="a" * 64, version=2)
    old_id, new_id = _identity(old), _identity(new)
    pub = [key.public_key()]

    run = tmp_path / "run"
    out = run / "snap"

    def prepare() -> None:  # each run starts alike: old DIR + DIR.tar, the new build staged beside them
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir()
        shutil.copytree(old, out)
        pack(out, run / "snap.tar")
        shutil.copytree(new, staging_dir(out))

    cases = 0
    for syscall, n, rc in crash_points(strace, ["-c", _CHILD, str(out)], prepare):
        cases += 1
        recover_for_reading(out)  # what `catalog verify` / `publish` / `--base` do first
        ok = out.is_dir() and (run / "snap.tar").is_file()
        if ok:
            got = _identity(out)
            verify_snapshot(out, pub, store="s1")
            ok = got in (old_id, new_id) and _tar_identity(run / "snap.tar") == got
            ok = ok and (rc == KILLED or got == new_id)
        tally.record("crash:build", "survived" if ok else "lost")
        assert ok, f"killed at {syscall} #{n}: no consistent snapshot in place"
        recover_output(out, discard_staged=True)  # the next build cleans up after the crashed one
        left = sorted(p.name for p in run.iterdir() if p.name not in ("snap", "snap.tar", ".snap.lock"))
        assert not left, f"killed at {syscall} #{n}: leftovers {left}"
    assert cases > 10

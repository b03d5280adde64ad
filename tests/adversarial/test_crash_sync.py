"""The kiosk's snapshot install killed at every rename/fsync/unlink: it boots on the old or the new one.

The child installs a signed v2 archive over an installed v1 (unpack, verify, place, switch, pointer) and
is SIGKILLed by the kernel on its Nth call of one syscall (``tests.adversarial.crash``); a fresh sync on
the same state dir must then serve v1 or v2 whole, and install v2 cleanly (no wedge, no leftovers that
block it). Writes of file contents are not enumerated (hundreds of points): their durable step is the
fsync/rename that follows, which is.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device.generations.switcher import switch_snapshot
from device.sync import ActiveSnapshot, SnapshotStore, SnapshotSync, Sources
from storelens.archive import pack
from tests.adversarial.conftest import Tally
from tests.adversarial.crash import KILLED, need_strace, run_killed
from tests.device.sync.snapbuild import MODEL_DIM, MODEL_ID, Built, build_snapshot

pytestmark = pytest.mark.slow

STEPS = ("rename", "renameat", "renameat2", "fsync", "fdatasync", "unlink", "unlinkat")
STORE = "store1"

_CHILD = """
import sys
from pathlib import Path
from cryptography.hazmat.primitives import serialization
from device.generations.switcher import switch_snapshot
from device.sync import SnapshotStore, SnapshotSync, Sources
from tests.device.sync.snapbuild import MODEL_DIM, MODEL_ID
root, pub, archive = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
key = serialization.load_pem_public_key(pub.read_bytes())
sync = SnapshotSync(SnapshotStore(root), [key], store_id="store1", model_id=MODEL_ID, model_dim=MODEL_DIM,
                    switch=lambda c: switch_snapshot(c, lambda s: None), on_refused=lambda r, d: None,
                    sources=Sources([]))
sync.load_active()
assert sync.install(archive).version == 2
"""


def _sync(root: Path, key: Ed25519PrivateKey, refused: list[str]) -> SnapshotSync:
    return SnapshotSync(
        SnapshotStore(root), [key.public_key()], store_id=STORE, model_id=MODEL_ID, model_dim=MODEL_DIM,
        switch=lambda c: switch_snapshot(c, lambda s: None), on_refused=lambda r, d: refused.append(r),
        sources=Sources([]),
    )


def _serves(snap: ActiveSnapshot | None, built: Built) -> bool:
    return snap is not None and all(
        snap.search(built.vectors[i : i + 1], 1)[0][0].sku == built.skus[i] for i in (0, 5, 11)
    )


def test_an_install_killed_at_any_step_boots_on_the_old_or_the_new_snapshot(
    tmp_path: Path, tally: Tally
) -> None:
    """Guards: a power cut mid-install leaving a kiosk with no snapshot, a mix, or a state dir that
    refuses the same snapshot on the next delivery."""
    strace = need_strace()
    key = Ed25519PrivateKey.generate()
    pub = tmp_path / "pub.pem"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    v1 = build_snapshot(tmp_path / "v1", key, version=1, n=12)
    v2 = build_snapshot(tmp_path / "v2", key, version=2, n=12, seed=3)
    archive = tmp_path / "v2.tar"
    pack(v2.directory, archive)
    seeded = tmp_path / "seeded"
    _sync(seeded, key, []).install(v1.directory)
    root = tmp_path / "root"

    cases, failures = 0, []
    for syscall in STEPS:
        for n in range(1, 200):
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(seeded, root, symlinks=True)
            rc = run_killed(strace, syscall, n, ["-c", _CHILD, str(root), str(pub), str(archive)])
            if rc != KILLED:
                assert rc == 0, f"the child failed untouched at {syscall} #{n}: rc {rc}"
                break
            cases += 1
            refused: list[str] = []
            sync = _sync(root, key, refused)
            snap = sync.load_active()
            whole = _serves(snap, v1) or _serves(snap, v2)
            again = sync.install(archive) if snap is None or snap.version == 1 else snap
            ok = whole and _serves(again, v2)
            tally.record("crash:sync", "survived" if ok else "lost")
            if not ok:
                failures.append(f"{syscall} #{n}: booted {snap and snap.version}, refused {refused}")
    assert not failures, "\n".join(failures)
    assert cases > 5, "too few crash points: the child did not do what it names"

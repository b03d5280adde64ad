"""Power loss at every step of an update: after a restart the kiosk runs exactly the old or the new pair."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from device.config import UpdateConfig
from device.generations import GenerationStore
from device.generations import close_embedder as _close
from device.sync import Sources
from device.update import Updater
from storelens.protocol import Topics
from storelens.snapshot import verify_snapshot
from tests.device.update.crash_child import CRASHED
from tests.fleet.conftest import Releases
from tests.fleet.helpers import desired

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[3]
CRASH_POINTS = [
    "download",
    "verify",
    "compile",
    "selftest",
    "pointer_tmp",
    "on_switch",
    "switch",
    "probation",
    "done",
]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, releases: Releases) -> tuple[Path, Path]:
    """A kiosk root already running release 10 (the "old" pair), and the pinned public key file."""
    root = tmp_path_factory.mktemp("kiosk-base") / "root"
    pub = root.parent / "pub.pem"
    pub.write_bytes(
        releases.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.device.update.crash_child",
            str(root),
            str(pub),
            desired(releases.good1, "s1", "k1").model_dump_json(),
            "none",
            releases.root.as_uri() + "/",
        ],
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 0
    return root, pub


def _assert_consistent(root: Path, releases: Releases) -> str:
    """Boot a fresh updater on ``root``: the pair it loads is whole, verified, and old or new."""
    p = GenerationStore(root).pointer
    assert p.current is not None
    u = Updater(
        UpdateConfig(state_dir=root),
        Topics("s1", "k1"),
        [releases.key.public_key()],
        transport=None,
        on_switch=lambda e, s: None,
        sources=Sources([releases.root.as_uri() + "/"]),
    )
    loaded = u.boot()
    assert loaded is not None
    try:
        pair = loaded.generation
        assert pair.release in ("rel10", "rel20")
        want = {"rel10": releases.good1, "rel20": releases.good2}[pair.release].manifest
        assert pair.model_id == want.bundle.model_id == loaded.embedder.model_id
        m = verify_snapshot(root / pair.snapshot, [releases.key.public_key()], model_id=pair.model_id)
        assert m.version == want.stores["s1"].version
        loaded.snapshot.check_canaries()
        assert not list((root / "staging").iterdir())  # junk of the cut update removed at boot
        return pair.release
    finally:
        _close(loaded.embedder)


@pytest.mark.parametrize("crash_at", CRASH_POINTS)
def test_crash_at_step_leaves_old_or_new_pair(
    crash_at: str, installed: tuple[Path, Path], releases: Releases, tmp_path: Path
) -> None:
    """A kiosk killed at any step of switching model+snapshot must restart on one whole pair, never a mix."""
    base, pub = installed
    root = tmp_path / "root"
    shutil.copytree(base, root)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.device.update.crash_child",
            str(root),
            str(pub),
            desired(releases.good2, "s1", "k1").model_dump_json(),
            crash_at,
            releases.root.as_uri() + "/",
        ],
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == CRASHED, f"did not reach {crash_at}"
    got = _assert_consistent(root, releases)
    before_commit = crash_at in ("download", "verify", "compile", "selftest", "pointer_tmp")
    assert got == ("rel10" if before_commit else "rel20")


@pytest.mark.parametrize("delay_s", [0.3, 0.9, 1.4, 2.0, 2.6])
def test_sigkill_at_arbitrary_times(
    delay_s: float, installed: tuple[Path, Path], releases: Releases, tmp_path: Path
) -> None:
    """SIGKILL at arbitrary moments of an update must also leave exactly one whole pair."""
    base, pub = installed
    root = tmp_path / "root"
    shutil.copytree(base, root)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.device.update.crash_child",
            str(root),
            str(pub),
            desired(releases.good2, "s1", "k1").model_dump_json(),
            "none",
            releases.root.as_uri() + "/",
        ],
        cwd=REPO,
    )
    try:
        proc.wait(timeout=delay_s)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    _assert_consistent(root, releases)

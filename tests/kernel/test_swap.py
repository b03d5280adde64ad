"""storelens.swap: the states an interrupted build leaves are recovered to old or new, DIR.tar agreeing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from storelens.archive import pack, unpack
from storelens.snapshot import manifest_sha256, read_manifest_unverified
from storelens.swap import install_output, recover_for_reading, recover_output, staging_archive, staging_dir
from tests.device.snapshots import make_snapshot

MODEL = "a" * 64


def _snap(path: Path, version: int) -> Path:
    vecs = np.random.default_rng(version).standard_normal((4, 8)).astype(np.float32)
    return make_snapshot(path, vecs, ["a", "b", "c", "d"], Ed25519PrivateKey.generate(), model_id=MODEL,
                         version=version)


def _tar_version(tar: Path, tmp: Path) -> int:
    unpack(tar, tmp / "x", max_total_bytes=tar.stat().st_size)
    v = read_manifest_unverified(tmp / "x").version
    shutil.rmtree(tmp / "x")
    return v


def test_install_replaces_dir_and_archive_and_leaves_nothing_behind(tmp_path: Path) -> None:
    """Guards: a rebuild leaving .DIR.old / .tmp files, or DIR.tar of the previous version."""
    out = tmp_path / "snap"
    _snap(out, 1)
    pack(out, tmp_path / "snap.tar")
    _snap(staging_dir(out), 2)
    pack(staging_dir(out), staging_archive(out))
    install_output(out, archive=True)
    assert read_manifest_unverified(out).version == 2
    assert _tar_version(tmp_path / "snap.tar", tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".snap.lock", "snap", "snap.tar"]


def test_without_an_archive_an_older_one_is_removed(tmp_path: Path) -> None:
    """Guards: DIR at v2 beside a DIR.tar still at v1 after `--no-archive`."""
    out = tmp_path / "snap"
    _snap(out, 1)
    pack(out, tmp_path / "snap.tar")
    _snap(staging_dir(out), 2)
    install_output(out, archive=False)
    assert read_manifest_unverified(out).version == 2
    assert not (tmp_path / "snap.tar").exists()


def test_a_reader_restores_the_old_snapshot_a_crashed_rebuild_left_aside(tmp_path: Path) -> None:
    """Guards: no DIR at all, the old snapshot only in .DIR.old (the issue's first state)."""
    out = tmp_path / "snap"
    old = _snap(tmp_path / ".snap.old", 1)
    ident = manifest_sha256(old)
    recover_for_reading(tmp_path / "snap.tar")
    assert manifest_sha256(out) == ident and not old.exists()


def test_a_committed_swap_is_finished_by_the_next_reader(tmp_path: Path) -> None:
    """Guards: DIR at the new version beside DIR.tar at the old one (killed between the two renames)."""
    out = tmp_path / "snap"
    _snap(tmp_path / ".snap.old", 1)
    _snap(out, 2)  # already moved into place
    pack(tmp_path / ".snap.old", tmp_path / "snap.tar")  # still the old archive
    shutil.copytree(out, tmp_path / "stage")
    pack(tmp_path / "stage", staging_archive(out))
    (tmp_path / ".snap.swap").write_text(json.dumps({"archive": True}))
    recover_for_reading(out)
    assert read_manifest_unverified(out).version == 2
    assert _tar_version(tmp_path / "snap.tar", tmp_path) == 2
    assert not (tmp_path / ".snap.swap").exists() and not (tmp_path / ".snap.old").exists()


def test_an_uncommitted_build_is_discarded_by_the_next_build_only(tmp_path: Path) -> None:
    """Guards: a reader deleting a build in progress, or a crashed build's staging left forever."""
    out = tmp_path / "snap"
    _snap(out, 1)
    _snap(staging_dir(out), 2)
    (tmp_path / "..snap.partial.tar.abc.tmp").write_bytes(b"half")
    recover_for_reading(out)
    assert staging_dir(out).is_dir(), "a reader leaves a build's staging alone"
    recover_output(out, discard_staged=True)
    assert read_manifest_unverified(out).version == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".snap.lock", "snap"]

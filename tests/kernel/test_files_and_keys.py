"""Atomic writes and Ed25519 signing primitives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from storelens import fsutil, signing


def test_atomic_write_leaves_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards a crash mid-write leaving a truncated file where a good one was."""
    p = tmp_path / "pointer.json"
    fsutil.atomic_write_json(p, {"v": 1})

    def boom(*_a: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        fsutil.atomic_write_json(p, {"v": 2})
    monkeypatch.undo()
    assert p.read_text().strip().replace(" ", "").replace("\n", "") == '{"v":1}'
    assert not list(tmp_path.glob(".*.tmp"))


def test_stale_temps_cleaned(tmp_path: Path) -> None:
    (tmp_path / ".x.json.abc.tmp").write_text("partial")
    assert fsutil.clean_stale_temps(tmp_path) == 1


def test_read_capped(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 11)
    with pytest.raises(ValueError, match="larger than 10"):
        fsutil.read_capped(tmp_path / "f", 10)


def test_sign_verify_and_key_pinning(tmp_path: Path) -> None:
    """Guards accepting a signature from a key the kiosk never pinned."""
    kid = signing.generate_keypair(tmp_path / "a.pem", tmp_path / "a.pub")
    signing.generate_keypair(tmp_path / "b.pem", tmp_path / "b.pub")
    assert (tmp_path / "a.pem").stat().st_mode & 0o777 == 0o600
    a, b = signing.load_private_key(tmp_path / "a.pem"), signing.load_public_key(tmp_path / "b.pub")
    sig = signing.sign(a, b"manifest")
    assert signing.verify([signing.load_public_key(tmp_path / "a.pub")], b"manifest", sig) == kid
    assert signing.verify([b], b"manifest", sig) is None
    assert signing.verify([signing.load_public_key(tmp_path / "a.pub")], b"manifesT", sig) is None
    assert signing.verify([b], b"manifest", b"short") is None
    with pytest.raises(signing.SigningKeyError, match="refusing to overwrite"):
        signing.generate_keypair(tmp_path / "a.pem", tmp_path / "a2.pub")
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(signing.SigningKeyError, match="cannot load"):
        signing.load_private_key(tmp_path / "junk.pem")

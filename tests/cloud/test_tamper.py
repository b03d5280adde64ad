"""Every way a snapshot can be tampered with, mixed up or replayed is refused with its named reason."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.build import BuildSpec, build_snapshot
from storelens.archive import pack, unpack
from storelens.snapshot import (
    RejectReason,
    SnapshotRejected,
    describe_files,
    manifest_sha256,
    read_manifest_unverified,
    verify_snapshot,
    write_signed,
)
from tests.cloud.conftest import CountingEmbedder, make_catalog


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, signing_key: Ed25519PrivateKey) -> dict[str, Path]:
    """Snapshots v1 and v2 by model A and v1 by model B, built once for the module."""
    root = tmp_path_factory.mktemp("tamper")
    cat = make_catalog(root / "cat", n_items=6, per_item=2)
    out = {}
    for name, seed, version in (("a1", 0, 1), ("a2", 0, 2), ("b1", 5, 1)):
        out[name] = build_snapshot(BuildSpec(
            catalog=cat.path,
            store="s1",
            out_dir=root / name,
            private_key=signing_key,
            embedder=CountingEmbedder(seed=seed),
            version=version,
            progress=False,
        )).out_dir
    return out


@pytest.fixture
def snap(built: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(built["a1"], tmp_path / "snap"))


def _refused(directory: Path, key: Ed25519PrivateKey, **kw: object) -> RejectReason:
    with pytest.raises(SnapshotRejected) as exc:
        verify_snapshot(directory, [key.public_key()], **kw)  # type: ignore[arg-type]
    return exc.value.reason


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


def _nested(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\0" * 64)


def _symlinked(snap: Path, path: Path) -> None:
    """Replace ``path`` by a symlink to an identical copy beside the snapshot (same size, same hash)."""
    outside = snap.with_name(f"{snap.name}-{path.name}.outside")
    shutil.copyfile(path, outside)
    path.unlink()
    path.symlink_to(outside)


def test_untouched_snapshot_verifies(snap: Path, signing_key: Ed25519PrivateKey) -> None:
    """Guards the baseline: a fresh build verifies, so every refusal below is caused by the edit."""
    assert verify_snapshot(snap, [signing_key.public_key()]).version == 1


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda d: _flip(d / "manifest.json", 200), RejectReason.BAD_SIGNATURE),
        (lambda d: _flip(d / "manifest.sig", 3), RejectReason.BAD_SIGNATURE),
        (lambda d: (d / "manifest.sig").unlink(), RejectReason.UNSIGNED),
        (lambda d: (d / "manifest.json").unlink(), RejectReason.MISSING_MANIFEST),
        (lambda d: _flip(d / "index.bin", 5000), RejectReason.HASH_MISMATCH),
        (lambda d: _flip(d / "index.bin", -1), RejectReason.HASH_MISMATCH),
        (lambda d: _flip(d / "items.jsonl", 10), RejectReason.HASH_MISMATCH),
        (lambda d: _flip(d / "vectors.jsonl", 30), RejectReason.HASH_MISMATCH),
        (lambda d: _flip(next((d / "thumbs").iterdir()), 100), RejectReason.HASH_MISMATCH),
        (
            lambda d: (d / "index.bin").write_bytes((d / "index.bin").read_bytes()[:-100]),
            RejectReason.SIZE_MISMATCH,
        ),
        (lambda d: (d / "index.bin").write_bytes(b""), RejectReason.SIZE_MISMATCH),
        (lambda d: (d / "items.jsonl").unlink(), RejectReason.MISSING_FILE),
        (lambda d: (d / "extra.bin").write_bytes(b"x"), RejectReason.UNEXPECTED_FILE),
        (lambda d: (d / "thumbs" / "evil.jpg").write_bytes(b"x"), RejectReason.UNEXPECTED_FILE),
        (
            lambda d: (d / "thumbs" / "manifest.json").write_bytes(os.urandom(1 << 20)),
            RejectReason.UNEXPECTED_FILE,
        ),
        (lambda d: (d / "thumbs" / "manifest.sig").write_bytes(b"x" * 64), RejectReason.UNEXPECTED_FILE),
        (lambda d: _nested(d / "thumbs" / "a" / "b" / "index.bin"), RejectReason.UNEXPECTED_FILE),
        (lambda d: (d / "more").symlink_to(d / "thumbs", target_is_directory=True), RejectReason.SYMLINK),
        (lambda d: _symlinked(d, next((d / "thumbs").iterdir())), RejectReason.SYMLINK),
        (lambda d: _symlinked(d, d / "manifest.sig"), RejectReason.SYMLINK),
        (lambda d: os.mkfifo(d / "thumbs" / "fifo"), RejectReason.UNEXPECTED_FILE),
    ],
    ids=[
        "manifest-byte",
        "sig-byte",
        "no-sig",
        "no-manifest",
        "index-byte",
        "index-tail",
        "items-byte",
        "vectors-byte",
        "thumb-byte",
        "index-truncated",
        "index-empty",
        "items-missing",
        "extra-file",
        "extra-thumb",
        "nested-manifest-json",
        "nested-manifest-sig",
        "deeply-nested-index",
        "symlinked-folder",
        "symlinked-listed-file",
        "symlinked-signature",
        "fifo",
    ],
)
def test_tampering_is_refused(
    snap: Path, signing_key: Ed25519PrivateKey, edit: Callable[[Path], object], reason: RejectReason
) -> None:
    """A flipped byte, truncation, missing or extra file anywhere (a nested ``manifest.json`` included),
    a symlink or a fifo must be caught before hnswlib loads."""
    edit(snap)
    assert _refused(snap, signing_key) == reason


def test_resigned_with_another_key_is_refused(snap: Path, signing_key: Ed25519PrivateKey) -> None:
    """A snapshot signed by a key the kiosk does not pin is refused even if internally consistent."""
    write_signed(snap, read_manifest_unverified(snap), Ed25519PrivateKey.generate())
    assert _refused(snap, signing_key) == RejectReason.BAD_SIGNATURE


def test_other_models_snapshot_is_refused(built: dict[str, Path], signing_key: Ed25519PrivateKey) -> None:
    """Model B's snapshot on a kiosk running model A: model mismatch (and dim mismatch for another dim)."""
    model_a = read_manifest_unverified(built["a1"]).model_id
    assert _refused(built["b1"], signing_key, model_id=model_a) == RejectReason.MODEL_MISMATCH
    assert _refused(built["a1"], signing_key, model_dim=64) == RejectReason.DIM_MISMATCH
    assert _refused(built["a1"], signing_key, store="other") == RejectReason.WRONG_STORE


def test_mix_and_match_files_are_refused(
    built: dict[str, Path], tmp_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    """A's signed manifest with B's index (or B's manifest over A's files) fails the per-file hashes."""
    a = Path(shutil.copytree(built["a1"], tmp_path / "a"))
    shutil.copyfile(built["b1"] / "index.bin", a / "index.bin")
    assert _refused(a, signing_key) == RejectReason.HASH_MISMATCH
    a2 = Path(shutil.copytree(built["a1"], tmp_path / "a2"))
    for name in ("manifest.json", "manifest.sig"):
        shutil.copyfile(built["b1"] / name, a2 / name)
    assert _refused(a2, signing_key) == RejectReason.HASH_MISMATCH


def test_replayed_older_version_is_refused(built: dict[str, Path], signing_key: Ed25519PrivateKey) -> None:
    """After v2 was accepted, the validly signed v1 (or another v2) is a replay."""
    seen = (2, manifest_sha256(built["a2"]))
    assert _refused(built["a1"], signing_key, seen=seen) == RejectReason.REPLAY
    assert verify_snapshot(built["a2"], [signing_key.public_key()], seen=seen).version == 2
    assert _refused(built["b1"], signing_key, seen=(1, manifest_sha256(built["a1"]))) == RejectReason.REPLAY


def test_corrupt_index_header_signed_by_the_builder_is_refused(
    snap: Path, signing_key: Ed25519PrivateKey
) -> None:
    """Even a correctly signed index whose header lies (hnswlib#673: count > max_elements) never loads."""
    data = bytearray((snap / "index.bin").read_bytes())
    data[8:16] = (1).to_bytes(8, "little")  # max_elements = 1 < cur_element_count
    (snap / "index.bin").write_bytes(bytes(data))
    m = read_manifest_unverified(snap)
    names = [
        str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file() and not p.name.startswith("manifest")
    ]
    write_signed(snap, m.model_copy(update={"files": describe_files(snap, names)}), signing_key)
    assert _refused(snap, signing_key) == RejectReason.BAD_INDEX


def _tar_with(tmp: Path, name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> Path:
    path = tmp / "evil.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, linkname
        data = b"" if kind != tarfile.REGTYPE else b"payload"
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(
    ("name", "kind", "link", "reason"),
    [
        ("../escape.bin", tarfile.REGTYPE, "", RejectReason.UNSAFE_NAME),
        ("/etc/escape.bin", tarfile.REGTYPE, "", RejectReason.UNSAFE_NAME),
        ("thumbs/../../x", tarfile.REGTYPE, "", RejectReason.UNSAFE_NAME),
        ("a/b/c.bin", tarfile.REGTYPE, "", RejectReason.UNSAFE_NAME),
        ("link", tarfile.SYMTYPE, "/etc/passwd", RejectReason.BAD_ARCHIVE),
        ("hard", tarfile.LNKTYPE, "../../x", RejectReason.BAD_ARCHIVE),
        ("dev", tarfile.CHRTYPE, "", RejectReason.BAD_ARCHIVE),
    ],
)
def test_unsafe_archive_members_are_refused(
    tmp_path: Path, name: str, kind: bytes, link: str, reason: RejectReason
) -> None:
    """Transport archives with escaping names, links or device nodes write nothing and name the reason."""
    archive = _tar_with(tmp_path, name, kind, link)
    with pytest.raises(SnapshotRejected) as exc:
        unpack(archive, tmp_path / "out", max_total_bytes=1 << 20)
    assert exc.value.reason == reason
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "escape.bin").exists()


def test_archive_round_trip_and_truncation(
    snap: Path, tmp_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    """The archive of a snapshot verifies after unpacking; a truncated archive never yields a snapshot
    that verifies with content missing (cutting only tar's zero padding leaves the content whole)."""
    pack(snap, tmp_path / "s.tar")
    unpack(tmp_path / "s.tar", tmp_path / "u", max_total_bytes=1 << 30)
    assert verify_snapshot(tmp_path / "u", [signing_key.public_key()]).version == 1
    data = (tmp_path / "s.tar").read_bytes()
    content_end = len(data.rstrip(b"\0"))
    outcomes = set()
    for i, cut in enumerate(range(0, len(data), max(1, len(data) // 40))):
        (tmp_path / f"t{i}.tar").write_bytes(data[:cut])
        try:
            unpack(tmp_path / f"t{i}.tar", tmp_path / f"t{i}", max_total_bytes=1 << 30)
            verify_snapshot(tmp_path / f"t{i}", [signing_key.public_key()])
        except SnapshotRejected as exc:
            outcomes.add(exc.reason)
            continue
        assert cut >= content_end, f"archive cut at {cut} of {len(data)} still verified"
    assert outcomes <= {
        RejectReason.BAD_ARCHIVE,
        RejectReason.MISSING_FILE,
        RejectReason.MISSING_MANIFEST,
        RejectReason.UNSIGNED,
        RejectReason.SIZE_MISMATCH,
        RejectReason.HASH_MISMATCH,
    }

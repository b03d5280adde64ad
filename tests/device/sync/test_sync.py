"""Snapshot sync: install, persist, refuse bad snapshots by name, survive crashes, never stop serving."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import logging
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device.generations.switcher import switch_snapshot
from device.sync import ActiveSnapshot, SnapshotRefused, SnapshotStore, SnapshotSync, Sources
from device.sync.service import MAX_BYTES
from storelens.archive import pack
from storelens.protocol import SnapshotAnnouncement
from storelens.snapshot import read_manifest_unverified, write_signed
from tests.device.sync.snapbuild import MODEL_DIM, MODEL_ID, Built, archive, build_snapshot


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


class Harness:
    def __init__(self, root: Path, key: Ed25519PrivateKey, sources: list[str] | None = None) -> None:
        self.swaps: list[ActiveSnapshot] = []
        self.refused: list[tuple[str, str]] = []
        self.store = SnapshotStore(root)
        self.sync = SnapshotSync(
            self.store,
            [key.public_key()],
            store_id="store1",
            model_id=MODEL_ID,
            model_dim=MODEL_DIM,
            switch=lambda c: switch_snapshot(c, self.swaps.append),
            on_refused=lambda r, d: self.refused.append((r, d)),
            sources=Sources(sources if sources is not None else [root.parent.as_uri() + "/"]),
            download_timeout_s=10,
        )

    @property
    def reasons(self) -> list[str]:
        return [r for r, _ in self.refused]


def _top1(snap: ActiveSnapshot, built: Built, i: int) -> str:
    return snap.search(built.vectors[i : i + 1], 3)[0][0].sku


def test_install_swaps_persists_and_reloads(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """Guards: an installed snapshot not surviving a restart (pointer not persisted) or not searchable."""
    built = build_snapshot(tmp_path / "src", key, version=1)
    h = Harness(tmp_path / "root", key)
    snap = h.sync.install(archive(built, tmp_path / "v1.tar"))
    assert h.swaps == [snap] and snap.version == 1 and snap.index.ef == 50
    assert all(_top1(snap, built, i) == built.skus[i] for i in range(len(built.skus)))
    hits = snap.search(built.vectors[:2], 5)
    assert len(hits) == 2 and len(hits[0]) == 5 and hits[0][0].score == pytest.approx(1.0, abs=1e-4)
    assert (
        hits[0][0].thumbnail is not None
        and hits[0][0].thumbnail.is_file()
        and hits[0][0].thumbnail.is_absolute()
    )
    assert snap.items()["sku-001"].thumbnail is None and snap.items()["sku-001"].price == "1.99"
    again = Harness(tmp_path / "root", key)
    loaded = again.sync.load_active()
    assert loaded is not None and loaded.version == 1 and loaded.manifest == snap.manifest
    assert again.store.highest_seen == (1, built.manifest_sha256)


def test_projection_is_applied_to_queries(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """Guards: model-space queries searched in a projected index without the projection."""
    built = build_snapshot(tmp_path / "src", key, version=1, projection_dim=8)
    h = Harness(tmp_path / "root", key)
    snap = h.sync.install(built.directory)
    assert snap.index.dim == 8
    right = sum(_top1(snap, built, i) == built.skus[i] for i in range(len(built.skus)))
    assert right == len(built.skus)


def _forged(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    d = build_snapshot(tmp_path / "bad", key, version=5).directory
    write_signed(d, read_manifest_unverified(d), Ed25519PrivateKey.generate())
    return d


def _truncated(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    d = build_snapshot(tmp_path / "bad", key, version=5).directory
    data = (d / "index.bin").read_bytes()
    (d / "index.bin").write_bytes(data[: len(data) // 2])
    return d


def _tampered(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    d = build_snapshot(tmp_path / "bad", key, version=5).directory
    (d / "items.jsonl").write_text((d / "items.jsonl").read_text().replace("Item 1", "Item X"))
    return d


CASES: dict[str, Callable[[Path, Ed25519PrivateKey], Path]] = {
    "bad_signature": _forged,
    "size_mismatch": _truncated,
    "hash_mismatch": _tampered,
    "model_mismatch": lambda p, k: (
        build_snapshot(p / "bad", k, version=5, model_id=hashlib.sha256(b"other").hexdigest()).directory
    ),
    "wrong_store": lambda p, k: build_snapshot(p / "bad", k, version=5, store="store2").directory,
    "version_replay": lambda p, k: build_snapshot(p / "bad", k, version=1, seed=7).directory,
    "canary_failed": lambda p, k: build_snapshot(p / "bad", k, version=5, wrong_canary=True).directory,
}


@pytest.mark.parametrize("reason", sorted(CASES))
def test_bad_snapshots_are_refused_and_the_active_keeps_serving(
    tmp_path: Path, key: Ed25519PrivateKey, reason: str
) -> None:
    """Guards: a forged/truncated/foreign/replayed/broken snapshot replacing a good one."""
    good = build_snapshot(tmp_path / "good", key, version=2)
    h = Harness(tmp_path / "root", key)
    h.sync.install(good.directory)
    bad = CASES[reason](tmp_path, key)
    with pytest.raises(SnapshotRefused) as info:
        h.sync.install(archive_or_dir := bad)
    assert info.value.reason == reason, info.value.detail
    assert archive_or_dir.exists()
    assert h.sync.active is not None and h.sync.active.version == 2 and len(h.swaps) == 1
    assert _top1(h.sync.active, good, 3) == good.skus[3]
    assert h.store.highest_seen == (2, good.manifest_sha256)
    assert sorted(p.name for p in h.store.snapshots.iterdir()) == [f"v2-{good.manifest_sha256[:12]}"]
    assert not any(h.store.staging.iterdir())


def _nested_manifest(d: Path) -> None:
    (d / "thumbs" / "manifest.json").write_bytes(np.random.default_rng(0).bytes(1 << 20))


def _symlinked_folder(d: Path) -> None:
    (d / "pics").symlink_to(d / "thumbs", target_is_directory=True)


@pytest.mark.parametrize(
    ("edit", "reason"), [(_nested_manifest, "unexpected_file"), (_symlinked_folder, "symlink")]
)
def test_unlisted_nested_file_or_symlink_is_refused_on_install_and_at_boot(
    tmp_path: Path, key: Ed25519PrivateKey, edit: Callable[[Path], None], reason: str
) -> None:
    """Guards: a kiosk installing a snapshot that carries an unlisted ``thumbs/manifest.json`` (files named
    like the manifest were skipped at any depth) or a symlinked folder, as a folder or an archive, and
    trusting a stored generation edited that way after a restart."""
    v1 = build_snapshot(tmp_path / "a", key, version=1)
    v2 = build_snapshot(tmp_path / "b", key, version=2, seed=3)
    root = tmp_path / "root"
    h = Harness(root, key)
    h.sync.install(v1.directory)
    bad = build_snapshot(tmp_path / "bad", key, version=3, seed=5)
    edit(bad.directory)
    sources = [bad.directory]
    if reason != "symlink":  # an archive cannot carry a symlink: pack refuses to follow one
        sources.append(archive(bad, tmp_path / "bad.tar"))
    for source in sources:
        with pytest.raises(SnapshotRefused) as info:
            h.sync.install(source)
        assert info.value.reason == reason, (source, info.value.detail)
    assert h.sync.active is not None and h.sync.active.version == 1 and len(h.swaps) == 1
    assert h.store.highest_seen == (1, v1.manifest_sha256)
    h.sync.install(v2.directory)
    edit(root / "snapshots" / f"v2-{v2.manifest_sha256[:12]}")
    again = Harness(root, key)
    snap = again.sync.load_active()
    assert again.reasons == [reason], again.refused
    assert snap is not None and snap.version == 1 and _top1(snap, v1, 3) == v1.skus[3]


def test_crash_leftovers_are_ignored_and_cleaned(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """Guards: half-written dirs from a power cut being loaded, or piling up on disk."""
    built = build_snapshot(tmp_path / "src", key, version=1)
    root = tmp_path / "root"
    Harness(root, key).sync.install(built.directory)
    (root / "staging" / "install-0").mkdir()
    (root / "staging" / "install-0" / "index.bin").write_bytes(b"half")
    (root / "downloads" / "v9.tar.partial").write_bytes(b"half")
    (root / "snapshots" / ".v9-abc.partial").mkdir()
    (root / "snapshots" / "v9-deadbeef0000").mkdir()  # renamed in, pointer never written
    (root / ".active.json.x1.tmp").write_text("{")
    h = Harness(root, key)
    snap = h.sync.load_active()
    assert snap is not None and snap.version == 1
    assert list((root / "staging").iterdir()) == [] and list((root / "downloads").iterdir()) == []
    assert [p.name for p in (root / "snapshots").iterdir()] == [f"v1-{built.manifest_sha256[:12]}"]
    assert not list(root.glob(".*.tmp"))


def test_broken_active_falls_back_to_previous(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """Guards: a kiosk with no catalog after its active snapshot was damaged on disk."""
    v1 = build_snapshot(tmp_path / "a", key, version=1)
    v2 = build_snapshot(tmp_path / "b", key, version=2, seed=3)
    root = tmp_path / "root"
    h = Harness(root, key)
    h.sync.install(v1.directory)
    h.sync.install(v2.directory)
    (root / "snapshots" / f"v2-{v2.manifest_sha256[:12]}" / "index.bin").write_bytes(b"\0" * 10)
    again = Harness(root, key)
    snap = again.sync.load_active()
    assert snap is not None and snap.version == 1
    assert again.reasons == ["size_mismatch"]
    assert again.store.pointer.active == f"v1-{v1.manifest_sha256[:12]}"
    assert again.store.highest_seen == (2, v2.manifest_sha256), "rollback keeps replay protection"


def test_rollback_swaps_back(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """Guards: no way back to the previous generation after a bad probation."""
    v1 = build_snapshot(tmp_path / "a", key, version=1)
    v2 = build_snapshot(tmp_path / "b", key, version=2, seed=3)
    h = Harness(tmp_path / "root", key)
    h.sync.install(v1.directory)
    h.sync.install(v2.directory)
    snap = h.sync.rollback()
    assert snap.version == 1 and h.swaps[-1] is snap and h.sync.active is snap


# ---- announcements through the worker thread ----


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined, assignment]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, name="test-http", daemon=True)
    t.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    t.join(5)


def _announce(built: Built, tar: Path, url: str, **over: object) -> bytes:
    fields: dict[str, object] = dict(
        store="store1",
        version=read_manifest_unverified(built.directory).version,
        model_id=MODEL_ID,
        manifest_sha256=built.manifest_sha256,
        size=tar.stat().st_size,
        sha256=hashlib.sha256(tar.read_bytes()).hexdigest(),
        url=url,
    )
    fields.update(over)
    return SnapshotAnnouncement(**fields).to_bytes()  # type: ignore[arg-type]


def test_announcements_install_over_http_and_file(
    tmp_path: Path, key: Ed25519PrivateKey, http_dir: tuple[Path, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Guards: announcements not installing; retained re-delivery reinstalling; bad bytes accepted."""
    caplog.set_level(logging.INFO, logger="device.sync")
    www, base = http_dir
    v1 = build_snapshot(tmp_path / "a", key, version=1)
    v2 = build_snapshot(tmp_path / "b", key, version=2, seed=3)
    tar1, tar2 = archive(v1, www / "v1.tar"), archive(v2, www / "v2.tar")
    h = Harness(tmp_path / "root", key, [f"{base}/", tmp_path.as_uri() + "/"])
    h.sync.start()
    try:
        h.sync.on_announcement("t", _announce(v1, tar1, f"{base}/v1.tar?X-Amz-Signature=secret"), True)
        assert h.sync.idle.wait(10)
        assert [s.version for s in h.swaps] == [1], h.refused
        h.sync.on_announcement("t", _announce(v1, tar1, f"{base}/v1.tar"), True)  # retained, after reconnect
        h.sync.on_announcement("t", _announce(v2, tar2, f"{base}/v2.tar", sha256="0" * 64), False)
        assert h.sync.idle.wait(10)
        h.sync.on_announcement("t", _announce(v2, tar2, f"{base}/missing.tar", version=3), False)
        assert h.sync.idle.wait(10)
        h.sync.on_announcement("t", _announce(v2, tar2, tar2.as_uri(), size=100), False)
        assert h.sync.idle.wait(10)
        h.sync.on_announcement("t", _announce(v2, tar2, tar2.as_uri()), False)
        assert h.sync.idle.wait(10)
    finally:
        h.sync.stop()
    assert [s.version for s in h.swaps] == [1, 2]
    assert h.reasons == ["hash_mismatch", "download_failed", "too_large"], h.refused
    assert all("secret" not in d for _, d in h.refused)
    assert "secret" not in caplog.text and "<redacted>" in caplog.text
    assert list(h.store.downloads.iterdir()) == []


MALFORMED = {
    "not_json": b"{nope",
    "not_utf8": b"\xff\xfe\x00",
    "array": b"[1,2,3]",
    "wrong_type": b'{"type":"status"}',
    "wrong_types": b'{"type":"snapshot","store":"store1","version":"x","model_id":1,"manifest_sha256":null,'
    b'"size":-1,"sha256":"","url":3}',
    "huge": b'{"type":"snapshot","pad":"' + b"x" * 200_000 + b'"}',
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "empty": b"",
}


def test_malformed_announcements_are_refused_without_crashing(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """Guards: a hostile retained message killing the sync worker or the MQTT thread."""
    built = build_snapshot(tmp_path / "src", key, version=1)
    h = Harness(tmp_path / "root", key)
    h.sync.install(built.directory)
    h.sync.start()
    try:
        for payload in MALFORMED.values():
            h.sync.on_announcement("t", payload, True)
            assert h.sync.idle.wait(10)
        tar = archive(built, tmp_path / "a.tar")
        for bad in (
            _announce(built, tar, "ftp://x/y", version=9),
            _announce(built, tar, (tmp_path / "x").as_uri(), version=10, kind="delta", base_version=7),
            _announce(built, tar, (tmp_path / "x").as_uri(), version=11, store="store2"),
            _announce(built, tar, (tmp_path / "x").as_uri(), version=12, model_id="f" * 64),
            _announce(built, tar, (tmp_path / "nonexistent").as_uri(), version=13),
        ):
            h.sync.on_announcement("t", bad, False)
            assert h.sync.idle.wait(10)
    finally:
        h.sync.stop()
    assert h.reasons[: len(MALFORMED)] == ["bad_announcement"] * len(MALFORMED)
    assert h.reasons[len(MALFORMED) :] == [
        "source_not_allowed",
        "delta_base_mismatch",
        "wrong_store",
        "model_mismatch",
        "download_failed",
    ]
    assert h.sync.active is not None and h.sync.active.version == 1
    assert h.sync.active.search(np.asarray(built.vectors[:1]), 1)[0][0].sku == built.skus[0]


def test_announcement_fields_must_match_the_signed_manifest(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """Guards: an announcement's own fields trusted beside the signed manifest (a version of 2**80 or 3
    installing the signed v2, an unknown schema v=99 accepted)."""
    v1 = build_snapshot(tmp_path / "a", key, version=1)
    v2 = build_snapshot(tmp_path / "b", key, version=2, seed=3)
    tar2 = archive(v2, tmp_path / "v2.tar")
    h = Harness(tmp_path / "root", key)
    h.sync.install(v1.directory)
    url = tar2.as_uri()

    def mutated(**over: object) -> bytes:
        return json.dumps({**json.loads(_announce(v2, tar2, url)), **over}).encode()

    for payload in (mutated(version=2**80), mutated(version=3), mutated(v=99)):
        assert h.sync.handle_announcement(payload) is None
    assert h.reasons == ["bad_announcement", "announcement_mismatch", "unsupported_schema"], h.refused
    assert h.sync.active is not None and h.sync.active.version == 1
    snap = h.sync.handle_announcement(_announce(v2, tar2, url))
    assert snap is not None and snap.version == 2, h.refused


def test_a_refused_delivery_blocks_only_itself_not_the_genuine_snapshot(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    """Guards: after a tampered v10 (or a message about v10 with a bad field) was refused, the genuine v10
    ignored until a restart (refusals remembered by version), and a refused delivery raising the replay
    protection (``highest_seen``), on disk or in memory."""
    v9 = build_snapshot(tmp_path / "v9", key, version=9)
    v10 = build_snapshot(tmp_path / "v10", key, version=10, seed=3)
    good = archive(v10, tmp_path / "good.tar")
    tampered = Path(shutil.copytree(v10.directory, tmp_path / "tampered"))
    thumb = tampered / "thumbs" / "sku-000.jpg"
    thumb.write_bytes(thumb.read_bytes()[::-1])  # same size, other bytes; the signed manifest is genuine
    bad = tmp_path / "bad.tar"
    pack(tampered, bad)
    root = tmp_path / "root"
    h = Harness(root, key)
    h.sync.install(v9.directory)
    too_large = _announce(v10, good, good.as_uri(), size=MAX_BYTES + 1)
    forged = _announce(v10, bad, bad.as_uri())
    for payload in (too_large, forged, forged):  # the last: the retained message again after a reconnect
        assert h.sync.handle_announcement(payload) is None
    assert h.reasons == ["too_large", "hash_mismatch"], h.refused
    assert h.store.highest_seen == (9, v9.manifest_sha256)
    assert SnapshotStore(root).highest_seen == (9, v9.manifest_sha256), "a refusal moved replay protection"
    same_bytes = Path(shutil.copyfile(bad, tmp_path / "bad-again.tar"))  # new message, same bad archive
    assert h.sync.handle_announcement(_announce(v10, same_bytes, same_bytes.as_uri())) is None
    assert h.reasons == ["too_large", "hash_mismatch"], "the same bad bytes were fetched and judged again"
    snap = h.sync.handle_announcement(_announce(v10, good, good.as_uri()))
    assert snap is not None and snap.version == 10, h.refused
    assert [s.version for s in h.swaps] == [9, 10] and _top1(snap, v10, 5) == v10.skus[5]
    assert h.store.highest_seen == (10, v10.manifest_sha256)

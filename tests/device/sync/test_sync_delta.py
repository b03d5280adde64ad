"""Delta snapshots on the kiosk: applied off the hot path, refused by name, trusted again at boot."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device.generations.switcher import switch_snapshot
from device.sync import ActiveSnapshot, SnapshotRefused, SnapshotStore, SnapshotSync, Sources
from device.sync import chain as chain_mod
from storelens.fsutil import sha256_file
from storelens.snapshot import manifest_sha256, read_manifest_unverified, write_signed
from tests.device.sync.deltabuild import Chain, announce, archive, build_chain

Answers = list[list[tuple[str, float]]]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    return build_chain(tmp_path_factory.mktemp("chain"), Ed25519PrivateKey.generate())


class Producer(Protocol):
    """Who signs the snapshots and with which model they were built (a Chain is one)."""

    @property
    def key(self) -> Ed25519PrivateKey: ...
    @property
    def model_id(self) -> str: ...
    @property
    def model_dim(self) -> int: ...


class Kiosk:
    """One kiosk's snapshot sync on ``root``: what it swapped in and what it refused."""

    def __init__(self, root: Path, chain: Producer) -> None:
        self.swaps: list[ActiveSnapshot] = []
        self.refused: list[tuple[str, str]] = []
        self.store = SnapshotStore(root)
        self.sync = SnapshotSync(
            self.store,
            [chain.key.public_key()],
            store_id="s1",
            model_id=chain.model_id,
            model_dim=chain.model_dim,
            switch=lambda c: switch_snapshot(c, self.swaps.append),
            on_refused=lambda r, d: self.refused.append((r, d)),
            sources=Sources([root.parent.as_uri() + "/"]),
        )

    @property
    def reasons(self) -> list[str]:
        return [r for r, _ in self.refused]

    @property
    def active(self) -> ActiveSnapshot:
        snap = self.sync.active
        assert snap is not None
        return snap

    def active_dir(self) -> Path:
        name = self.store.pointer.active
        assert name is not None
        return self.store.path(name)


def _answers(snap: ActiveSnapshot, queries: np.ndarray) -> Answers:
    return [[(h.sku, round(h.score, 5)) for h in row] for row in snap.search(queries, 5)]


def _catalog(snap: ActiveSnapshot) -> dict[str, tuple[str, str | None, str | None, bytes | None]]:
    return {
        sku: (it.title, it.price, it.location, it.thumbnail.read_bytes() if it.thumbnail else None)
        for sku, it in snap.items().items()
    }


def _full(tmp_path: Path, chain: Chain, snapshot: Path) -> ActiveSnapshot:
    return Kiosk(tmp_path / f"full-{snapshot.name}", chain).sync.install(snapshot)


def _tree_hashes(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file()}


def test_deltas_applied_on_the_kiosk_answer_like_full_rebuilds(tmp_path: Path, chain: Chain) -> None:
    """Guards: a kiosk on v1 + d2 + d3 answering differently (items, scores, prices, thumbnails) from a
    kiosk given the full rebuilds, or the active generation being modified while a delta is applied."""
    k = Kiosk(tmp_path / "root", chain)
    k.sync.install(archive(chain.v1, tmp_path / "v1.tar"))
    v1_dir = k.active_dir()
    v1_files = _tree_hashes(v1_dir)
    snap2 = k.sync.install(archive(chain.d2, tmp_path / "d2.tar"))
    assert k.refused == [] and [s.version for s in k.swaps] == [1, 2] and k.sync.active is snap2
    assert _tree_hashes(v1_dir) == v1_files, "the active generation was modified by the apply"
    full2 = _full(tmp_path, chain, chain.full2)
    assert _answers(snap2, chain.queries) == _answers(full2, chain.queries)
    assert _catalog(snap2) == _catalog(full2)
    assert "SKU-005" not in snap2.items() and snap2.items()["SKU-007"].price == "9.99"
    assert k.store.highest_seen == (2, manifest_sha256(chain.d2))
    snap3 = k.sync.install(chain.d3)  # a directory works like an archive
    full3 = _full(tmp_path, chain, chain.full3)
    assert _answers(snap3, chain.queries) == _answers(full3, chain.queries)
    assert _catalog(snap3) == _catalog(full3)
    proof = k.active_dir() / "proof"
    assert sorted(p.name for p in proof.iterdir()) == ["root", "v2", "v3"]
    assert manifest_sha256(proof / "root") == manifest_sha256(chain.v1)
    assert not any(k.store.staging.iterdir()) and not any(k.store.downloads.iterdir())


def test_restart_after_deltas_comes_back_with_the_applied_snapshot(tmp_path: Path, chain: Chain) -> None:
    """Guards: an applied delta lost on restart (unsigned manifest refused at boot), and rollbacks across
    applied and full generations."""
    root = tmp_path / "root"
    k = Kiosk(root, chain)
    k.sync.install(chain.v1)
    k.sync.install(chain.d2)
    before = _answers(k.sync.install(chain.d3), chain.queries)
    again = Kiosk(root, chain)
    snap = again.sync.load_active()
    assert snap is not None and snap.version == 3 and again.reasons == []
    assert _answers(snap, chain.queries) == before
    assert again.store.highest_seen == (3, manifest_sha256(chain.d3))
    back = again.sync.rollback()  # v3 -> v2 (applied too: re-derived from its own proof)
    assert back.version == 2 and again.reasons == []
    assert Kiosk(root, chain).sync.load_active() is not None


def test_delta_on_another_base_is_refused_and_the_old_snapshot_keeps_serving(
    tmp_path: Path, chain: Chain
) -> None:
    """Guards: a delta applied onto a snapshot it was not built against (same version, other content),
    or onto nothing; both refused by name while the served snapshot stays."""
    k = Kiosk(tmp_path / "root", chain)
    with pytest.raises(SnapshotRefused) as exc:
        k.sync.install(chain.d2)
    assert exc.value.reason == "delta_base_mismatch"
    served = k.sync.install(chain.other1)
    answers = _answers(served, chain.queries)
    for delta in (chain.d2, chain.d3):
        with pytest.raises(SnapshotRefused) as exc:
            k.sync.install(delta)
        assert exc.value.reason == "delta_base_mismatch", exc.value.detail
    assert k.sync.active is served and _answers(k.active, chain.queries) == answers
    assert [p.name for p in k.store.snapshots.iterdir()] == [k.store.pointer.active]
    assert not any(k.store.staging.iterdir())


def test_announced_delta_with_a_gap_falls_back_to_the_full_snapshot(tmp_path: Path, chain: Chain) -> None:
    """Guards: a kiosk that missed d2 stuck on v1 forever, or downloading a delta it cannot use."""
    www = tmp_path / "www"
    www.mkdir()
    tars = {p.name: archive(p, www / f"{p.name}.tar") for p in (chain.v1, chain.d2, chain.d3, chain.full3)}
    k = Kiosk(tmp_path / "root", chain)
    k.sync.install(chain.v1)
    bare = announce(chain.d3, tars["d3"])
    assert k.sync.handle_announcement(bare) is None  # no full named: stay
    assert k.reasons == ["delta_base_mismatch"] and k.active.version == 1
    assert k.sync.handle_announcement(bare) is None  # the retained message again, after a reconnect
    assert k.reasons == ["delta_base_mismatch"], "a message refused once is not retried per re-delivery"
    snap = k.sync.handle_announcement(announce(chain.d3, tars["d3"], full=(chain.full3, tars["full3"])))
    assert snap is not None and snap.version == 3, "a new message naming the full snapshot was ignored"
    k2 = Kiosk(tmp_path / "root2", chain)
    k2.sync.install(chain.v1)
    snap = k2.sync.handle_announcement(announce(chain.d3, tars["d3"], full=(chain.full3, tars["full3"])))
    assert snap is not None and snap.version == 3 and k2.reasons == ["delta_base_mismatch"]
    assert k2.store.highest_seen == (3, manifest_sha256(chain.full3))
    assert k2.sync.handle_announcement(announce(chain.d2, tars["d2"])) is None  # older than v3
    assert k2.reasons[-1] == "version_replay" and k2.active.version == 3
    k3 = Kiosk(tmp_path / "root3", chain)  # the happy path: the announced delta goes onto the active
    k3.sync.install(chain.v1)
    snap = k3.sync.handle_announcement(announce(chain.d2, tars["d2"], full=(chain.full3, tars["full3"])))
    assert snap is not None and snap.version == 2 and k3.reasons == []
    assert not any(k3.store.downloads.iterdir())


def test_chain_past_the_limit_is_refused_and_falls_back(
    tmp_path: Path, chain: Chain, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards: boot work growing without bound with the chain; the full snapshot takes over."""
    monkeypatch.setattr(chain_mod, "MAX_CHAIN_DELTAS", 1)
    www = tmp_path / "www"
    www.mkdir()
    d3, full3 = archive(chain.d3, www / "d3.tar"), archive(chain.full3, www / "full3.tar")
    k = Kiosk(tmp_path / "root", chain)
    k.sync.install(chain.v1)
    k.sync.install(chain.d2)
    snap = k.sync.handle_announcement(announce(chain.d3, d3, full=(chain.full3, full3)))
    assert k.reasons == ["delta_chain_too_long"]
    assert snap is not None and snap.version == 3 and snap.manifest == read_manifest_unverified(chain.full3)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


def _resigned(tmp_path: Path, chain: Chain) -> Path:
    d = Path(shutil.copytree(chain.d2, tmp_path / "resigned"))
    write_signed(d, read_manifest_unverified(d), Ed25519PrivateKey.generate())
    return d


def _flipped(tmp_path: Path, chain: Chain) -> Path:
    d = Path(shutil.copytree(chain.d2, tmp_path / "flipped"))
    _flip(d / "added.f32", 7)
    return d


def _flipped_and_resigned(tmp_path: Path, chain: Chain) -> Path:
    d = _flipped(tmp_path, chain)
    m = read_manifest_unverified(d)
    files = dict(m.files)
    files["added.f32"] = files["added.f32"].model_copy(update={"sha256": sha256_file(d / "added.f32")})
    write_signed(d, m.model_copy(update={"files": files}), Ed25519PrivateKey.generate())
    return d


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_flipped, "hash_mismatch"),
        (_resigned, "bad_signature"),
        (_flipped_and_resigned, "bad_signature"),
    ],
)
def test_tampered_delta_is_refused(
    tmp_path: Path, chain: Chain, make: Callable[[Path, Chain], Path], reason: str
) -> None:
    """Guards: a delta with a flipped byte, or re-signed with a key the kiosk does not pin, applied."""
    k = Kiosk(tmp_path / "root", chain)
    served = k.sync.install(chain.v1)
    answers = _answers(served, chain.queries)
    with pytest.raises(SnapshotRefused) as exc:
        k.sync.install(archive(make(tmp_path, chain), tmp_path / "bad.tar"))
    assert exc.value.reason == reason, exc.value.detail
    assert k.sync.active is served and k.swaps == [served]
    assert _answers(k.active, chain.queries) == answers
    assert k.store.highest_seen == (1, manifest_sha256(chain.v1))


def _index_byte(gen: Path) -> None:
    _flip(gen / "index.bin", (gen / "index.bin").stat().st_size // 2)


def _price(gen: Path) -> None:
    (gen / "items.jsonl").write_text((gen / "items.jsonl").read_text().replace('"9.99"', '"0.99"'))


def _thumb(gen: Path) -> None:
    _flip(next((gen / "thumbs").iterdir()), 100)


def _extra_file(gen: Path) -> None:
    (gen / "thumbs" / "evil.jpg").write_bytes(b"\xff\xd8")


def _proof_delta(gen: Path) -> None:
    _flip(gen / "proof" / "v2" / "added.f32", 3)


def _proof_root(gen: Path) -> None:
    shutil.rmtree(gen / "proof" / "root")


def _no_proof(gen: Path) -> None:
    shutil.rmtree(gen / "proof")


def _nested_manifest(gen: Path) -> None:
    (gen / "thumbs" / "manifest.json").write_bytes(b"{}" * 1000)


def _proof_nested_manifest(gen: Path) -> None:
    (gen / "proof" / "root" / "thumbs" / "manifest.json").write_bytes(b"{}" * 1000)


def _proof_extra(gen: Path) -> None:
    (gen / "proof" / "v2" / "extra.bin").write_bytes(b"x")


def _symlinked_folder(gen: Path) -> None:
    (gen / "pics").symlink_to(gen / "thumbs", target_is_directory=True)


def _proof_root_symlink(gen: Path) -> None:
    root = gen / "proof" / "root"
    root.rename(gen.with_name("elsewhere"))
    root.symlink_to(gen.with_name("elsewhere"), target_is_directory=True)


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (_index_byte, "applied_mismatch"),
        (_price, "applied_mismatch"),
        (_thumb, "applied_mismatch"),
        (_extra_file, "applied_mismatch"),
        (_proof_delta, "hash_mismatch"),
        (_proof_root, "chain_broken"),
        (_no_proof, "unsigned"),
        (_nested_manifest, "applied_mismatch"),
        (_proof_nested_manifest, "unexpected_file"),
        (_proof_extra, "unexpected_file"),
        (_symlinked_folder, "symlink"),
        (_proof_root_symlink, "symlink"),
    ],
)
def test_applied_directory_tampered_on_disk_is_refused_at_boot(
    tmp_path: Path, chain: Chain, tamper: Callable[[Path], None], reason: str
) -> None:
    """Guards: trusting an applied (unsigned) directory edited on disk: its index, rows, thumbnails or
    proof (an unlisted nested ``manifest.json`` in it, a symlink anywhere); the kiosk must name the reason
    and serve the previous good snapshot."""
    root = tmp_path / "root"
    k = Kiosk(root, chain)
    v1 = _answers(k.sync.install(chain.v1), chain.queries)
    k.sync.install(chain.d2)
    tamper(k.active_dir())
    again = Kiosk(root, chain)
    snap = again.sync.load_active()
    assert again.reasons == [reason], again.refused
    assert snap is not None and snap.version == 1 and _answers(snap, chain.queries) == v1
    assert again.store.pointer.active is not None and again.store.pointer.active.startswith("v1-")
    assert again.store.highest_seen == (2, manifest_sha256(chain.d2)), "rollback keeps replay protection"
    assert not any(again.store.staging.iterdir())


def test_tampered_active_is_not_built_upon(tmp_path: Path, chain: Chain) -> None:
    """Guards: the next delta applied onto an applied generation edited since it was installed."""
    k = Kiosk(tmp_path / "root", chain)
    k.sync.install(chain.v1)
    served = k.sync.install(chain.d2)
    _index_byte(k.active_dir())
    with pytest.raises(SnapshotRefused) as exc:
        k.sync.install(chain.d3)
    assert exc.value.reason == "applied_mismatch"
    assert k.sync.active is served


def test_delta_with_a_projection_installs_and_passes_its_canaries(tmp_path: Path) -> None:
    """Guards: an applied delta losing its base's projection (canaries fail, search in the wrong space)."""
    lda = build_chain(tmp_path / "lda", Ed25519PrivateKey.generate(), adapter="lda")
    m1 = read_manifest_unverified(lda.v1)
    assert m1.projection is not None
    k = Kiosk(tmp_path / "root", lda)
    k.sync.install(lda.v1)
    snap = k.sync.install(lda.d2)
    assert snap.version == 2 and snap.manifest.projection == m1.projection and k.refused == []
    assert (k.active_dir() / m1.projection.file).read_bytes() == (lda.v1 / m1.projection.file).read_bytes()
    again = Kiosk(tmp_path / "root", lda).sync.load_active()
    assert again is not None and again.version == 2


def test_only_the_newest_link_of_a_chain_may_expire(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards: an applied snapshot refused at boot because its (superseded) root full snapshot expired,
    while the delta the kiosk serves is still valid."""
    from datetime import UTC, datetime, timedelta

    from cloud.build import BuildSpec, build_snapshot
    from storelens import snapshot as snapshot_mod
    from tests.cloud.conftest import CountingEmbedder, make_catalog

    key = Ed25519PrivateKey.generate()
    cat = make_catalog(tmp_path / "cat")
    emb = CountingEmbedder()
    v1 = build_snapshot(BuildSpec(catalog=cat.path, store="s1", out_dir=tmp_path / "v1", private_key=key,
                                  embedder=emb, progress=False)).out_dir
    soon = (datetime.now(UTC) + timedelta(days=1)).isoformat(timespec="seconds")
    write_signed(v1, read_manifest_unverified(v1).model_copy(update={"expires_at": soon}), key)
    cat.rows[2]["price"] = "0.05"
    cat.write()
    d2 = build_snapshot(BuildSpec(catalog=cat.path, store="s1", out_dir=tmp_path / "d2", private_key=key,
                                  embedder=emb, base=v1, progress=False)).out_dir
    producer = _Producer(key, emb.model_id, emb.dim)
    k = Kiosk(tmp_path / "root", producer)
    k.sync.install(v1)
    k.sync.install(d2)

    class Later(datetime):
        @classmethod
        def now(cls, tz: object = None) -> Later:  # type: ignore[override]
            return cls.fromtimestamp((datetime.now(UTC) + timedelta(days=2)).timestamp(), tz=UTC)

    monkeypatch.setattr(snapshot_mod, "datetime", Later)
    again = Kiosk(tmp_path / "root", producer)
    snap = again.sync.load_active()
    assert again.reasons == [] and snap is not None and snap.version == 2
    assert snap.items()["SKU-002"].price == "0.05"


@dataclass(frozen=True)
class _Producer:
    key: Ed25519PrivateKey
    model_id: str
    model_dim: int

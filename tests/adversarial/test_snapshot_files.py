"""Generated attacks on a snapshot's files: every file flipped, truncated, extended, renamed or replaced by
a symlink, extra files at every depth (named like the manifest, the signature, the index...), symlinked
folders. Each case goes through ``verify_snapshot`` (what ``catalog verify`` runs), a kiosk's install of the
folder and of an archive of it, and a kiosk's boot over a stored generation edited that way. Every case
must be refused with a named reason while the snapshot already served keeps answering.
"""

from __future__ import annotations

import shutil
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device.generations.switcher import switch_snapshot
from device.sync import ActiveSnapshot, SnapshotRefused, SnapshotStore, SnapshotSync, Sources
from storelens.archive import pack
from storelens.snapshot import MANIFEST, SIGNATURE, SnapshotRejected, scan_files, verify_snapshot
from tests.adversarial.conftest import Outcome, Tally
from tests.device.sync.snapbuild import MODEL_DIM, MODEL_ID, Built, build_snapshot

STORE = "store1"
Edit = Callable[[Path, Path], object]  # (snapshot dir, scratch dir outside it)


@dataclass(frozen=True)
class Case:
    family: str  # the tally's family, e.g. "snapshot:flip"
    name: str  # what was done to which file
    edit: Edit


def _flip(d: Path, _: Path, rel: str) -> None:
    p = d / rel
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


def _truncate(d: Path, _: Path, rel: str) -> None:
    p = d / rel
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _extend(d: Path, _: Path, rel: str) -> None:
    with open(d / rel, "ab") as fh:
        fh.write(b"\0")


def _rename(d: Path, _: Path, rel: str, new: str) -> None:
    (d / new).parent.mkdir(parents=True, exist_ok=True)
    (d / rel).rename(d / new)


def _symlink_file(d: Path, scratch: Path, rel: str) -> None:
    """Replace a file by a symlink to an identical copy outside the snapshot (same size, same bytes)."""
    copy = scratch / rel.replace("/", "_")
    shutil.copyfile(d / rel, copy)
    (d / rel).unlink()
    (d / rel).symlink_to(copy)


def _extra(d: Path, _: Path, rel: str) -> None:
    (d / rel).parent.mkdir(parents=True, exist_ok=True)
    (d / rel).write_bytes(b"{}" if rel.endswith(".json") else b"\0" * 64)


def _folder_to_symlink(d: Path, scratch: Path) -> None:
    shutil.copytree(d / "thumbs", scratch / "thumbs")
    shutil.rmtree(d / "thumbs")
    (d / "thumbs").symlink_to(scratch / "thumbs", target_is_directory=True)


def _outside_folder(d: Path, scratch: Path) -> None:
    (scratch / "outside").mkdir()
    (scratch / "outside" / "x.bin").write_bytes(b"x")
    (d / "ext").symlink_to(scratch / "outside", target_is_directory=True)


EXTRA_FOLDERS = ("", "thumbs/", "new/", "thumbs/deep/", "new/a/b/")
EXTRA_NAMES = (MANIFEST, SIGNATURE, "index.bin", "items.jsonl", "vectors.jsonl", "x.jpg", ".hidden")


def generate(files: list[str]) -> list[Case]:
    """Every case for a snapshot holding ``files`` (relative names, the manifest pair included)."""
    cases: list[Case] = []
    for rel in files:
        moved = rel.split("/")[-1] if "/" in rel else f"thumbs/{rel}"
        cases += [
            Case("snapshot:flip", rel, partial(_flip, rel=rel)),
            Case("snapshot:truncate", rel, partial(_truncate, rel=rel)),
            Case("snapshot:extend", rel, partial(_extend, rel=rel)),
            Case("snapshot:rename", f"{rel} -> {rel}.bak", partial(_rename, rel=rel, new=f"{rel}.bak")),
            Case("snapshot:rename", f"{rel} -> {moved}", partial(_rename, rel=rel, new=moved)),
            Case("snapshot:symlink", rel, partial(_symlink_file, rel=rel)),
        ]
    for folder in EXTRA_FOLDERS:
        for name in EXTRA_NAMES:
            rel = folder + name
            if rel not in files:
                cases.append(Case("snapshot:extra_file", rel, partial(_extra, rel=rel)))
    cases += [
        Case("snapshot:symlink", "dangling", lambda d, s: (d / "thumbs" / "x.jpg").symlink_to(s / "no")),
        Case("snapshot:symlink_folder", "thumbs/ -> a copy outside", _folder_to_symlink),
        Case("snapshot:symlink_folder", "pics -> thumbs", lambda d, _: (d / "pics").symlink_to(d / "thumbs")),
        Case("snapshot:symlink_folder", "thumbs/up -> ..", lambda d, _: (d / "thumbs/up").symlink_to("..")),
        Case("snapshot:symlink_folder", "ext -> a folder outside", _outside_folder),
    ]
    return cases


class Kiosk:
    """One kiosk's snapshot sync on ``root``: what it swapped in and what it refused."""

    def __init__(self, root: Path, key: Ed25519PrivateKey) -> None:
        self.swaps: list[ActiveSnapshot] = []
        self.refused: list[tuple[str, str]] = []
        self.store = SnapshotStore(root)
        self.sync = SnapshotSync(
            self.store,
            [key.public_key()],
            store_id=STORE,
            model_id=MODEL_ID,
            model_dim=MODEL_DIM,
            switch=lambda c: switch_snapshot(c, self.swaps.append),
            on_refused=lambda r, d: self.refused.append((r, d)),
            sources=Sources([]),  # installs here are direct: no announced URL is ever fetched
        )


@dataclass(frozen=True)
class World:
    key: Ed25519PrivateKey
    served: Built  # v1: what the kiosk serves before the attack
    target: Built  # v2: the snapshot every case edits
    files: list[str]
    booted: Path  # a kiosk root with v1 (previous) and v2 (active) installed: copied per boot case


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("snapshot-files")
    key = Ed25519PrivateKey.generate()
    served = build_snapshot(root / "v1", key, version=1, n=12)
    target = build_snapshot(root / "v2", key, version=2, n=12, seed=3)
    kiosk = Kiosk(root / "booted", key)
    kiosk.sync.install(served.directory)
    kiosk.sync.install(target.directory)
    return World(key, served, target, sorted(scan_files(target.directory)), root / "booted")


@pytest.fixture(scope="module")
def cases(world: World) -> list[Case]:
    return generate(world.files)


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    n = iter(range(1_000_000))

    def make(label: str) -> Path:
        d = tmp_path / f"{label}-{next(n)}"
        d.mkdir()
        return d

    yield make


def _edited(world: World, case: Case, scratch: Callable[[str], Path]) -> Path:
    d = scratch("case") / "snap"
    shutil.copytree(world.target.directory, d, symlinks=True)
    case.edit(d, scratch("outside"))
    return d


def _archive(d: Path, out: Path) -> Path:
    """The edited snapshot as the publisher packs it, else as an attacker would (a symlink goes in as a
    tar symlink member)."""
    try:
        pack(d, out)
    except (SnapshotRejected, OSError):  # pack follows no symlink, needs the manifest: tar it as is
        with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
            for p in sorted(d.rglob("*")):
                if p.is_symlink() or not p.is_dir():
                    tar.add(p, arcname=str(p.relative_to(d)), recursive=False)
    return out


def _serves(snap: ActiveSnapshot | None, built: Built) -> bool:
    return snap is not None and all(
        snap.search(built.vectors[i : i + 1], 1)[0][0].sku == built.skus[i] for i in (0, 5, 11)
    )


def _report(tally: Tally, failures: list[str], case: Case, path: str, outcome: Outcome, detail: str) -> None:
    tally.record(case.family, outcome)
    if outcome != "refused":
        failures.append(f"{path}: {case.family} {case.name}: {outcome} {detail}")


def test_every_edited_snapshot_is_refused_by_verify(
    world: World, cases: list[Case], scratch: Callable[[str], Path], tally: Tally
) -> None:
    """Guards: ``verify_snapshot`` (``catalog verify``) passing a snapshot with any file flipped, cut,
    extended, renamed or symlinked, an extra file at any depth, or a symlinked folder; or raising anything
    but a named refusal."""
    assert verify_snapshot(world.target.directory, [world.key.public_key()]).version == 2
    failures: list[str] = []
    for case in cases:
        d = _edited(world, case, scratch)
        try:
            verify_snapshot(d, [world.key.public_key()], model_id=MODEL_ID, model_dim=MODEL_DIM, store=STORE)
        except SnapshotRejected as exc:
            _report(tally, failures, case, "verify", "refused", exc.reason.value)
        except Exception as exc:  # the finding: anything but a named refusal
            _report(tally, failures, case, "verify", "traceback", repr(exc))
        else:
            _report(tally, failures, case, "verify", "accepted", "")
    assert not failures, "\n".join(failures)
    assert len(cases) > 100


@pytest.mark.slow  # ~200 installs or boots: 3-5 s on 2 busy cores
def test_every_edited_snapshot_is_refused_by_a_kiosk_install(
    world: World, cases: list[Case], scratch: Callable[[str], Path], tally: Tally
) -> None:
    """Guards: a kiosk installing an edited snapshot delivered as a folder or as an archive, swapping away
    from (or losing) the snapshot it served, or leaving staging behind."""
    def fresh() -> tuple[Kiosk, ActiveSnapshot]:
        kiosk = Kiosk(scratch("kiosk") / "root", world.key)
        return kiosk, kiosk.sync.install(world.served.directory)

    kiosk, served = fresh()
    failures: list[str] = []
    for case in cases:
        d = _edited(world, case, scratch)
        for path, source in (("install-dir", d), ("install-archive", _archive(d, d.with_name("snap.tar")))):
            try:
                kiosk.sync.install(source)
            except SnapshotRefused as exc:
                outcome: Outcome = "refused" if exc.reason else "traceback"
                detail = exc.reason
            except Exception as exc:  # the finding: anything but a named refusal
                outcome, detail = "traceback", repr(exc)
            else:
                outcome, detail = "accepted", ""
            if outcome != "accepted" and not (kiosk.sync.active is served and _serves(served, world.served)):
                outcome = "lost"
            _report(tally, failures, case, path, outcome, detail)
            if outcome != "refused":  # the next case starts from a kiosk serving v1 again
                kiosk, served = fresh()
    assert not failures, "\n".join(failures)
    assert kiosk.swaps == [served] and kiosk.store.highest_seen == (1, world.served.manifest_sha256)
    assert not any(kiosk.store.staging.iterdir())


@pytest.mark.slow  # ~200 installs or boots: 3-5 s on 2 busy cores
def test_every_edited_stored_generation_is_refused_at_boot(
    world: World, cases: list[Case], scratch: Callable[[str], Path], tally: Tally
) -> None:
    """Guards: a kiosk trusting, after a restart, its active generation edited on disk in any of the ways
    above, instead of naming the reason and serving the previous snapshot."""
    failures: list[str] = []
    for case in cases:
        root = scratch("boot") / "root"
        shutil.copytree(world.booted, root, symlinks=True)
        active = SnapshotStore(root).pointer.active
        assert active is not None
        case.edit(root / "snapshots" / active, scratch("outside"))
        kiosk = Kiosk(root, world.key)
        try:
            snap = kiosk.sync.load_active()
        except Exception as exc:  # the finding: anything but a named refusal
            _report(tally, failures, case, "boot", "traceback", repr(exc))
            continue
        if snap is not None and snap.version == 2:
            outcome: Outcome = "accepted"
        elif not _serves(snap, world.served):
            outcome = "lost"
        else:
            outcome = "refused" if [r for r, _ in kiosk.refused] else "traceback"
        _report(tally, failures, case, "boot", outcome, str(kiosk.refused[:1]))
    assert not failures, "\n".join(failures)

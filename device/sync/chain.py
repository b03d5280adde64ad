"""Trusting snapshot generations on the kiosk: signed ones directly, applied deltas by their chain.

A delta applied on the kiosk is a directory :func:`storelens.delta.apply_delta` wrote, whose manifest is
unsigned, plus the proof it came from::

    proof/root/         the signed full snapshot the chain starts from (hard links to the earlier copy)
    proof/v<version>/   every signed delta of the chain, in version order

No signature covers an applied ``index.bin``: hnswlib's insertions depend on the CPU it runs on, so the
cloud cannot sign the result, and the signed row hashes do not cover the index. Trusting an applied
directory again (at boot, on a rollback, before the next delta lands on it) therefore means re-deriving
it: verify the root and each delta (pinned keys, store, running model, links by version + manifest sha256,
sizes, hashes), apply them in order into a private work dir (each apply checks that link's signed result
hashes) and require the stored directory to equal the result file for file. hnswlib with one thread gives
the same bytes for the same inputs, so any difference is damage or tampering.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device.sync.errors import SnapshotRefused
from storelens.delta import apply_delta
from storelens.fsutil import fsync_dir, sha256_file
from storelens.snapshot import (
    RejectReason,
    SnapshotManifest,
    SnapshotRejected,
    manifest_sha256,
    read_manifest_unverified,
    scan_files,
    verify_snapshot,
)

PROOF = "proof"
ROOT = "root"
# Every boot re-applies each link of the active chain: this bounds that work. A longer chain is refused
# (and a kiosk falls back to the announced full snapshot); the cloud should publish a full one by then.
MAX_CHAIN_DELTAS = 16
# Superseded links are judged as of long ago: only the newest link of a chain may have expired.
_LONG_AGO = datetime.min.replace(tzinfo=UTC)

BASE_MISMATCH = "delta_base_mismatch"  # the kiosk does not hold the base a delta chains to
CHAIN_BROKEN = "chain_broken"  # an applied generation's proof is missing a link or links wrongly
CHAIN_TOO_LONG = "delta_chain_too_long"
APPLIED_MISMATCH = "applied_mismatch"  # the stored applied files differ from their re-derivation


@dataclass(frozen=True, slots=True)
class Verified:
    manifest: SnapshotManifest  # for an applied generation: its merged (unsigned, re-derived) manifest
    identity: tuple[int, str]  # (version, sha256 of the signed manifest it answers for): what deltas name


class Verifier:
    """Verifies snapshot directories for one kiosk: pinned keys, its store, its running model."""

    def __init__(
        self, public_keys: list[Ed25519PublicKey], *, store_id: str, model_id: str, model_dim: int
    ) -> None:
        self._keys = list(public_keys)
        self._store_id = store_id
        self._model_id = model_id
        self._model_dim = model_dim

    def signed(
        self,
        directory: Path,
        *,
        seen: tuple[int, str] | None = None,
        base: tuple[int, str] | None = None,
        newest: bool = True,
    ) -> SnapshotManifest:
        """storelens.snapshot.verify_snapshot for this kiosk; SnapshotRefused with its reason."""
        try:
            return verify_snapshot(
                directory,
                self._keys,
                model_id=self._model_id,
                model_dim=self._model_dim,
                store=self._store_id,
                seen=seen,
                base=base,
                now=None if newest else _LONG_AGO,
            )
        except SnapshotRejected as exc:
            raise _refused(exc) from exc

    def stored(self, directory: Path, work: Path) -> Verified:
        """Verify a generation kept on disk (no replay check: it was accepted before)."""
        if (directory / PROOF).is_dir():
            return self._rederive(directory, work)[0]
        m = self.signed(directory)
        return Verified(m, (m.version, manifest_sha256(directory)))

    def apply(self, base_dir: Path, delta_dir: Path, work: Path) -> tuple[Path, SnapshotManifest]:
        """Apply a verified delta onto a private, re-verified copy of ``base_dir`` (only read).

        Returns the new generation directory (inside ``work``, with its proof; ``delta_dir`` is moved
        into it) and its merged manifest. SnapshotRefused when the base is not the delta's, the chain
        would be too long, or any check fails.
        """
        delta_m = read_manifest_unverified(delta_dir)
        chained = (base_dir / PROOF).is_dir()
        if chained and len(_links(base_dir / PROOF)[1]) + 1 > MAX_CHAIN_DELTAS:
            raise SnapshotRefused(CHAIN_TOO_LONG, f"v{delta_m.version} would be link {MAX_CHAIN_DELTAS + 1}")
        base, copy = self._private_copy(base_dir, work / "base")
        if (delta_m.base_version, delta_m.base_manifest_sha256) != base.identity:
            raise SnapshotRefused(
                BASE_MISMATCH,
                f"v{delta_m.version} chains to v{delta_m.base_version}, the base is v{base.identity[0]}",
            )
        out = work / "applied"
        try:
            merged = apply_delta(copy, delta_dir, out)
        except SnapshotRejected as exc:
            raise _refused(exc) from exc
        proof = out / PROOF
        proof.mkdir()
        if chained:
            _link_tree(base_dir / PROOF, proof)  # just re-verified with the base; hard links, no copy
        else:
            copy.rename(proof / ROOT)  # the verified private copy of the full base starts the chain
        delta_dir.rename(proof / f"v{delta_m.version}")
        fsync_dir(proof)
        fsync_dir(out)
        return out, merged

    def _private_copy(self, directory: Path, work: Path) -> tuple[Verified, Path]:
        """A verified copy of a generation that nothing else reads or writes, in ``work``."""
        work.mkdir(parents=True)
        if (directory / PROOF).is_dir():
            return self._rederive(directory, work)
        copy = work / "copy"
        shutil.copytree(directory, copy, symlinks=True)
        m = self.signed(copy, newest=False)  # the delta supersedes it: its expiry no longer matters
        return Verified(m, (m.version, manifest_sha256(copy))), copy

    def _rederive(self, directory: Path, work: Path) -> tuple[Verified, Path]:
        try:
            stored = _files(directory)  # first: a symlink anywhere, proof/ included, is never followed
        except SnapshotRejected as exc:
            raise SnapshotRefused(_refused(exc).reason, f"{directory.name}: {exc.detail}") from exc
        root, deltas = _links(directory / PROOF)
        if len(deltas) > MAX_CHAIN_DELTAS:
            raise SnapshotRefused(CHAIN_TOO_LONG, f"{len(deltas)} deltas in {directory.name}")
        root_m = self._link(root, base=None, newest=False)
        if root_m.kind != "full":
            raise SnapshotRefused(CHAIN_BROKEN, f"{PROOF}/{ROOT} is not a full snapshot")
        identity = (root_m.version, manifest_sha256(root))
        current = root
        work.mkdir(parents=True, exist_ok=True)
        for i, link in enumerate(deltas):
            m = self._link(link, base=identity, newest=i == len(deltas) - 1)
            out = work / f"link-{i}"
            try:
                apply_delta(current, link, out)
            except SnapshotRejected as exc:
                raise SnapshotRefused(_refused(exc).reason, f"{PROOF}/{link.name}: {exc.detail}") from exc
            if current != root:
                shutil.rmtree(current, ignore_errors=True)
            current, identity = out, (m.version, manifest_sha256(link))
        problem = _differs(current, stored)
        if problem is not None:
            raise SnapshotRefused(APPLIED_MISMATCH, f"{directory.name}: {problem}")
        return Verified(read_manifest_unverified(current), identity), current

    def _link(self, link: Path, *, base: tuple[int, str] | None, newest: bool) -> SnapshotManifest:
        try:
            return self.signed(link, base=base, newest=newest)
        except SnapshotRefused as exc:
            reason = CHAIN_BROKEN if exc.reason == BASE_MISMATCH else exc.reason
            raise SnapshotRefused(reason, f"{PROOF}/{link.name}: {exc.detail}") from exc


def _refused(exc: SnapshotRejected) -> SnapshotRefused:
    reason = BASE_MISMATCH if exc.reason is RejectReason.BASE_MISMATCH else exc.reason.value
    return SnapshotRefused(reason, exc.detail)


def _links(proof: Path) -> tuple[Path, list[Path]]:
    """(root, deltas in version order) of a proof directory; SnapshotRefused if it holds anything else."""
    deltas: list[tuple[int, Path]] = []
    for p in proof.iterdir():
        if p.name == ROOT and p.is_dir():
            continue
        if not (p.is_dir() and p.name.startswith("v") and p.name[1:].isdigit()):
            raise SnapshotRefused(CHAIN_BROKEN, f"unexpected {PROOF}/{p.name}")
        deltas.append((int(p.name[1:]), p))
    if not (proof / ROOT).is_dir() or not deltas:
        raise SnapshotRefused(CHAIN_BROKEN, f"{PROOF}/ lacks its root or its deltas")
    return proof / ROOT, [p for _, p in sorted(deltas)]


def _files(directory: Path) -> dict[str, Path]:
    """Every regular file below ``directory`` except the proof, by relative name (SnapshotRejected for a
    symlink or other non-regular entry anywhere, the proof included)."""
    return {name: directory / name for name in scan_files(directory) if name.split("/")[0] != PROOF}


def _differs(derived: Path, have: dict[str, Path]) -> str | None:
    """What differs between a re-derived directory and the stored files (:func:`_files` of the stored
    directory); None: the same files and bytes."""
    want = _files(derived)
    odd = sorted(want.keys() ^ have.keys())
    if odd:
        return f"{odd[0]} is {'missing' if odd[0] in want else 'unexpected'}"
    for name in sorted(want):  # sizes first: cheap, catches truncation
        if have[name].stat().st_size != want[name].stat().st_size:
            return f"{name} differs from the chain's re-derivation"
    for name in sorted(want):
        if sha256_file(have[name]) != sha256_file(want[name]):
            return f"{name} differs from the chain's re-derivation"
    return None


def _link_tree(src: Path, dst: Path) -> None:
    """Recreate ``src`` under ``dst`` with hard links (files are never modified in place), else copies."""
    for p in sorted(src.rglob("*")):
        target = dst / p.relative_to(src)
        if p.is_dir() and not p.is_symlink():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(p, target, follow_symlinks=False)
        except OSError:  # another file system, or links not allowed: a copy is as good, only larger
            shutil.copy2(p, target, follow_symlinks=False)

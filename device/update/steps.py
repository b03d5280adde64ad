"""The release candidate's steps as plain functions: fetch a release, verify it, stage bundle+snapshot.

Each raises UpdateFailed(step, reason, detail); nothing here touches what serves or the pointer.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device.generations.canary import UpdateFailed
from device.sync.download import DownloadError, check_source, fetch, open_url, redact_url
from device.sync.sources import Sources
from models.bundle import BundleManifest, verify_bundle
from models.errors import ModelError
from storelens.archive import unpack
from storelens.protocol import DesiredRelease
from storelens.release import (
    MAX_RELEASE_BYTES,
    ReleaseManifest,
    ReleaseRejected,
    StoreSnapshotRef,
    verify_release,
)
from storelens.snapshot import SnapshotManifest, SnapshotRejected, manifest_sha256, verify_snapshot

_LOGGER = logging.getLogger(__name__)

SOCKET_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class Staged:
    """A verified bundle and snapshot in staging, not yet placed."""

    release: ReleaseManifest
    bundle_dir: Path
    bundle: BundleManifest
    snapshot_dir: Path
    snapshot: SnapshotManifest
    snapshot_sha256: str


def read_url(url: str, *, max_bytes: int, timeout_s: float, sources: Sources) -> bytes:
    """A small file (release.json / .sig) from an allowed source, at most ``max_bytes`` read."""
    try:
        check_source(sources, url)
        data = b"".join(open_url(url, min(timeout_s, SOCKET_TIMEOUT_S), sources, limit=max_bytes + 1))
    except DownloadError as exc:
        raise UpdateFailed("download", exc.reason, exc.detail) from exc
    except Exception as exc:  # urllib, OSError, botocore: any transport failure is a failed download
        raise UpdateFailed("download", "download_failed", f"{redact_url(url)}: {type(exc).__name__}") from exc
    if len(data) > max_bytes:
        raise UpdateFailed("download", "too_large", f"{redact_url(url)} is over {max_bytes} bytes")
    return data


def check_sources(release: ReleaseManifest, store: str, sources: Sources) -> None:
    """Every URL the kiosk would fetch for ``release`` lies under an allowed source (before any fetch)."""
    arts = [*release.bundle.files.values()]
    ref = release.stores.get(store)
    if ref is not None:
        arts.append(ref.archive)
    for art in arts:
        try:
            check_source(sources, art.url)
        except DownloadError as exc:
            raise UpdateFailed("verify", exc.reason, f"release.json names {exc.detail}") from exc


def fetch_release(
    desired: DesiredRelease, keys: list[Ed25519PublicKey], *, timeout_s: float, sources: Sources
) -> ReleaseManifest:
    """Download release.json + release.sig, verify the signature, and check it is the one asked for."""
    data = read_url(desired.url, max_bytes=MAX_RELEASE_BYTES, timeout_s=timeout_s, sources=sources)
    sig = read_url(desired.sig_url, max_bytes=1024, timeout_s=timeout_s, sources=sources)
    try:
        m = verify_release(data, sig, keys)
    except ReleaseRejected as exc:
        raise UpdateFailed("verify", exc.reason, exc.detail) from exc
    if (m.release, m.sequence) != (desired.release, desired.sequence):
        raise UpdateFailed("verify", "release_mismatch", f"release.json is {m.release}#{m.sequence}")
    return m


def download(
    release: ReleaseManifest,
    store: str,
    staging: Path,
    *,
    deadline: float,
    stop: threading.Event,
    sources: Sources,
) -> tuple[Path, Path, StoreSnapshotRef]:
    """Fetch the bundle files and the store's snapshot archive into ``staging`` (sizes and hashes checked);
    every URL the signed release names is checked against ``sources`` before the first fetch."""
    check_sources(release, store, sources)
    ref = release.stores.get(store)
    if ref is None:
        raise UpdateFailed(
            "verify", "not_in_release", f"release {release.release} has no snapshot for {store}"
        )
    bundle_dir = staging / "bundle"
    bundle_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(art, bundle_dir / name) for name, art in sorted(release.bundle.files.items())]
    jobs.append((ref.archive, staging / "snapshot.tar"))
    for art, dest in jobs:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise UpdateFailed("download", "deadline", "update deadline passed while downloading")
        try:
            fetch(
                art.url, dest, size=art.size, sha256=art.sha256, timeout_s=remaining, sources=sources,
                stop=stop,
            )
        except DownloadError as exc:
            raise UpdateFailed("download", exc.reason, exc.detail) from exc
    return bundle_dir, staging / "snapshot.tar", ref


def verify_staged(
    release: ReleaseManifest,
    store: str,
    bundle_dir: Path,
    archive: Path,
    ref: StoreSnapshotRef,
    keys: list[Ed25519PublicKey],
    *,
    max_snapshot_bytes: int,
) -> Staged:
    """Bundle hashes = release, snapshot verified against the NEW model_id, manifest sha = release."""
    try:
        bm = verify_bundle(bundle_dir)
    except ModelError as exc:
        raise UpdateFailed("verify", "bad_bundle", str(exc)) from exc
    if bm.model_id != release.bundle.model_id or bm.dim != release.bundle.dim:
        raise UpdateFailed(
            "verify",
            "model_mismatch",
            f"bundle is {bm.model_id[:12]}, release says {release.bundle.model_id[:12]}",
        )
    snap_dir = archive.parent / "snapshot"
    try:
        unpack(archive, snap_dir, max_total_bytes=max_snapshot_bytes)
        sm = verify_snapshot(snap_dir, keys, model_id=bm.model_id, model_dim=bm.dim, store=store)
    except SnapshotRejected as exc:
        raise UpdateFailed("verify", exc.reason.value, exc.detail) from exc
    finally:
        archive.unlink(missing_ok=True)
    digest = manifest_sha256(snap_dir)
    if digest != ref.manifest_sha256 or sm.version != ref.version:
        raise UpdateFailed("verify", "manifest_mismatch", "snapshot manifest differs from the release")
    if sm.kind != "full":
        raise UpdateFailed("verify", "delta_unsupported", "a release carries full snapshots only")
    return Staged(release, bundle_dir, bm, snap_dir, sm, digest)


def discard(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)

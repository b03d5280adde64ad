"""`fleet release`: one model bundle + the per-store snapshots it builds, signed together and published.

Layout under the artifact store (file:// or s3://, cloud.publish's ArtifactStore):

    releases/<id>/bundle/{manifest.json,model.xml,model.bin}
    releases/<id>/snapshots/<store>/snapshot.tar
    releases/<id>/release.json + release.sig      (written last: a release is visible only when complete)

Snapshots are built with cloud.build.build_snapshot (one embedder and one embedding cache for all stores)
and then carry their canary images, so a kiosk can run the new model over them before switching.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.build import BuildSpec, build_snapshot
from cloud.catalog import fetch_image_bytes, load_catalog
from cloud.feedback.store import FeedbackSource
from cloud.publish import ArtifactStore, open_store
from models.bundle import verify_bundle
from storelens.archive import pack
from storelens.fsutil import atomic_write_bytes, sha256_file
from storelens.release import (
    BUNDLE_FILES,
    RELEASE_JSON,
    RELEASE_SIG,
    Artifact,
    BundleRef,
    ReleaseManifest,
    StoreSnapshotRef,
    check_release_id,
    sign_release,
)
from storelens.snapshot import (
    describe_files,
    manifest_sha256,
    read_manifest_unverified,
    utc_now_iso,
    write_signed,
)

_LOGGER = logging.getLogger(__name__)

CANARY_DIR = "canary"


class ReleaseError(Exception):
    """The release cannot be built or published."""


@dataclass(frozen=True, slots=True)
class PublishedRelease:
    manifest: ReleaseManifest
    url: str  # release.json
    sig_url: str
    seconds: float
    warnings: list[str] = field(default_factory=list)  # "store: ..." from the snapshot builds


def attach_canary_images(snapshot_dir: Path, catalog_path: Path, key: Ed25519PrivateKey) -> int:
    """Copy each canary's source image into the snapshot (exact bytes) and re-sign; return how many."""
    m = read_manifest_unverified(snapshot_dir)
    catalog = load_catalog(catalog_path)
    images = {it.sku: it.images for it in catalog.items}
    first_sha: dict[str, str] = {}
    for line in (snapshot_dir / "vectors.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            first_sha.setdefault(str(row["sku"]), str(row.get("image", "")))
    canaries = []
    (snapshot_dir / CANARY_DIR).mkdir(exist_ok=True)
    for i, c in enumerate(m.canary):
        found = None
        for src in images.get(c.sku, ()):
            data = fetch_image_bytes(src, catalog.base_dir)
            if hashlib.sha256(data).hexdigest() == first_sha.get(c.sku):
                found = (src, data)
                break
        if found is None:
            canaries.append(c)
            continue
        suffix = (
            Path(found[0]).suffix.lower()
            if Path(found[0]).suffix.lower() in (".jpg", ".jpeg", ".png")
            else ".img"
        )
        name = f"{CANARY_DIR}/{i:02d}{suffix}"
        atomic_write_bytes(snapshot_dir / name, found[1])
        canaries.append(c.model_copy(update={"image": name}))
    names = [
        str(p.relative_to(snapshot_dir))
        for p in snapshot_dir.rglob("*")
        if p.is_file() and p.name not in ("manifest.json", "manifest.sig")
    ]
    write_signed(
        snapshot_dir,
        m.model_copy(update={"canary": canaries, "files": describe_files(snapshot_dir, names)}),
        key,
    )
    return sum(1 for c in canaries if c.image)


def build_release(
    bundle: Path,
    catalog: Path,
    stores: list[str],
    key: Ed25519PrivateKey,
    to: str,
    *,
    release_id: str | None = None,
    sequence: int | None = None,
    cache_dir: Path | None = None,
    embedder: Any = None,
    s3_client: Any = None,
    notes: str = "",
    feedback: FeedbackSource | None = None,
) -> PublishedRelease:
    """Build every store's snapshot with ``bundle``, sign the release, and publish it to ``to``.

    ``feedback``: a feedback store (folder or ``s3://``) whose approved store photos join each store's
    snapshot (as ``catalog build --feedback`` adds them: rows marked ``store``)."""
    t0 = time.monotonic()
    bm = verify_bundle(bundle)
    sequence = sequence if sequence is not None else int(time.time())
    release_id = check_release_id(release_id or f"r{sequence}-{bm.model_id[:8]}")
    if not stores:
        raise ReleaseError("no stores given")
    store = open_store(to, s3_client=s3_client)
    own = embedder is None
    if embedder is None:
        from models.embedder import Embedder

        embedder = Embedder(bundle, mode="throughput", cache_dir=cache_dir)
    if embedder.model_id != bm.model_id:
        raise ReleaseError("the embedder is not the bundle's model")
    prefix = f"releases/{release_id}"
    refs: dict[str, StoreSnapshotRef] = {}
    warnings: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="storelens-release-") as tmp:
            work = Path(tmp)
            for s in stores:
                out = work / s
                built = build_snapshot(BuildSpec(
                    catalog=catalog,
                    store=s,
                    out_dir=out,
                    private_key=key,
                    embedder=embedder,
                    version=sequence,
                    cache_dir=cache_dir,
                    progress=False,
                    feedback=feedback,
                ))
                warnings += [f"store {s}: {w}" for w in built.report["warnings"]]
                n = attach_canary_images(out, catalog, key)
                if n == 0:
                    raise ReleaseError(
                        f"store {s}: no canary image could be attached (kiosks could not self-test)"
                    )
                archive = work / f"{s}.tar"
                pack(out, archive)
                refs[s] = StoreSnapshotRef(
                    version=sequence,
                    manifest_sha256=manifest_sha256(out),
                    archive=_upload(store, f"{prefix}/snapshots/{s}/snapshot.tar", archive),
                )
            files = {name: _upload(store, f"{prefix}/bundle/{name}", bundle / name) for name in BUNDLE_FILES}
            manifest = ReleaseManifest(
                release=release_id,
                sequence=sequence,
                created_at=utc_now_iso(),
                bundle=BundleRef(model_id=bm.model_id, dim=bm.dim, name=bm.name, files=files),
                stores=refs,
                notes=notes,
            )
            data, sig = sign_release(manifest, key)
            atomic_write_bytes(work / RELEASE_SIG, sig)
            atomic_write_bytes(work / RELEASE_JSON, data)
            sig_art = _upload(store, f"{prefix}/{RELEASE_SIG}", work / RELEASE_SIG)
            json_art = _upload(store, f"{prefix}/{RELEASE_JSON}", work / RELEASE_JSON)  # last: the commit
    finally:
        if own:
            embedder.close()
    seconds = time.monotonic() - t0
    _LOGGER.info(
        "release %s (#%d, model %s) for %d stores published in %.1f s",
        release_id,
        sequence,
        bm.model_id[:12],
        len(stores),
        seconds,
    )
    signed = ReleaseManifest.model_validate_json(data)
    return PublishedRelease(signed, json_art.url, sig_art.url, seconds, warnings)


def _upload(store: ArtifactStore, key: str, path: Path) -> Artifact:
    sha = sha256_file(path)
    existing = store.head(key)
    if existing is not None and existing != sha:
        raise ReleaseError(f"{key} already holds other content (release ids are never reused)")
    if existing is None:
        store.put(key, path, sha)
    return Artifact(url=store.url(key), sha256=sha, size=path.stat().st_size)


def sig_url_for(release_url: str) -> str:
    """release.sig beside release.json (file:// and plain https layouts)."""
    if not release_url.split("?")[0].endswith(RELEASE_JSON):
        raise ReleaseError(f"{release_url} does not name a {RELEASE_JSON}")
    base, _, query = release_url.partition("?")
    return base[: -len(RELEASE_JSON)] + RELEASE_SIG + (f"?{query}" if query else "")

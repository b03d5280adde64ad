"""A real delta chain for kiosk tests, made by the cloud builder (what kiosks receive in production).

v1 full -> d2 (an image changed, an item removed, one added, a price changed) -> d3 (built against the
cloud's applied v2: an image dropped, another item added), and full rebuilds of v2 and v3 to compare with.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.build import BuildSpec, build_snapshot
from storelens.archive import pack
from storelens.delta import apply_delta
from storelens.protocol import FullSnapshotRef, SnapshotAnnouncement
from storelens.snapshot import manifest_sha256, read_manifest_unverified
from tests.cloud.conftest import CatalogFiles, CountingEmbedder, item_image, make_catalog, write_jpeg

STORE = "s1"


@dataclass(frozen=True)
class Chain:
    key: Ed25519PrivateKey
    model_id: str
    model_dim: int
    v1: Path
    d2: Path
    d3: Path
    full2: Path
    full3: Path
    other1: Path  # a v1 with the same content as v1 but another manifest (not the base d2 names)
    queries: npt.NDArray[np.float32]  # model-space unit vectors: photos of kept, changed and new items


def _new_item(cat: CatalogFiles, sku: str, item: int) -> dict[str, Any]:
    img = write_jpeg(cat.dir / "img" / f"{sku}.jpg", item_image(item, 0))
    return {"sku": sku, "title": sku.title(), "price": "3.10", "images": [str(img.relative_to(cat.dir))]}


def build_chain(root: Path, key: Ed25519PrivateKey, *, adapter: Literal["lda", "none"] = "none") -> Chain:
    """Build the chain under ``root``; ``adapter="none"`` keeps full rebuilds in the same vector space."""
    cat = make_catalog(root / "cat")
    emb = CountingEmbedder()

    def build(out: str, **kw: Any) -> Path:
        res = build_snapshot(BuildSpec(
            catalog=cat.path, store=STORE, out_dir=root / out, private_key=key, embedder=emb, progress=False,
            adapter=adapter, **kw
        ))
        return res.out_dir

    v1 = build("v1")
    other1 = build("other1", version=1)
    write_jpeg(cat.dir / "img" / "item3_1.jpg", item_image(3, 9))
    del cat.rows[5]
    cat.rows[6]["price"] = "9.99"
    cat.rows.append(_new_item(cat, "SKU-NEW", 50))
    cat.write()
    d2 = build("d2", base=v1)
    full2 = build("full2", version=2)
    applied2 = root / "applied2"  # the cloud keeps its own applied copy to diff the next build against
    apply_delta(v1, d2, applied2)
    cat.rows[0]["images"] = cat.rows[0]["images"][:2]
    cat.rows.append(_new_item(cat, "SKU-NEW2", 51))
    cat.write()
    d3 = build("d3", base=applied2)
    full3 = build("full3", version=3)
    for d, kind in ((d2, "delta"), (d3, "delta"), (full2, "full"), (full3, "full")):
        assert read_manifest_unverified(d).kind == kind, d
    photos = [item_image(i, v) for i in (0, 1, 3, 6, 7, 11, 50, 51) for v in (0, 4)]
    rng = np.random.default_rng(1)
    queries = np.vstack([emb.embed(photos), rng.standard_normal((12, emb.dim)).astype(np.float32)])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return Chain(key, emb.model_id, emb.dim, v1, d2, d3, full2, full3, other1, queries.astype(np.float32))


def archive(snapshot: Path, out: Path) -> Path:
    pack(snapshot, out)
    return out


def announce(snapshot: Path, tar: Path, *, full: tuple[Path, Path] | None = None) -> bytes:
    """The retained announcement of ``snapshot`` published as ``tar`` (file:// URL); ``full``: (dir, tar)."""
    m = read_manifest_unverified(snapshot)
    ref = None
    if full is not None:
        fdir, ftar = full
        ref = FullSnapshotRef(
            version=read_manifest_unverified(fdir).version,
            manifest_sha256=manifest_sha256(fdir),
            size=ftar.stat().st_size,
            sha256=hashlib.sha256(ftar.read_bytes()).hexdigest(),
            url=ftar.as_uri(),
        )
    return SnapshotAnnouncement(
        store=m.store,
        version=m.version,
        kind=m.kind,
        base_version=m.base_version,
        model_id=m.model_id,
        manifest_sha256=manifest_sha256(snapshot),
        size=tar.stat().st_size,
        sha256=hashlib.sha256(tar.read_bytes()).hexdigest(),
        url=tar.as_uri(),
        full=ref,
    ).to_bytes()

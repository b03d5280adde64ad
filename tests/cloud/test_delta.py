"""Delta snapshots: a chain of deltas applied to a base answers exactly like a full rebuild."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.build import BuildSpec, build_snapshot
from storelens import delta as d
from storelens import vindex
from storelens.snapshot import RejectReason, SnapshotRejected, manifest_sha256, verify_snapshot
from tests.cloud.conftest import CatalogFiles, CountingEmbedder, item_image, write_jpeg


def _top_items(snapshot: Path, queries: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
    m = json.loads((snapshot / "manifest.json").read_text())
    idx = vindex.load(snapshot / d.INDEX, dim=m["dim"], ef=400)
    sku = {int(r["label"]): r["sku"] for r in d.read_rows(snapshot / d.VECTORS)}
    labels, sims = idx.search(queries, 20)
    out = []
    for lab, sim in zip(labels, sims, strict=True):
        seen: dict[str, float] = {}
        for lbl, s in zip(lab.tolist(), sim.tolist(), strict=True):
            seen.setdefault(sku[int(lbl)], round(s, 5))
        out.append(list(seen.items())[:k])
    return out


def _build(cat: CatalogFiles, out: Path, key: Ed25519PrivateKey, **kw: object) -> Path:
    # Exact equality with a full rebuild needs the same vector space: no catalog-fitted adapter here
    # (a full build refits it; a delta keeps its base's, see test_delta_keeps_base_projection).
    kw.setdefault("adapter", "none")
    res = build_snapshot(BuildSpec(catalog=cat.path, store="s1", out_dir=out, private_key=key,  # type: ignore[arg-type]
                                   embedder=CountingEmbedder(), progress=False, **kw))
    return res.out_dir


def test_delta_chain_equals_full_rebuild(
    catalog: CatalogFiles, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """base v1 + delta v2 + delta v3 must give the same top-k items and scores as a full build of v3."""
    keys = [signing_key.public_key()]
    v1 = _build(catalog, tmp_path / "v1", signing_key)
    # v2: one image changed, one item removed, one added, one price changed
    write_jpeg(catalog.dir / "img" / "item3_1.jpg", item_image(3, 9))
    del catalog.rows[5]
    catalog.rows[6]["price"] = "9.99"
    catalog.rows.append(
        {
            "sku": "SKU-NEW",
            "title": "New",
            "images": [
                str(write_jpeg(catalog.dir / "img" / "new_0.jpg", item_image(50, 0)).relative_to(catalog.dir))
            ],
        }
    )
    catalog.write()
    v2 = _build(catalog, tmp_path / "v2", signing_key, base=v1)
    m2 = verify_snapshot(v2, keys, base=(1, manifest_sha256(v1)))
    assert m2.kind == "delta" and m2.version == 2 and m2.base_version == 1
    assert m2.extra["delta"]["added"] == 2 and m2.extra["delta"]["deleted"] == 4
    assert "index.bin" not in m2.files
    applied2 = tmp_path / "applied2"
    d.apply_delta(v1, v2, applied2)
    # v3 chains to the applied v2: another image dropped, another item added
    catalog.rows[0]["images"] = catalog.rows[0]["images"][:2]
    catalog.rows.append(
        {
            "sku": "SKU-NEW2",
            "title": "New 2",
            "images": [
                str(
                    write_jpeg(catalog.dir / "img" / "new2_0.jpg", item_image(51, 0)).relative_to(catalog.dir)
                )
            ],
        }
    )
    catalog.write()
    v3 = _build(catalog, tmp_path / "v3", signing_key, base=applied2)
    m3 = verify_snapshot(v3, keys, base=d.snapshot_identity(applied2))
    assert m3.kind == "delta" and m3.base_manifest_sha256 == manifest_sha256(v2)
    applied3 = tmp_path / "applied3"
    result = d.apply_delta(applied2, v3, applied3)
    full3 = _build(catalog, tmp_path / "full3", signing_key, version=3)
    assert (applied3 / d.ITEMS).read_bytes() == (full3 / d.ITEMS).read_bytes()
    assert result.vector_count == json.loads((full3 / "manifest.json").read_text())["vector_count"]
    assert sorted(p.name for p in (applied3 / "thumbs").iterdir()) == sorted(
        p.name for p in (full3 / "thumbs").iterdir()
    )
    rng = np.random.default_rng(1)
    emb = CountingEmbedder()
    photos = [item_image(i, v) for i in (0, 1, 3, 6, 7, 11, 50, 51) for v in (0, 4)]
    queries = np.vstack([emb.embed(photos), rng.standard_normal((20, emb.dim)).astype(np.float32)])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    assert _top_items(applied3, queries) == _top_items(full3, queries)


def test_big_change_falls_back_to_full(
    catalog: CatalogFiles, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """When more than the set fraction changed the build is full, and the report says why."""
    v1 = _build(catalog, tmp_path / "v1", signing_key)
    for r in catalog.rows[:6]:
        r["images"] = r["images"][:1]
    catalog.write()
    res = build_snapshot(BuildSpec(
        catalog=catalog.path, store="s1", out_dir=tmp_path / "v2", private_key=signing_key,
        embedder=CountingEmbedder(), base=v1, progress=False
    ))
    assert res.manifest.kind == "full" and res.manifest.version == 2
    assert "changed" in res.report["delta_fallback"]


def test_delta_on_wrong_base_is_refused(
    catalog: CatalogFiles, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """A delta applied to a base it does not chain to is refused before anything is written."""
    v1 = _build(catalog, tmp_path / "v1", signing_key)
    other = _build(catalog, tmp_path / "other", signing_key, version=1)  # same content, other manifest
    catalog.rows[0]["price"] = "0.10"
    catalog.write()
    v2 = _build(catalog, tmp_path / "v2", signing_key, base=v1)
    with pytest.raises(SnapshotRejected) as exc:
        verify_snapshot(v2, [signing_key.public_key()], base=(1, manifest_sha256(other)))
    assert exc.value.reason == RejectReason.BASE_MISMATCH
    with pytest.raises(SnapshotRejected) as exc:
        d.apply_delta(other, v2, tmp_path / "out")
    assert exc.value.reason == RejectReason.BASE_MISMATCH and not (tmp_path / "out").exists()


def test_tampered_delta_rows_are_refused(
    catalog: CatalogFiles, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """If merged rows differ from the signed result hashes (e.g. an edited base), apply refuses."""
    v1 = _build(catalog, tmp_path / "v1", signing_key)
    catalog.rows[0]["price"] = "0.10"
    catalog.write()
    v2 = _build(catalog, tmp_path / "v2", signing_key, base=v1)
    base = Path(shutil.copytree(v1, tmp_path / "base"))
    rows = d.read_rows(base / d.ITEMS)
    rows[3]["title"] = "edited"
    (base / d.ITEMS).write_bytes(d.rows_bytes(rows))
    with pytest.raises(SnapshotRejected) as exc:
        d.apply_delta(base, v2, tmp_path / "out")
    assert exc.value.reason == RejectReason.HASH_MISMATCH


def test_delta_keeps_base_projection(
    catalog: CatalogFiles, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """A delta's added vectors must be projected with the base's adapter, and the applied result keeps it."""
    keys = [signing_key.public_key()]
    v1 = _build(catalog, tmp_path / "v1", signing_key, adapter="lda")
    catalog.rows[6]["price"] = "9.99"
    catalog.rows.append(
        {
            "sku": "SKU-NEW",
            "title": "New",
            "images": [
                str(write_jpeg(catalog.dir / "img" / "new_0.jpg", item_image(50, 0)).relative_to(catalog.dir))
            ],
        }
    )
    catalog.write()
    v2 = _build(catalog, tmp_path / "v2", signing_key, base=v1, adapter="lda")
    m1, m2 = verify_snapshot(v1, keys), verify_snapshot(v2, keys, base=(1, manifest_sha256(v1)))
    assert m2.kind == "delta" and m1.projection is not None and m2.projection == m1.projection
    assert (v2 / "projection.bin").read_bytes() == (v1 / "projection.bin").read_bytes()
    applied = d.apply_delta(v1, v2, tmp_path / "applied")
    assert applied.projection == m1.projection and (tmp_path / "applied" / "projection.bin").is_file()

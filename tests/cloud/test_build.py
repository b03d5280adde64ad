"""Catalog parsing and snapshot builds: bad rows and bad images are reported, the cache saves work."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.build import BuildError, BuildSpec, build_snapshot
from cloud.catalog import load_catalog
from cloud.delta import VECTORS, read_rows
from cloud.open_set import plain_threshold
from storelens import vindex
from storelens.matching import MatchRule
from storelens.snapshot import verify_snapshot
from tests.cloud.conftest import CatalogFiles, CountingEmbedder, item_image, make_catalog, write_jpeg


def _bomb_png() -> bytes:
    """A tiny PNG whose header claims 65535 x 65535 pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 65535, 65535, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )


def test_bad_rows_are_reported_with_row_numbers(tmp_path: Path) -> None:
    """A malformed row must not stop the catalog: it is reported with its number and reason."""
    p = tmp_path / "c.csv"
    p.write_text(
        "sku,title,price,location,stores,images\n"
        "A1,Apple,1.20,Aisle 1,,a.jpg;a2.jpg\n"
        ",No sku,1,,,x.jpg\n"
        "B2,Banana,cheap,,,b.jpg\n"
        "C3,Cherry,2,,s1|s2,\n"
        "A1,Again,1,,,a.jpg\n"
        "D4,Date,-3,,,d.jpg\n"
        "E5,Eggplant,,,s2,e.jpg\n"
    )
    cat = load_catalog(p)
    assert [it.sku for it in cat.items] == ["A1", "E5"]
    assert cat.items[0].images == ("a.jpg", "a2.jpg") and cat.items[0].price == "1.20"
    errs = {e.row: e.error for e in cat.errors}
    assert set(errs) == {2, 3, 4, 6}
    assert "missing sku" in errs[2] and "price" in errs[3] and "no images" in errs[4] and "price" in errs[6]
    assert cat.merged_rows == 1  # row 5 repeats A1: merged, its differing title and price reported
    assert [c.sku for c in cat.conflicts["title"]] == ["A1"] and cat.conflicts["price"][0].other == "1.00"
    assert [it.sku for it in cat.for_store("s1")] == ["A1"]


def test_build_survives_bad_images_and_rows(
    catalog: CatalogFiles, embedder: CountingEmbedder, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """Zero-size, truncated, non-image, bomb and missing images are skipped and reported, never fatal."""
    bad = catalog.dir / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    good = write_jpeg(bad / "full.jpg", item_image(99, 0)).read_bytes()
    (bad / "trunc.jpg").write_bytes(good[: len(good) // 2])
    (bad / "text.jpg").write_text("not an image at all")
    (bad / "bomb.png").write_bytes(_bomb_png())
    catalog.rows[0]["images"] += [
        "bad/empty.jpg",
        "bad/trunc.jpg",
        "bad/text.jpg",
        "bad/bomb.png",
        "bad/nope.jpg",
    ]
    catalog.rows.append({"sku": "ONLY-BAD", "title": "Broken", "images": ["bad/text.jpg"]})
    catalog.rows.append({"title": "no sku", "images": ["img/item0_0.jpg"]})
    catalog.write()
    res = build_snapshot(BuildSpec(
        catalog=catalog.path, store="store1", out_dir=tmp_path / "snap", private_key=signing_key,
        embedder=embedder, progress=False
    ))
    r = json.loads(res.report_path.read_text()) if res.report_path else {}
    assert {b["source"] for b in r["bad_images"]} == {
        "bad/empty.jpg",
        "bad/trunc.jpg",
        "bad/text.jpg",
        "bad/bomb.png",
        "bad/nope.jpg",
    }
    assert r["items_without_images"] == ["ONLY-BAD"]
    assert r["bad_rows"][0]["row"] == 14 and "sku" in r["bad_rows"][0]["error"]
    m = verify_snapshot(res.out_dir, [signing_key.public_key()], model_id=embedder.model_id, store="store1")
    assert (m.item_count, m.vector_count) == (12, 36)
    assert m.hnsw.ef == 100 and -3 <= m.threshold <= 3 and len(m.canary) == 8
    assert m.extra["threshold"]["method"] == "cross_fitted_lda_open_set" and m.projection is not None
    assert m.dim == m.projection.out_dim < m.model_dim
    # canaries (model space) find their own item once projected as a kiosk would
    from cloud.retrieval import Adapter

    proj = Adapter.from_bytes((res.out_dir / "projection.bin").read_bytes(), m.model_dim, m.dim)
    idx = vindex.load(res.out_dir / "index.bin", dim=m.dim, ef=m.hnsw.ef)
    sku_of = {int(r["label"]): r["sku"] for r in read_rows(res.out_dir / VECTORS)}
    import base64

    for c in m.canary:
        labels, _ = idx.search(proj.apply(np.frombuffer(base64.b64decode(c.embedding), "<f4")[None]), 1)
        assert sku_of[int(labels[0, 0])] == c.sku


def test_one_image_per_item_builds_without_a_no_match_rule(
    embedder: CountingEmbedder, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """The commonest retail catalog, one product photo per item, must build: there is nothing to hold out
    to calibrate "no match" on, so the snapshot never says it, and the report and manifest say why."""
    cat = make_catalog(tmp_path / "cat", n_items=12, per_item=1)
    res = build_snapshot(BuildSpec(catalog=cat.path, store="s", out_dir=tmp_path / "snap",
                                   private_key=signing_key, embedder=embedder, progress=False))
    m = verify_snapshot(res.out_dir, [signing_key.public_key()], model_id=embedder.model_id, store="s")
    assert m.item_count == m.vector_count == 12 and m.projection is not None
    assert m.extra["threshold"]["method"] == "uncalibrated" and "open_set" not in m.extra
    assert "0 of 12 items have two or more images" in res.report["warnings"][0]
    rule = MatchRule.from_manifest(m.threshold, m.extra)
    assert rule.is_match([-0.99]) and rule.is_match([0.1, 0.1])  # always the nearest items, never "ask staff"


def test_a_delta_never_keeps_an_uncalibrated_base_once_photos_allow_a_rule(
    embedder: CountingEmbedder, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """A delta inherits its base's "no match" decision: on a base without a rule it carries the warning
    on, and once second photos make a rule possible (the runbook's fix) the build is full and has one."""
    cat = make_catalog(tmp_path / "cat", n_items=12, per_item=1)
    v1 = build_snapshot(BuildSpec(catalog=cat.path, store="s", out_dir=tmp_path / "v1",
                                  private_key=signing_key, embedder=embedder, progress=False))
    assert v1.manifest.extra["threshold"]["method"] == "uncalibrated"
    cat.rows[5]["price"] = "9.99"
    cat.write()
    v2 = build_snapshot(BuildSpec(catalog=cat.path, store="s", out_dir=tmp_path / "v2",
                                  private_key=signing_key, embedder=embedder, base=v1.out_dir,
                                  progress=False))  # fmt: skip
    assert v2.report["kind"] == "delta" and 'never answer "no match"' in v2.report["warnings"][0]
    for i in range(4):  # 4 new vectors of 16: small enough for a delta
        cat.rows[i]["images"].append(
            str(write_jpeg(cat.dir / "img" / f"item{i}_1.jpg", item_image(i, 1)).relative_to(cat.dir))
        )
    cat.write()
    v3 = build_snapshot(BuildSpec(catalog=cat.path, store="s", out_dir=tmp_path / "v3",
                                  private_key=signing_key, embedder=embedder, base=v1.out_dir,
                                  version=3, progress=False))  # fmt: skip
    assert v3.report["kind"] == "full" and 'no "no match" rule' in v3.report["delta_fallback"]
    assert v3.manifest.extra["threshold"]["method"] == "cross_fitted_lda_open_set"
    assert not v3.report["warnings"]


def test_three_items_with_photos_enough_get_a_rule(
    embedder: CountingEmbedder, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """The smallest adapter catalog (3 items) calibrates when every item has several photos."""
    cat = make_catalog(tmp_path / "cat", n_items=3, per_item=6)
    res = build_snapshot(BuildSpec(catalog=cat.path, store="s", out_dir=tmp_path / "snap",
                                   private_key=signing_key, embedder=embedder, progress=False))
    assert res.manifest.extra["threshold"]["method"] == "cross_fitted_lda_open_set", res.report["warnings"]


def test_cache_embeds_only_changed_images(
    catalog: CatalogFiles, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """A rebuild after one image changes must run the model on that image only."""
    cache = tmp_path / "cache"
    first = CountingEmbedder()
    build_snapshot(BuildSpec(
        catalog=catalog.path, store="s", out_dir=tmp_path / "a", private_key=signing_key, embedder=first,
        cache_dir=cache, progress=False
    ))
    assert first.calls == 36
    write_jpeg(catalog.dir / "img" / "item3_1.jpg", item_image(3, 7))
    second = CountingEmbedder()
    res = build_snapshot(BuildSpec(
        catalog=catalog.path, store="s", out_dir=tmp_path / "b", private_key=signing_key, embedder=second,
        cache_dir=cache, progress=False
    ))
    assert second.calls == 1
    assert res.report["cache_hits"] == 35 and res.report["images_embedded"] == 1
    other_model = CountingEmbedder(seed=5)
    build_snapshot(BuildSpec(
        catalog=catalog.path, store="s", out_dir=tmp_path / "c", private_key=signing_key,
        embedder=other_model, cache_dir=cache, progress=False
    ))
    assert other_model.calls == 36  # the cache is keyed by model: no cross-model reuse


def test_cache_is_not_reused_across_decoder_versions(
    catalog: CatalogFiles, signing_key: Ed25519PrivateKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When decode_image's pixels change (models.images.DECODE_VERSION), cached vectors and thumbnails of
    the old pixels (e.g. transparent products on black) must not be served."""
    import cloud.cache

    cache = tmp_path / "cache"
    build_snapshot(BuildSpec(catalog=catalog.path, store="s", out_dir=tmp_path / "a", private_key=signing_key,
                             embedder=CountingEmbedder(),
                             cache_dir=cache, progress=False))  # fmt: skip
    monkeypatch.setattr(cloud.cache, "DECODE_VERSION", cloud.cache.DECODE_VERSION + 1)
    again = CountingEmbedder()
    res = build_snapshot(BuildSpec(catalog=catalog.path, store="s", out_dir=tmp_path / "b",
                                   private_key=signing_key, embedder=again, cache_dir=cache,
                                   progress=False))  # fmt: skip
    assert again.calls == 36 and res.report["cache_hits"] == 0


def test_no_usable_items_is_a_clear_error(tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    """A catalog with nothing buildable raises BuildError, not an index of zero vectors."""
    p = tmp_path / "c.jsonl"
    p.write_text('{"sku": "A", "title": "a", "images": ["missing.jpg"]}\n')
    with pytest.raises(BuildError, match="no catalog image"):
        build_snapshot(BuildSpec(catalog=p, store="s", out_dir=tmp_path / "o", private_key=signing_key,
                                 embedder=CountingEmbedder(), progress=False))


def test_threshold_separates_items() -> None:
    """Calibration puts the threshold between same-item and other-item similarities."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, 16))
    vecs = np.repeat(centres, 3, axis=0) + 0.2 * rng.standard_normal((60, 16))
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
    t, stats = plain_threshold(vecs, [f"s{i // 3}" for i in range(60)])
    assert stats["pos_mean"] > t > stats["neg_mean"]
    assert stats["pos_pass"] >= 0.95
    # one image per item: nothing to calibrate on, so never "no match" (not other items' images as a guess)
    t1, stats1 = plain_threshold(vecs[::3].copy(), [f"s{i}" for i in range(20)])
    assert (t1, stats1["method"]) == (-1.0, "uncalibrated") and "never" in stats1["warning"]


def test_build_spec_refuses_what_no_build_can_do(tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    """A bad build request (no model, features with feedback, nonsense hnsw or delta settings) used to be
    found minutes into the build, after embedding, or not at all: the spec refuses it when made."""
    base = {"catalog": tmp_path / "c.csv", "store": "s", "out_dir": tmp_path / "o",
            "private_key": signing_key}
    with pytest.raises(BuildError, match="bundle or an embedder"):
        BuildSpec(**base)  # type: ignore[arg-type]
    emb = CountingEmbedder()
    for bad, match in (({"M": 1}, "hnsw"), ({"ef": 0}, "hnsw"), ({"delta_max_fraction": 1.5}, "within"),
                       ({"version": 0}, "version"), ({"feedback_cap": 0}, "feedback_cap"),
                       ({"feedback": tmp_path, "features": object()}, "not both")):
        with pytest.raises(BuildError, match=match):
            BuildSpec(**base, embedder=emb, **bad)  # type: ignore[arg-type]


def test_an_output_that_holds_something_else_is_refused_and_left_as_it_is(
    catalog: CatalogFiles, tmp_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    """Guards: `--out` naming the catalog file or a photo folder by mistake. The build replaces its output
    whole and moved such a path aside as `.NAME.old`, which the next build deleted."""

    def build(out: Path) -> Path:
        spec = BuildSpec(catalog=catalog.path, store="s1", out_dir=out, private_key=signing_key,
                         embedder=CountingEmbedder(), progress=False)
        return build_snapshot(spec).out_dir

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "front.jpg").write_bytes(b"the retailer's photo")
    for out, what in ((catalog.path, "is a file"), (photos, "holds no snapshot")):
        before = sorted((p.name, p.read_bytes()) for p in ([out] if out.is_file() else out.iterdir()))
        with pytest.raises(BuildError, match=what):
            build(out)
        assert sorted((p.name, p.read_bytes()) for p in ([out] if out.is_file() else out.iterdir())) == before
        assert not out.with_name(f".{out.name}.old").exists()
    (tmp_path / "empty").mkdir()
    snap = build(tmp_path / "empty")  # a new folder made beforehand is fine, and so is a rebuild over it
    assert build(snap) == snap and verify_snapshot(snap, [signing_key.public_key()]).version == 1

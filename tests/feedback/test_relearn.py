"""`catalog build --feedback`: approved store photos join their products, with provenance, a cap per
product, deletion on a later rejection, re-calibration, and the auto-review rule."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.build import BuildError, BuildSpec, build_snapshot
from cloud.delta import VECTORS, read_rows
from cloud.feedback.auto import WHO, ReviewSpace, auto_review, auto_review_all
from cloud.feedback.relearn import farthest_points
from cloud.feedback.store import FeedbackStore
from cloud.open_set import fit_for_snapshot
from storelens.feedback import make_feedback
from storelens.snapshot import verify_snapshot
from tests.cloud.conftest import (  # the cloud tests' fixtures, shared here
    CatalogFiles,
    CountingEmbedder,
    catalog,
    embedder,
    item_image,
    make_catalog,
    signing_key,
)

__all__ = ["catalog", "embedder", "signing_key"]  # fixtures, imported for pytest


def _put(fb: FeedbackStore, emb: CountingEmbedder, item: int, variant: int, *, answer: str = "confirmed",
         sku_item: int | None = None, store: str = "s", msg_id: str | None = None) -> str:  # fmt: skip
    """Store one kiosk message: a store photo of ``item`` confirmed as ``sku_item`` (default: itself)."""
    img = item_image(item, variant)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    chosen = f"SKU-{item if sku_item is None else sku_item:03d}" if answer == "confirmed" else None
    msg = make_feedback(
        store=store, kiosk="k1", match_id=f"m{item}x{variant}", answer=answer,  # type: ignore[arg-type]
        chosen_sku=chosen, shown=[], model=emb.model_id, snapshot=1,
        vector=emb.embed([cv2.imdecode(buf, cv2.IMREAD_COLOR)])[0], crop_jpeg=buf.tobytes(),
        id=msg_id or f"{store}-{item}-{variant}-{sku_item}",
    )  # fmt: skip
    return fb.put(msg)[0]


def _store_rows(snap: Path) -> list[dict[str, object]]:
    return [r for r in read_rows(snap / VECTORS) if r.get("source") == "store"]


def _build(cat: CatalogFiles, emb: CountingEmbedder, key: Ed25519PrivateKey, out: Path, **kw: object):  # type: ignore[no-untyped-def]
    return build_snapshot(BuildSpec(catalog=cat.path, store="s", out_dir=out, private_key=key, embedder=emb,  # type: ignore[arg-type]
                                    progress=False, **kw))


def test_approved_store_photos_join_their_products_with_provenance(
    embedder: CountingEmbedder, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """Only approved photos of this store's catalog products may enter the index, each marked as a store
    photo with its record; pending, rejected, not-here, other stores' and unknown products' are left out
    and counted, and the retailer's rows stay marked as catalog."""
    cat = make_catalog(tmp_path / "cat", n_items=12, per_item=1)
    fb = FeedbackStore(tmp_path / "fb")
    ok = [_put(fb, embedder, i, 5) for i in range(6)]
    pending = _put(fb, embedder, 7, 5)
    rejected = _put(fb, embedder, 8, 5)
    other = _put(fb, embedder, 9, 5, store="t")
    unknown = _put(fb, embedder, 10, 5, sku_item=999)
    not_here = _put(fb, embedder, 11, 5, answer="not_here")
    for rid in [*ok, rejected, other, unknown]:
        fb.decide(rid, "approved", who="staff")
    fb.decide(rejected, "rejected", who="staff")
    fb.decide(not_here, "not_carried", who="staff")
    res = _build(cat, embedder, signing_key, tmp_path / "v1", feedback=tmp_path / "fb")
    verify_snapshot(res.out_dir, [signing_key.public_key()], model_id=embedder.model_id, store="s")
    rows = read_rows(res.out_dir / VECTORS)
    store = _store_rows(res.out_dir)
    assert sorted(str(r["record"]) for r in store) == sorted(ok)
    assert pending not in {r["record"] for r in store}
    assert {r["sku"] for r in store} == {f"SKU-{i:03d}" for i in range(6)}
    assert [r["source"] for r in rows].count("catalog") == 12 and len(rows) == 18
    fbr = res.report["feedback"]
    assert (fbr["approved"], fbr["store_photos"], fbr["skipped_other_store"], fbr["skipped_unknown_sku"]) == (
        7, 6, 1, 1)  # fmt: skip
    assert fbr["unknown_skus"] == ["SKU-999"]
    assert {r["sku"]: r["vectors"] for r in read_rows(res.out_dir / "items.jsonl")}["SKU-000"] == 2


def test_store_photos_calibrate_no_match_on_a_one_photo_catalog(
    embedder: CountingEmbedder, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """A one-photo catalog ships without a "no match" rule; with approved store photos of its products the
    build must re-calibrate one (else kiosks keep answering unknown products with their nearest item)."""
    cat = make_catalog(tmp_path / "cat", n_items=12, per_item=1)
    fb = FeedbackStore(tmp_path / "fb")
    for i in range(12):
        for v in (3, 4, 5):
            fb.decide(_put(fb, embedder, i, v), "approved", who="staff")
    plain = _build(cat, embedder, signing_key, tmp_path / "v1")
    assert plain.manifest.extra["threshold"]["method"] == "uncalibrated"
    res = _build(cat, embedder, signing_key, tmp_path / "v2", feedback=tmp_path / "fb", base=plain.out_dir)
    assert res.report["delta_fallback"] and res.manifest.kind == "full"
    assert res.manifest.extra["threshold"]["method"] == "cross_fitted_lda_open_set"
    assert res.manifest.threshold > -1 and not res.report["warnings"]


def test_a_photo_rejected_later_leaves_the_next_snapshot_as_a_delta(
    embedder: CountingEmbedder, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """Deletion: a photo approved, shipped, then rejected must be gone from the next build, which ships
    as a signed delta deleting its vector (and a re-approval would bring it back)."""
    cat = make_catalog(tmp_path / "cat", n_items=12, per_item=3)
    fb = FeedbackStore(tmp_path / "fb")
    rids = [_put(fb, embedder, i, 7) for i in range(3)]
    for rid in rids:
        fb.decide(rid, "approved", who="staff")
    v1 = _build(cat, embedder, signing_key, tmp_path / "v1", feedback=tmp_path / "fb")
    assert {r["record"] for r in _store_rows(v1.out_dir)} == set(rids)
    fb.decide(rids[1], "rejected", who="staff", note="shows a customer's bag")
    v2 = _build(cat, embedder, signing_key, tmp_path / "v2", feedback=tmp_path / "fb", base=v1.out_dir)
    m = v2.manifest
    assert m.kind == "delta" and m.extra["delta"]["deleted"] == 1 and m.extra["delta"]["added"] == 0
    gone = [r["label"] for r in _store_rows(v1.out_dir) if r["record"] == rids[1]]
    assert json.loads((v2.out_dir / "removed.json").read_text())["labels"] == gone
    full = _build(cat, embedder, signing_key, tmp_path / "v3", feedback=tmp_path / "fb")
    assert {r["record"] for r in _store_rows(full.out_dir)} == {rids[0], rids[2]}


def test_the_cap_keeps_the_most_diverse_store_photos(
    embedder: CountingEmbedder, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """Past the cap per product, near-duplicates must go first: the index stays small and keeps the
    views that differ from the catalog photo; the report counts what the cap left out."""
    cat = make_catalog(tmp_path / "cat", n_items=6, per_item=2)
    fb = FeedbackStore(tmp_path / "fb")
    for v in range(2, 9):
        fb.decide(_put(fb, embedder, 0, v), "approved", who="staff")
    res = _build(cat, embedder, signing_key, tmp_path / "v1", feedback=tmp_path / "fb", feedback_cap=3)
    assert len(_store_rows(res.out_dir)) == 3 and res.report["feedback"]["over_cap"] == 4
    # farthest-point selection itself: a near-duplicate of an anchor is never picked before a new view
    anchors = np.array([[1.0, 0.0, 0.0]], np.float32)
    cands = np.array([[0.999, 0.045, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.99, 0.14]], np.float32)
    cands /= np.linalg.norm(cands, axis=1, keepdims=True)
    assert farthest_points(anchors, cands, 2) == [1, 2]
    assert farthest_points(anchors, cands, 9) == [0, 1, 2, 3] and farthest_points(anchors, cands, 0) == []


def test_store_photo_views_join_the_fit_only_and_are_cached(
    embedder: CountingEmbedder, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """A centre crop of each store photo must reach the adapter's fit but never the index (vectors cost
    every kiosk bytes), and a rebuild must not embed the views again."""
    cat = make_catalog(tmp_path / "cat", n_items=6, per_item=1)
    fb = FeedbackStore(tmp_path / "fb")
    for i in range(6):
        fb.decide(_put(fb, embedder, i, 2), "approved", who="staff")
    before = embedder.calls
    fbk = {"feedback": tmp_path / "fb", "cache_dir": tmp_path / "c"}
    res = _build(cat, embedder, signing_key, tmp_path / "v1", **fbk)
    assert embedder.calls - before == 6 + 6 + 6  # catalog photos, store photos, their views
    assert res.manifest.vector_count == 12 and len(_store_rows(res.out_dir)) == 6
    before = embedder.calls
    _build(cat, embedder, signing_key, tmp_path / "v2", **fbk)
    assert embedder.calls == before
    # the views change the fit; a view of no row is a programming error
    x = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
    skus = ["a", "a", "b", "b", "c", "c", "d", "d"]
    plain = fit_for_snapshot(x, skus, "lda")[0]
    more = fit_for_snapshot(x, skus, "lda", (x[:2] + 0.5, np.array([0, 2])))[0]
    assert plain is not None and more is not None and not np.allclose(plain.matrix, more.matrix)
    with pytest.raises(ValueError, match="rows of the 8 vectors"):
        fit_for_snapshot(x, skus, "lda", (x[:1], np.array([8])))


def test_a_missing_feedback_folder_is_a_clear_build_error(
    catalog: CatalogFiles, embedder: CountingEmbedder, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """A mistyped --feedback path must fail the build by name, not build a snapshot without the photos."""
    with pytest.raises(BuildError, match=r"feedback folder .*nope.* does not exist"):
        _build(catalog, embedder, signing_key, tmp_path / "v1", feedback=tmp_path / "nope")
    assert not (tmp_path / "v1").exists()


def test_auto_review_approves_agreement_and_leaves_conflicts_for_staff(
    embedder: CountingEmbedder, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """A confirmation whose crop is nearest its product is approved as auto:knn; a mis-tap (a photo of
    item 2 confirmed as item 3), a "not here" and a record staff already decided are never auto-decided."""
    cat = make_catalog(tmp_path / "cat", n_items=12, per_item=3)
    snap = _build(cat, embedder, signing_key, tmp_path / "v1").out_dir
    fb = FeedbackStore(tmp_path / "fb")
    right = _put(fb, embedder, 1, 6)
    mistap = _put(fb, embedder, 2, 6, sku_item=3)
    not_here = _put(fb, embedder, 4, 6, answer="not_here")
    staff = _put(fb, embedder, 5, 6)
    fb.decide(staff, "rejected", who="anna")
    space = ReviewSpace.load(snap)
    e = auto_review(fb, right, space)
    assert e is not None and e.who == WHO and fb.get(right).label_sku == "SKU-001"
    assert auto_review(fb, mistap, space) is None and fb.get(mistap).status == "pending"
    assert auto_review(fb, not_here, space) is None and fb.get(not_here).status == "pending"
    assert auto_review(fb, staff, space) is None and fb.get(staff).status == "rejected"
    later = _put(fb, embedder, 6, 6)
    s = auto_review_all(fb, "s", ReviewSpace.load(snap))
    assert (s.approved, s.left_pending, s.not_confirmations) == (1, 1, 1)
    assert fb.get(later).decided_by == WHO and fb.get(mistap).decided_by is None


def test_the_cli_reviews_and_refuses_bad_paths_in_one_line(
    embedder: CountingEmbedder, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """`feedback auto-review` approves what agrees and says so; a missing feedback folder or a path that
    is not a snapshot, and `catalog build --feedback` of a missing folder, are one line and exit 2."""
    import typer
    from typer.testing import CliRunner

    from cloud.cli import catalog_app, feedback_app
    from cloud.feedback.cli import register

    app = typer.Typer()
    register(feedback_app)
    app.add_typer(feedback_app, name="feedback")
    app.add_typer(catalog_app, name="catalog")
    runner = CliRunner()
    cat = make_catalog(tmp_path / "cat", n_items=12, per_item=3)
    snap = _build(cat, embedder, signing_key, tmp_path / "v1").out_dir
    fb = FeedbackStore(tmp_path / "fb")
    rid = _put(fb, embedder, 1, 6)
    args = ["feedback", "auto-review", "--store", "s", "--feedback-dir", str(tmp_path / "fb")]
    r = runner.invoke(app, [*args, "--snapshot", str(snap)])
    assert r.exit_code == 0 and "auto-approved 1" in r.output, r.output
    assert fb.get(rid).decided_by == WHO
    r = runner.invoke(app, [*args, "--snapshot", str(tmp_path / "cat")])
    assert r.exit_code == 2 and "not a usable snapshot" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["feedback", "auto-review", "--store", "s", "--feedback-dir",
                            str(tmp_path / "nope"), "--snapshot", str(snap)])  # fmt: skip
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(app, ["catalog", "build", "--catalog", str(cat.path), "--bundle", str(tmp_path),
                            "--store", "s", "--out", str(tmp_path / "v9"), "--key", str(tmp_path / "k.pem"),
                            "--feedback", str(tmp_path / "nope")])  # fmt: skip
    assert r.exit_code == 2 and "error:" in r.output and "Traceback" not in r.output


def test_not_carried_photos_ship_as_rejection_rows_the_kiosk_applies(
    embedder: CountingEmbedder, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """A product staff marked "not carried" must be answered "no match" when held up again (its photos
    ship signed beside the index, never as a product), while carried products still match; a delta
    cannot carry the rows, so the next build on that base is full; rows the store photos cannot calibrate
    (none approved yet) are not shipped."""
    from device.sync.active import ActiveSnapshot
    from storelens.matching import NOT_CARRIED_KEY

    cat = make_catalog(tmp_path / "cat", n_items=12, per_item=3)
    fb = FeedbackStore(tmp_path / "fb")
    for v in (1, 2):
        fb.decide(_put(fb, embedder, 20, v, answer="not_here"), "not_carried", who="staff")
    _put(fb, embedder, 21, 1, answer="not_here")  # not decided by staff: not used
    early = _build(cat, embedder, signing_key, tmp_path / "v0", feedback=tmp_path / "fb")
    assert NOT_CARRIED_KEY not in early.manifest.extra and not (early.out_dir / "not_carried.f32").exists()
    for i in range(12):
        for v in (3, 4):
            fb.decide(_put(fb, embedder, i, v), "approved", who="staff")
    res = _build(cat, embedder, signing_key, tmp_path / "v1", feedback=tmp_path / "fb")
    verify_snapshot(res.out_dir, [signing_key.public_key()], model_id=embedder.model_id, store="s")
    assert res.manifest.extra[NOT_CARRIED_KEY]["count"] == 2 and res.report["feedback"]["not_carried"] == 2
    assert {r["sku"] for r in read_rows(res.out_dir / VECTORS)} == {f"SKU-{i:03d}" for i in range(12)}
    snap = ActiveSnapshot.load(res.out_dir, res.manifest)

    def refused(item: int) -> bool:
        frames = [embedder.embed([item_image(item, v)])[0] for v in (7, 8)]
        one = snap.not_carried(frames[:1], snap.search(frames[0][None, :], 5)[0][0].score)
        assert one == snap.not_carried(frames, snap.search(frames[0][None, :], 5)[0][0].score)
        return one

    assert refused(20)
    assert not any(refused(i) for i in range(12))
    v2 = _build(cat, embedder, signing_key, tmp_path / "v2", feedback=tmp_path / "fb", base=res.out_dir)
    assert v2.manifest.kind == "full" and "not-carried" in v2.report["delta_fallback"]

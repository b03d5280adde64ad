"""The model step of the loop: approved store photos -> a tuned bundle, and the build's mis-tap filter."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from cloud.catalog import load_catalog, write_catalog
from cloud.feedback.relearn import likely_mistaps, select_approved
from cloud.feedback.relearn_model import RelearnModelError, relearn_bundle, training_set
from cloud.feedback.store import FeedbackStore
from models.bundle import read_manifest
from models.export import export_model
from storelens.feedback import make_feedback
from tests.cloud.conftest import item_image


def _confirm(fb: FeedbackStore, model_id: str, item: int, variant: int, sku: str) -> str:
    ok, buf = cv2.imencode(".jpg", item_image(item, variant, size=64), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    msg = make_feedback(store="s", kiosk="k1", match_id=f"m{item}-{variant}", answer="confirmed",
                        chosen_sku=sku, shown=[], model=model_id, snapshot=1, vector=np.ones(8),
                        crop_jpeg=buf.tobytes(), id=f"{item}-{variant}")  # fmt: skip
    rid = fb.put(msg)[0]
    fb.decide(rid, "approved", who="staff")
    return rid


def test_relearn_tunes_a_new_bundle_on_catalog_and_store_photos(tmp_path: Path) -> None:
    """The release step needs a bundle tuned on the approved store photos (never anything else): a new
    model_id whose manifest names its base; too few store photos must be refused, not tuned on."""
    base = tmp_path / "base"
    export_model("tiny", base, precision="fp16")
    rows = []
    for i in range(3):
        p = tmp_path / "cat" / f"{i}.jpg"
        p.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(p), item_image(i, 0, size=64))
        rows.append({"sku": f"S{i}", "title": f"item {i}", "images": f"{i}.jpg"})
    write_catalog(tmp_path / "cat" / "catalog.jsonl", rows)
    cat = load_catalog(tmp_path / "cat" / "catalog.jsonl")
    fb = FeedbackStore(tmp_path / "fb")
    _confirm(fb, "ab" * 8, 0, 1, "S0")
    with pytest.raises(RelearnModelError, match="too few"):
        relearn_bundle(base, cat.items, select_approved(fb.root, "s", cat.items), tmp_path / "no")
    assert not (tmp_path / "no").exists()
    for i in range(3):
        for v in (2, 3):
            _confirm(fb, "ab" * 8, i, v, f"S{i}")
    sel = select_approved(fb.root, "s", cat.items)
    images = training_set(cat.items, sel)
    assert sum(t.store_photo for t in images) == 7 and sum(not t.store_photo for t in images) == 3
    left_out = str(sel.photos["S0"][0].path)
    assert left_out not in {t.source for t in training_set(cat.items, sel, exclude=frozenset({left_out}))}
    manifest, report = relearn_bundle(base, cat.items, sel, tmp_path / "tuned", base_dir=cat.base_dir,
                                      convs=2, epochs=1)  # fmt: skip
    assert report.images == 10 and report.items == 3
    assert manifest.model_id == read_manifest(tmp_path / "tuned").model_id != read_manifest(base).model_id


def test_a_mistapped_store_photo_is_left_out_and_true_ones_kept() -> None:
    """Guards a customer's wrong tap moving a product: a store photo lying among another product's photos
    is flagged; its product's true photos are not, nor any photo of a product with too few to judge."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 32)).astype(np.float32)
    vecs, skus, store = [], [], []
    for p in range(6):
        for j in range(7):  # one catalog photo, six store photos
            vecs.append(centres[p] + 0.25 * rng.normal(size=32))
            skus.append(f"P{p}")
            store.append(j > 0)
    vecs.append(centres[3] + 0.25 * rng.normal(size=32))  # a photo of P3 ...
    skus.append("P0")  # ... tapped as P0
    store.append(True)
    x = np.asarray(vecs, np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    flagged = likely_mistaps(x, skus, np.asarray(store))
    assert flagged[-1] and not flagged[:-1].any()
    assert not likely_mistaps(x, skus, np.asarray(store), min_photos=8).any()

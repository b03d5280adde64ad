"""Catalog featurization: one decode per image, one thumbnail per item, errors pinned to their image."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from cloud import featurize as fz
from cloud.catalog import Item
from cloud.featurize import featurize, make_thumbnail
from models.fake import FakeEmbedder
from models.images import decode_image
from tests.cloud.conftest import CountingEmbedder, item_image, write_jpeg


def _items(root: Path, n_items: int, per_item: int, size: int = 96) -> list[Item]:
    items = []
    for i in range(n_items):
        paths = [str(write_jpeg(root / f"i{i}_{v}.jpg", item_image(i, v, size))) for v in range(per_item)]
        items.append(Item(f"SKU-{i}", f"Item {i}", None, None, (), tuple(paths), i + 1))
    return items


class _CountingDecoder:
    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, data: bytes) -> npt.NDArray[np.uint8]:
        with self._lock:
            self.calls += 1
        return decode_image(data)


def test_vectors_match_the_model_on_each_image_in_catalog_order(tmp_path: Path) -> None:
    """Threaded embedding must not mix up images: row k holds the vector of row k's image."""
    items = _items(tmp_path, 9, 4)
    emb = FakeEmbedder(dim=24, seed=3)
    feats = featurize(items, emb, base_dir=tmp_path, progress=False)
    assert feats.embedded == 36 and not feats.bad_images
    assert [r.source for r in feats.rows] == [src for it in items for src in it.images]
    for row, vec in zip(feats.rows, feats.vectors, strict=True):
        expected = emb.embed_one(decode_image(Path(row.source).read_bytes()))
        np.testing.assert_allclose(vec, expected, rtol=1e-5, atol=1e-6)


def test_each_image_decoded_once_and_one_thumbnail_per_item(tmp_path: Path) -> None:
    """Embedding and thumbnailing must share one decode, and only the item's first photo is thumbnailed."""
    items = _items(tmp_path, 5, 3, size=400)
    decoder = _CountingDecoder()
    feats = featurize(items, CountingEmbedder(), base_dir=tmp_path, progress=False, decode=decoder)
    assert decoder.calls == 15
    assert set(feats.thumbs) == {it.sku for it in items}
    first = decode_image(Path(items[0].images[0]).read_bytes())
    assert feats.thumbs["SKU-0"] == make_thumbnail(first)
    thumb = cv2.imdecode(np.frombuffer(feats.thumbs["SKU-0"], np.uint8), cv2.IMREAD_COLOR)
    assert thumb is not None and max(thumb.shape[:2]) == fz.THUMB_PX


def test_item_with_a_bad_first_photo_gets_a_thumbnail_from_its_first_good_one(tmp_path: Path) -> None:
    """A broken first photo must not leave the item without a thumbnail on the kiosk screen."""
    items = _items(tmp_path, 2, 2)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    items[1] = Item("SKU-1", "Item 1", None, None, (), (str(tmp_path / "broken.jpg"), *items[1].images), 2)
    feats = featurize(items, CountingEmbedder(), base_dir=tmp_path, progress=False)
    assert [b["source"] for b in feats.bad_images] == [str(tmp_path / "broken.jpg")]
    good = decode_image(Path(items[1].images[1]).read_bytes())
    assert feats.thumbs["SKU-1"] == make_thumbnail(good)


class _FailsOnWide:
    """embed_one that raises for images wider than tall (a runtime error on one crop)."""

    def __init__(self) -> None:
        self._inner = FakeEmbedder(dim=8)
        self.dim, self.model_id = 8, self._inner.model_id

    def embed_one(self, crop: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        if crop.shape[1] > crop.shape[0]:
            raise RuntimeError("inference failed")
        return self._inner.embed_one(crop)

    def embed(self, crops: Sequence[npt.NDArray[np.uint8]]) -> npt.NDArray[np.float32]:
        return np.stack([self.embed_one(c) for c in crops])


def test_an_inference_error_is_reported_against_its_image(tmp_path: Path) -> None:
    """One image failing in the model must be reported with its source, and the rest still embedded."""
    items = _items(tmp_path, 4, 2)
    wide = write_jpeg(tmp_path / "wide.jpg", np.zeros((40, 90, 3), np.uint8))
    items[2] = Item("SKU-2", "Item 2", None, None, (), (*items[2].images, str(wide)), 3)
    feats = featurize(items, _FailsOnWide(), base_dir=tmp_path, progress=False)
    assert len(feats.rows) == 8
    assert [(b["sku"], b["source"]) for b in feats.bad_images] == [("SKU-2", str(wide))]
    assert "inference failed" in feats.bad_images[0]["error"]


def test_a_jpeg_claiming_a_huge_frame_is_refused_before_decoding(tmp_path: Path) -> None:
    """The fast JPEG header path must still refuse decompression bombs by their frame size."""
    items = _items(tmp_path, 2, 1)
    data = bytearray(Path(items[1].images[0]).read_bytes())
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") * 2
    Path(items[1].images[0]).write_bytes(bytes(data))
    feats = featurize(items, CountingEmbedder(), base_dir=tmp_path, progress=False)
    assert [b["sku"] for b in feats.bad_images] == ["SKU-1"]
    assert "60000x60000" in feats.bad_images[0]["error"]


class _GatedEmbedder:
    """embed_one blocks until released; counts how many decoded photos wait at most."""

    def __init__(self, decoder: _CountingDecoder, total: int) -> None:
        self._inner = FakeEmbedder(dim=8)
        self.dim, self.model_id = 8, self._inner.model_id
        self._all_decoded = threading.Event()
        self._decoder, self._total = decoder, total
        self.max_waiting = 0
        self._done = 0
        self._lock = threading.Lock()

    def embed_one(self, crop: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        # The first inferences stall for up to 1 s: unbounded buffering would decode every photo meanwhile.
        if self._decoder.calls < self._total and not self._all_decoded.wait(timeout=1.0):
            self._all_decoded.set()  # bounded, as it should be: let the rest run
        with self._lock:
            self.max_waiting = max(self.max_waiting, self._decoder.calls - self._done)
            self._done += 1
        return self._inner.embed_one(crop)

    def embed(self, crops: Sequence[npt.NDArray[np.uint8]]) -> npt.NDArray[np.float32]:
        return np.stack([self.embed_one(c) for c in crops])


def test_decoded_photos_waiting_for_the_model_are_bounded(tmp_path: Path) -> None:
    """A slow model must stall decoding after a few photos, not hold the whole catalog in memory."""
    items = _items(tmp_path, 80, 1)
    decoder = _CountingDecoder()
    emb = _GatedEmbedder(decoder, total=80)
    feats = featurize(items, emb, base_dir=tmp_path, progress=False, decode=decoder)
    assert len(feats.rows) == 80
    # Decoded photos live in the decoder's chunk, the queue's chunks and the chunk each embed thread holds.
    bound = (fz.DECODE_THREADS + fz.QUEUE_DEPTH + 1) * fz.CHUNK
    assert emb.max_waiting <= bound < 80


@pytest.mark.parametrize(("h", "w"), [(348, 348), (464, 348), (1000, 7), (161, 320), (50, 40)])
def test_thumbnail_longest_side(h: int, w: int) -> None:
    """Thumbnails keep the aspect ratio and a longest side of THUMB_PX (never upscaled)."""
    jpeg = make_thumbnail(np.full((h, w, 3), 127, np.uint8))
    out = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert out is not None and max(out.shape[:2]) == min(fz.THUMB_PX, max(h, w))
    assert abs(out.shape[0] / out.shape[1] - h / w) < 0.2 * h / w + 0.1

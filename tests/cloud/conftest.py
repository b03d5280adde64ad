"""Fixtures for catalog/snapshot tests: signing keys, a generated image catalog, a counting fake embedder."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from models.fake import FakeEmbedder


class CountingEmbedder:
    """FakeEmbedder that counts the crops it embeds (cache tests) and can pose as another model."""

    def __init__(self, dim: int = 32, seed: int = 0) -> None:
        self._inner = FakeEmbedder(dim=dim, seed=seed)
        self.dim = dim
        self.model_id = self._inner.model_id
        self.preprocessing_hash = "fake-preprocessing"
        self.calls = 0

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        self.calls += len(crops)
        return self._inner.embed(crops)


def item_image(item: int, variant: int, size: int = 96) -> np.ndarray:
    """A BGR picture unique to ``item``: coloured blocks; ``variant`` adds a little seeded noise."""
    rng = np.random.default_rng(1000 + item)
    blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = cv2.resize(blocks, (size, size), interpolation=cv2.INTER_NEAREST).astype(np.int16)
    noise = np.random.default_rng(item * 100 + variant).integers(-12, 13, img.shape)
    return np.clip(img + noise * (variant > 0), 0, 255).astype(np.uint8)


def write_jpeg(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok
    path.write_bytes(buf.tobytes())
    return path


@dataclass
class CatalogFiles:
    dir: Path
    path: Path
    rows: list[dict[str, Any]]

    def write(self) -> Path:
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        return self.path


def make_catalog(root: Path, n_items: int = 12, per_item: int = 3) -> CatalogFiles:
    """A JSON Lines catalog of ``n_items`` items with ``per_item`` generated photos each (relative paths)."""
    rows = []
    for i in range(n_items):
        imgs = [
            str(write_jpeg(root / "img" / f"item{i}_{v}.jpg", item_image(i, v)).relative_to(root))
            for v in range(per_item)
        ]
        rows.append(
            {
                "sku": f"SKU-{i:03d}",
                "title": f"Item {i}",
                "price": f"{1 + i}.50",
                "location": f"Aisle {i % 4}",
                "images": imgs,
            }
        )
    cat = CatalogFiles(root, root / "catalog.jsonl", rows)
    cat.write()
    return cat


@pytest.fixture(scope="session")
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def embedder() -> CountingEmbedder:
    return CountingEmbedder()


@pytest.fixture
def catalog(tmp_path: Path) -> CatalogFiles:
    return make_catalog(tmp_path / "cat")

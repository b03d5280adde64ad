"""Catalogs of rendered products written as a retailer's CSV with photo files (bench suites, e2e tests)."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2

from device.camera.port import Image


def catalog_views(img: Image) -> list[Image]:
    """Catalog photos of one product: as rendered, on a white margin, relit, smaller (the LDA fit and the
    "no match" rule need several images per item)."""
    return [
        img,
        cv2.copyMakeBorder(img, 20, 20, 20, 20, cv2.BORDER_CONSTANT, value=(255, 255, 255)),
        cv2.convertScaleAbs(img, alpha=0.9, beta=10),
        cv2.resize(img, None, fx=0.8, fy=0.8, interpolation=cv2.INTER_AREA),
    ]


def write_catalog(root: Path, products: Sequence[Mapping[str, str]], images: Sequence[Image]) -> Path:
    """``root/catalog.csv`` naming ``catalog_views`` of each product's image, written as
    ``root/photos/<sku>-<n>.jpg``; ``products`` are the rows without ``images`` (sku first)."""
    photos = root / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    rows = []
    for product, img in zip(products, images, strict=True):
        names = []
        for j, view in enumerate(catalog_views(img)):
            name = f"photos/{product['sku']}-{j}.jpg"
            if not cv2.imwrite(str(root / name), view):
                raise OSError(f"could not write {root / name}")
            names.append(name)
        rows.append({**product, "images": ";".join(names)})
    catalog = root / "catalog.csv"
    with catalog.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return catalog

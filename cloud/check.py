"""`storelens catalog check`: what a build of this catalog would keep, skip and warn about, without a model.

A retailer runs it on the file their shop system exported before handing it over: every row is validated,
every image fetched and decoded (as the build would), and the "no match" readiness is estimated from how
many items have two or more usable photos (``cloud.open_set``: one is held out as a customer's photo).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud.catalog import FetchError, Item, fetch_image_bytes, load_catalog
from cloud.feeds.download import Downloader, http_sources
from cloud.feeds.summary import catalog_fields
from cloud.retrieval import multi_image_items
from models.errors import BadImage
from models.images import decode_image

WORKERS = 4  # fetching and decoding release the GIL; URLs wait on the network


@dataclass(slots=True)
class CheckReport:
    rows: int = 0
    items: int = 0  # valid items (for the store, when one is given)
    format: str = "csv"
    items_read: int = 0  # valid items in the whole feed
    merged_rows: int = 0  # rows that added to a SKU listed on an earlier row
    images_listed: int = 0
    images_repeated: int = 0
    conflicts: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # kind -> sku, kept, other
    bad_rows: list[dict[str, Any]] = field(default_factory=list)
    bad_images: list[dict[str, Any]] = field(default_factory=list)
    items_without_images: list[str] = field(default_factory=list)  # every image of the item is bad
    images_ok: int = 0
    items_multi_image: int = 0  # items with two or more usable images
    shared_photos: list[list[str]] = field(default_factory=list)  # skus sharing an identical photo
    warnings: list[str] = field(default_factory=list)

    @property
    def buildable(self) -> bool:
        return self.items > len(self.items_without_images)


def _image(source: str, base_dir: Path, s3_client: Any, downloader: Any) -> tuple[str | None, str | None]:
    """(sha256 of a usable image, error): exactly one is None."""
    try:
        data = fetch_image_bytes(source, base_dir, s3_client=s3_client, downloader=downloader)
        decode_image(data)
    except (FetchError, BadImage) as exc:
        return None, str(exc)
    return hashlib.sha256(data).hexdigest(), None


def check_catalog(
    path: Path,
    *,
    store: str | None = None,
    s3_client: Any = None,
    location_column: str | None = None,
    progress: bool = False,
) -> CheckReport:
    """Validate ``path`` as ``catalog build`` would; CatalogError if the file itself is unreadable."""
    cat = load_catalog(path, location_column=location_column, progress=progress)
    items: list[Item] = cat.for_store(store) if store is not None else cat.items
    rep = CheckReport(items=len(items), **catalog_fields(cat))
    jobs = [(it, src) for it in items for src in it.images]
    urls = http_sources(src for _, src in jobs)
    images_dir = Path(tempfile.mkdtemp(prefix="storelens-check-")) if urls else None
    try:
        downloader = Downloader(images_dir) if images_dir is not None else None
        if downloader is not None:
            downloader.prefetch(urls, progress=progress)
        with ThreadPoolExecutor(WORKERS) as pool:
            results = list(pool.map(lambda j: _image(j[1], cat.base_dir, s3_client, downloader), jobs))
    finally:
        if images_dir is not None:
            shutil.rmtree(images_dir, ignore_errors=True)
    usable: list[str] = []  # the sku of every usable image, as the build would index them
    skus_of: dict[str, set[str]] = {}
    for (it, src), (sha, err) in zip(jobs, results, strict=True):
        if sha is not None:
            usable.append(it.sku)
            skus_of.setdefault(sha, set()).add(it.sku)
        else:
            rep.bad_images.append({"row": it.row, "sku": it.sku, "source": src, "error": err})
    rep.shared_photos = sorted(sorted(s) for s in skus_of.values() if len(s) > 1)
    rep.images_ok = len(usable)
    with_images = set(usable)
    rep.items_without_images = [it.sku for it in items if it.sku not in with_images]
    multi = multi_image_items(usable)
    rep.items_multi_image = multi.multi
    if usable and not multi.enough:  # what the build's calibration requires
        rep.warnings.append(
            f"only {multi.multi} items have two or more usable photos ({multi.needed} at least, better "
            "dozens): kiosks will never answer \"no match\"; add a second, store-like photo (on a shelf, "
            "in a hand) of more items"
        )
    for group in rep.shared_photos[:20]:
        rep.warnings.append(f"items {', '.join(group)} share an identical photo: the kiosk cannot tell them "
                            "apart by it")  # fmt: skip
    if len(rep.shared_photos) > 20:
        rep.warnings.append(f"... and {len(rep.shared_photos) - 20} more groups of items sharing a photo")
    return rep

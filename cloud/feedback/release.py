"""Relearn the model too: enough approved store photos -> a tuned bundle + its snapshot, as ONE release.

When a store has enough approved store photos (``Threshold``: at least ``min_products`` of its products
with at least ``min_photos`` each), the cloud tunes a new bundle on them and the retailer's own photos
(``Tuner``, by default ``CatalogTuner``: ``models.tune.tune_bundle`` on a small catalog of both), builds
the store's snapshot with that bundle and the approved photos (``catalog build --feedback``: rows marked
``store``), and publishes both as one signed release (``cloud.fleet.release.build_release``). The release
then goes through the usual staged rollout (``storelens fleet rollout``: canary gate, probation, rollback);
the snapshot names the tuned model_id, so it only loads on kiosks that switch to the tuned bundle with it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.catalog import (
    CatalogError,
    Item,
    load_catalog,
    write_catalog,
)
from cloud.feedback.relearn import FeedbackError, Selection, StorePhoto, select_approved
from cloud.feedback.relearn_model import RELEARN_TUNE_CONVS, RELEARN_VIEWS_PER_IMAGE, image_loader
from cloud.feedback.store import FeedbackSource, FeedbackStoreError, open_feedback_store
from cloud.fleet.release import PublishedRelease, build_release

_LOGGER = logging.getLogger(__name__)

# Tuning on a handful of products teaches the tail little and risks moving the space for the rest of the
# catalog for nothing; past ~10 products with 3 photos each the grocery figures (store_loop.md: k=3 per
# product) show store photos paying. Lower them for a small store, raise them for a cautious one.
DEFAULT_MIN_PRODUCTS = 10
DEFAULT_MIN_PHOTOS = 3
TUNING_CATALOG = "store-photos.jsonl"  # the tuning catalog, written in the work folder
TUNED_DIR = "tuned"  # the tuned bundle, in the work folder


class ModelReleaseError(Exception):
    """The relearned model cannot be tuned, built or released (names the input and the problem)."""


@dataclass(frozen=True, slots=True)
class Threshold:
    """When a store has photos enough to tune on: ``min_products`` products with ``min_photos`` each."""

    min_products: int = DEFAULT_MIN_PRODUCTS
    min_photos: int = DEFAULT_MIN_PHOTOS

    def __post_init__(self) -> None:
        if self.min_products < 1 or self.min_photos < 1:
            raise ModelReleaseError(
                f"the threshold needs at least 1 product with at least 1 photo "
                f"(got {self.min_products} products, {self.min_photos} photos)"
            )


@dataclass(frozen=True, slots=True)
class Readiness:
    """Approved store photos per product of the store's catalog, against the threshold."""

    threshold: Threshold
    photos_per_product: dict[str, int]  # sku -> approved store photos (products that have any)
    approved: int  # approved records of this store (also of products the catalog lacks)

    @property
    def qualifying(self) -> list[str]:
        """The skus with at least ``min_photos`` approved photos."""
        return sorted(s for s, n in self.photos_per_product.items() if n >= self.threshold.min_photos)

    @property
    def ready(self) -> bool:
        return len(self.qualifying) >= self.threshold.min_products

    def describe(self) -> str:
        """One line: how far the store is from (or past) the threshold."""
        t = self.threshold
        return (
            f"{len(self.qualifying)} of the {t.min_products} products needed have >= {t.min_photos} approved "
            f"store photos ({sum(self.photos_per_product.values())} approved photos of "
            f"{len(self.photos_per_product)} catalog products; {self.approved} approved records in all)"
        )


@dataclass(frozen=True, slots=True)
class TuningSet:
    """What a tuner learns from: the store's catalog items (the retailer's photos) and their approved
    store photos."""

    store: str
    items: list[Item]  # the store's products, in catalog order
    catalog_dir: Path  # the retailer's catalog folder: relative image paths are relative to it
    photos: dict[str, list[StorePhoto]]  # sku -> approved store photos


# (approved store photos + the retailer's, base bundle, out dir) -> the tuned bundle's directory.
Tuner = Callable[[TuningSet, Path, Path], Path]


@dataclass(frozen=True, slots=True)
class CatalogTuner:
    """The default tuner: writes a catalog of the retailer's photos + the approved crops beside ``out``
    and runs ``models.tune.tune_bundle`` on it as ``storelens model tune`` does (the tuned bundle's
    manifest names its base and that catalog's sha256)."""

    convs: int = RELEARN_TUNE_CONVS  # more than a catalog-only tune's 4 (models.tune.TUNE_CONVS)
    epochs: int = 3  # models.tune.EPOCHS
    views_per_image: int = RELEARN_VIEWS_PER_IMAGE  # more views of each photo than a catalog-only tune
    seed: int = 0

    def __call__(self, data: TuningSet, base: Path, out: Path) -> Path:
        from cloud.retrieval_augment import augmented_views
        from models.tune import tune_bundle

        catalog_path = out.parent / TUNING_CATALOG
        write_catalog(catalog_path, tuning_rows(data))
        cat = load_catalog(catalog_path)
        loaders, labels = [], []
        for label, item in enumerate(cat.items):
            for source in item.images:
                loaders.append(image_loader(source, cat.base_dir))
                labels.append(label)
        catalog_id = hashlib.sha256(catalog_path.read_bytes()).hexdigest()[:16]
        _LOGGER.info(
            "tuning %s on %d images of %d items (catalog %s)", base, len(loaders), len(cat.items), catalog_id
        )
        _, report = tune_bundle(
            base, loaders, labels, out, augment=augmented_views, convs=self.convs, epochs=self.epochs,
            views_per_image=self.views_per_image, seed=self.seed, catalog_id=catalog_id,
        )  # fmt: skip
        for skipped in report.skipped:
            _LOGGER.warning("tuning skipped %s", skipped)
        return out


def tuning_rows(data: TuningSet) -> list[dict[str, Any]]:
    """Catalog rows (sku, title, images) of the store's products: the retailer's photos (as absolute
    paths or URLs), then the product's approved crops."""
    rows = []
    for it in data.items:
        images = [_absolute(src, data.catalog_dir) for src in it.images]
        images += [str(p.path) for p in data.photos.get(it.sku, ())]
        rows.append({"sku": it.sku, "title": it.title, "images": images})
    return rows


def _absolute(source: str, base_dir: Path) -> str:
    if "://" in source or Path(source).is_absolute():
        return source
    return str((base_dir / source).resolve())


def readiness(
    feedback_dir: FeedbackSource, store: str, items: list[Item], threshold: Threshold
) -> tuple[Readiness, Selection]:
    """Count the approved store photos of ``items`` per product (FeedbackError on an unreadable folder)."""
    sel = select_approved(feedback_dir, store, items)
    counts = {sku: len(ps) for sku, ps in sel.photos.items() if ps}
    return Readiness(threshold, counts, sel.approved), sel


@dataclass(frozen=True, slots=True)
class ModelRelease:
    """What ``release_relearned_model`` did: ``published`` is None when the threshold was not met."""

    readiness: Readiness
    published: PublishedRelease | None = None
    tuned_bundle: Path | None = None
    base_model_id: str = ""
    warnings: list[str] = field(default_factory=list)


def release_relearned_model(
    store: str,
    feedback_dir: FeedbackSource,
    catalog: Path,
    bundle: Path,
    key: Ed25519PrivateKey,
    to: str,
    work_dir: Path,
    *,
    threshold: Threshold | None = None,
    tune: Tuner | None = None,
    release_id: str | None = None,
    sequence: int | None = None,
    cache_dir: Path | None = None,
    s3_client: Any = None,
) -> ModelRelease:
    """Check the threshold; if met, tune ``bundle`` into ``work_dir/tuned``, build the store's snapshot
    with it and the approved photos, and publish both as one signed release to ``to``."""
    from models.bundle import read_manifest, verify_bundle
    from models.errors import ModelError

    threshold = threshold or Threshold()
    tune = tune or CatalogTuner()
    try:
        cat = load_catalog(catalog)
    except CatalogError as exc:
        raise ModelReleaseError(str(exc)) from exc
    items = cat.for_store(store)
    if not items:
        raise ModelReleaseError(f"catalog {catalog} lists no products for store {store!r}")
    try:
        base = verify_bundle(bundle)
    except ModelError as exc:
        raise ModelReleaseError(f"base bundle {bundle}: {exc}") from exc
    try:
        fb = open_feedback_store(feedback_dir)  # once: the readiness count and the build both read it
    except FeedbackStoreError as exc:
        raise FeedbackError(str(exc)) from exc
    ready, sel = readiness(fb, store, items, threshold)
    if not ready.ready:
        return ModelRelease(ready, base_model_id=base.model_id)
    work_dir = Path(work_dir)
    out = work_dir / TUNED_DIR
    if out.exists():
        raise ModelReleaseError(f"{out} already exists: give a new --work folder (tuned bundles are kept)")
    work_dir.mkdir(parents=True, exist_ok=True)
    data = TuningSet(store, items, cat.base_dir, {s: sel.photos[s] for s in sel.photos})
    try:
        tuned = tune(data, Path(bundle), out)
        tm = read_manifest(tuned)
    except ModelError as exc:
        raise ModelReleaseError(f"tuning {bundle} failed: {exc}") from exc
    if tm.model_id == base.model_id:
        raise ModelReleaseError(f"the tuner returned the base model {base.model_id[:12]}, not a tuned one")
    n_photos, n_products = sum(ready.photos_per_product.values()), len(ready.photos_per_product)
    notes = (
        f"relearned for {store}: {tm.name} tuned from {base.model_id[:12]} on "
        f"{n_photos} approved store photos of {n_products} products"
    )
    published = build_release(
        tuned, catalog, [store], key, to, release_id=release_id, sequence=sequence, cache_dir=cache_dir,
        s3_client=s3_client, notes=notes, feedback=fb,
    )  # fmt: skip
    return ModelRelease(ready, published, tuned, base.model_id, list(published.warnings))

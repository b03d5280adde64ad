"""Approved store photos -> a tuned bundle: the model step of the store-learning loop.

``relearn_bundle`` tunes the base bundle's last convolutions (``models.tune``) on the catalog's own images
plus the approved store photos of its products (``relearn.select_approved``), with the store-like
augmentation ``storelens model tune`` uses. Store photos are the customers' confirmed crops, so they look
like what the kiosk camera sees: a bundle tuned on them is what lifts a one-photo catalog (store_loop.md:
0.35 -> 0.67 R@1). The result is a new bundle (new ``model_id``): snapshots built with it load only on
kiosks that run it, so it ships as one release with its snapshot (``storelens fleet release``).

Nothing here reads customers' queries or a validation set: only the catalog and approved photos.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud.catalog import Item
from cloud.feedback.relearn import Selection

_LOGGER = logging.getLogger(__name__)

# Fewer approved store photos than this per product on average and a tune mostly learns the catalog's
# own studio shots again (NOTES.md: tuned on the iconic images alone, A R@1 0.345 -> 0.385 only).
MIN_STORE_PHOTOS_PER_ITEM = 1.0
# Augmented views of each image in the relearn's tune (`storelens model tune` on a catalog uses
# models.tune.VIEWS_PER_IMAGE, 6). Chosen on train-only worlds (scripts/eval_levers.py's random halves, 3
# seeds, one store photo per product, the snapshot's fit replayed on the tuned vectors; val never read):
# R@1 base 0.589 / 0.619 / 0.621, tuned with 6 views 0.597 / 0.631 / 0.647, 12 views 0.608 / 0.640 /
# 0.640, 24 views 0.619 / 0.657 / 0.663 (+2.1 points over 6, R@5 +1.8); tunes took 117-137 s vs 95-103.
RELEARN_VIEWS_PER_IMAGE = 24
# Convolutions before the pool the relearn trains (`models.tune.TUNE_CONVS`, 4, for catalog-only tunes:
# MobileNetV2's last inverted-residual block + the 1x1 conv). Same worlds, 24 views, k = 1, R@1 (R@5):
# 4 convs 0.619 / 0.657 / 0.663 (0.877 / 0.901 / 0.904), 6 convs 0.643 / 0.659 / 0.678 (0.880 / 0.890 /
# 0.898), 8 convs 0.663 / 0.674 / - (0.887 / 0.898): +3.1 points over 4 on two seeds; tunes ~4x longer.
RELEARN_TUNE_CONVS = 8


class RelearnModelError(Exception):
    """Too few store photos to tune on, or the tune failed (names why)."""


@dataclass(frozen=True, slots=True)
class TrainingImage:
    source: str  # catalog image source (path/URL, relative to ``base_dir``) or a store photo's crop path
    sku: str
    store_photo: bool


def training_set(items: Sequence[Item], sel: Selection, *, exclude: frozenset[str] = frozenset()) -> list[
        TrainingImage]:  # fmt: skip
    """The catalog's images and the approved store photos of its items, minus the ``exclude``d crop paths
    (store photos the build flagged as likely mis-taps)."""
    out: list[TrainingImage] = []
    for it in items:
        out.extend(TrainingImage(src, it.sku, False) for src in it.images)
        out.extend(TrainingImage(str(p.path), it.sku, True) for p in sel.photos.get(it.sku, ())
                   if str(p.path) not in exclude)  # fmt: skip
    return out


def training_key(base_model_id: str, images: Sequence[TrainingImage], **settings: Any) -> str:
    """A short stable key for (base model, images with labels, settings): a cache name for a tuned bundle."""
    doc = {"base": base_model_id, "images": [[t.source, t.sku] for t in images], **settings}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def image_loader(source: str, base_dir: Path) -> Callable[[], Any]:
    """A tune's lazy loader of one catalog image or store photo (``source`` relative to ``base_dir`` unless
    absolute or a URL): BadImage naming the source when it cannot be fetched or decoded."""
    from cloud.catalog import FetchError, fetch_image_bytes
    from models.errors import BadImage
    from models.images import decode_image

    def load() -> Any:
        try:
            return decode_image(fetch_image_bytes(source, base_dir))
        except (FetchError, BadImage) as exc:
            raise BadImage(f"{source}: {exc}") from exc

    return load


def relearn_bundle(
    base_bundle: Path,
    items: Sequence[Item],
    sel: Selection,
    out_dir: Path,
    *,
    base_dir: Path | None = None,
    exclude: frozenset[str] = frozenset(),
    seed: int = 0,
    convs: int = RELEARN_TUNE_CONVS,
    epochs: int | None = None,
    views_per_image: int = RELEARN_VIEWS_PER_IMAGE,
) -> tuple[Any, Any]:
    """Tune ``base_bundle`` on ``items``' catalog images plus their approved store photos into ``out_dir``.

    ``epochs`` defaults to ``models.tune``'s. Returns (the tuned bundle's manifest,
    ``models.tune.TuneReport``). RelearnModelError when the
    products have fewer than ``MIN_STORE_PHOTOS_PER_ITEM`` store photos on average, or the tune fails.
    """
    from cloud.retrieval_augment import augmented_views
    from models.bundle import read_manifest
    from models.errors import ModelError
    from models.tune import EPOCHS, tune_bundle

    images = training_set(items, sel, exclude=exclude)
    n_store = sum(t.store_photo for t in images)
    if not items or n_store < MIN_STORE_PHOTOS_PER_ITEM * len(items):
        raise RelearnModelError(
            f"{n_store} approved store photos for {len(items)} products: too few to relearn the model "
            f"(at least {MIN_STORE_PHOTOS_PER_ITEM:g} per product on average)")  # fmt: skip
    skus = sorted({t.sku for t in images})
    label_of = {s: i for i, s in enumerate(skus)}

    base_id = read_manifest(base_bundle).model_id
    catalog_id = "store-" + training_key(base_id, images)
    _LOGGER.info("relearning %s on %d catalog images and %d store photos of %d products",
                 base_bundle, len(images) - n_store, n_store, len(skus))  # fmt: skip
    try:
        return tune_bundle(
            base_bundle, [image_loader(t.source, base_dir or Path.cwd()) for t in images],
            [label_of[t.sku] for t in images], out_dir,
            augment=augmented_views, seed=seed, catalog_id=catalog_id, convs=convs,
            epochs=epochs or EPOCHS, views_per_image=views_per_image,
        )  # fmt: skip
    except ModelError as exc:
        raise RelearnModelError(f"tuning {base_bundle} on store photos failed: {exc}") from exc

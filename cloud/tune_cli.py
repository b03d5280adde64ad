"""`storelens model tune`: tune a bundle on a catalog's images. The command reads catalogs, so it lives on
the cloud side; ``models`` knows no catalog (``models.tune`` takes image loaders and an augmentation)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from models.errors import BadImage, ModelError

_EXIT_BAD_INPUT = 2


def register(model_app: typer.Typer) -> None:
    """Add ``tune`` to the ``model`` sub-app."""
    model_app.command("tune")(tune_cmd)


def _fail(exc: BaseException) -> NoReturn:
    """One line on stderr and exit 2; no traceback for errors the user can fix."""
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(_EXIT_BAD_INPUT)


def tune_cmd(
    bundle: Annotated[Path, typer.Option("--bundle", help="fp16/fp32 bundle to start from")],
    catalog: Annotated[Path, typer.Option("--catalog", help="catalog CSV/JSONL whose images it learns")],
    out: Annotated[Path, typer.Option("--out", help="tuned bundle directory to write")],
    store: Annotated[str | None, typer.Option(help="only the items this store carries")] = None,
    epochs: Annotated[int, typer.Option(min=1, max=50)] = 3,
    tune_convs: Annotated[int, typer.Option(min=1, max=12, help="convolutions before the pool to train")] = 4,
    seed: Annotated[int, typer.Option(help="augmentation and training seed")] = 0,
) -> None:
    """Tune the backbone's last convolutions on the catalog's own images: a new bundle (new model_id).

    Build snapshots with the tuned bundle and roll it out to the kiosks that use them.
    """
    import hashlib

    from cloud.catalog import CatalogError, FetchError, fetch_image_bytes, load_catalog
    from cloud.retrieval_augment import augmented_views
    from models.images import decode_image
    from models.tune import Loader, tune_bundle

    try:
        cat = load_catalog(catalog)
    except CatalogError as exc:
        _fail(exc)
    for err in cat.errors:
        typer.echo(f"warning: catalog row {err.row} ({err.sku or '?'}): {err.error}", err=True)
    items = cat.for_store(store) if store else cat.items
    loaders: list[Loader] = []
    labels: list[int] = []

    def loader(source: str) -> Loader:
        def load() -> Any:
            try:
                data = fetch_image_bytes(source, cat.base_dir)
            except FetchError as exc:
                raise BadImage(f"{source}: {exc}") from exc
            try:
                return decode_image(data)
            except BadImage as exc:
                raise BadImage(f"{source}: {exc}") from exc

        return load

    for label, item in enumerate(items):
        for source in item.images:
            loaders.append(loader(source))
            labels.append(label)
    catalog_id = hashlib.sha256(catalog.read_bytes()).hexdigest()[:16]
    typer.echo(f"tuning {bundle} on {len(loaders)} images of {len(items)} items (a few minutes on a CPU)")
    try:
        manifest, report = tune_bundle(
            bundle, loaders, labels, out, convs=tune_convs, epochs=epochs, seed=seed, catalog_id=catalog_id,
            augment=augmented_views,  # store-like views: studio shots on white get shelf/pile backgrounds
        )
    except ModelError as exc:
        _fail(exc)
    for skipped in report.skipped:
        typer.echo(f"warning: skipped {skipped}", err=True)
    typer.echo(
        f"{out}: {manifest.name} tuned on {report.images} images ({report.views} views), "
        f"loss by epoch {report.loss}, {report.seconds:.0f} s; model_id {manifest.model_id}"
    )

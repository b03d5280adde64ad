"""`storelens model export|info|embed`: bundle tooling for people and CI."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from models.bundle import PRECISIONS
from models.errors import ModelError

_LOGGER = logging.getLogger(__name__)

model_app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="Export, inspect and try model bundles."
)

_EXIT_BAD_INPUT = 2  # usage-style failure: the user can fix the arguments or files


def _fail(exc: BaseException) -> NoReturn:
    """One line on stderr and exit 2; no traceback for errors the user can fix."""
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(_EXIT_BAD_INPUT)


@model_app.command("export")
def export_cmd(
    source: Annotated[str, typer.Option("--source", help="a .onnx/.tflite/.xml/.pth file, or a recipe")],
    out: Annotated[Path, typer.Option("--out", help="bundle directory to write")],
    precision: Annotated[str, typer.Option(help="fp32 | fp16 | int8")] = "fp16",
    calibration: Annotated[
        Path | None, typer.Option(help="folder of photos for int8 calibration (searched recursively)")
    ] = None,
    weights: Annotated[Path | None, typer.Option(help="torchvision .pth or ONNX zoo ResNet")] = None,
    pool_node: Annotated[str | None, typer.Option(help="cut here instead of at the last global pool")] = None,
    name: Annotated[str | None, typer.Option(help="bundle name (default: from the source)")] = None,
    preprocessing: Annotated[
        str | None,
        typer.Option(help="recipe: imagenet, mobilenet-u8, mobilenet-float, caffe-bgr, efficientnet-lite"),
    ] = None,
    subset_size: Annotated[int, typer.Option(help="int8: most calibration images used")] = 300,
) -> None:
    """Export SOURCE to a bundle: cut at global pooling, L2-normalise, preprocessing in-graph."""
    from models.export import export_model

    if precision not in PRECISIONS:
        _fail(ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"))
    try:
        manifest = export_model(
            source, out, precision=precision, calibration=calibration, weights=weights,
            pool_node=pool_node, name=name, preprocessing=preprocessing, subset_size=subset_size,
        )  # fmt: skip
    except ModelError as exc:
        _fail(exc)
    if not manifest.pretrained:
        typer.echo(f"warning: {manifest.name} has random weights (pretrained=false)", err=True)
    typer.echo(f"{out}: {manifest.name} dim {manifest.dim} {manifest.precision} model_id {manifest.model_id}")


@model_app.command("info")
def info_cmd(bundle: Annotated[Path, typer.Argument(help="bundle directory")]) -> None:
    """Verify a bundle against its manifest and print the manifest."""
    from models.bundle import verify_bundle

    try:
        manifest = verify_bundle(bundle)
    except ModelError as exc:
        _fail(exc)
    typer.echo(json.dumps(manifest.to_dict(), indent=2, sort_keys=True))


@model_app.command("embed")
def embed_cmd(
    bundle: Annotated[Path, typer.Argument(help="bundle directory")],
    images: Annotated[list[Path], typer.Argument(help="image files")],
) -> None:
    """Embed images and print their dims, norms and pairwise cosines (a smoke test)."""
    import numpy as np

    from models.embedder import Embedder
    from models.images import load_image

    try:
        crops = [load_image(p) for p in images]
        with Embedder(bundle) as embedder:
            vectors = embedder.embed(crops)
    except ModelError as exc:
        _fail(exc)
    typer.echo(f"model_id {embedder.model_id} dim {embedder.dim}")
    for path, vec in zip(images, vectors, strict=True):
        typer.echo(f"{path}: norm {float(np.linalg.norm(vec)):.4f} first {np.round(vec[:4], 4).tolist()}")
    cosines = vectors @ vectors.T
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            typer.echo(f"cos({images[i].name}, {images[j].name}) = {float(cosines[i, j]):.4f}")

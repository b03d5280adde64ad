"""``storelens catalog build --engine ray``: the command's Ray branch (flags parsed by ``cloud.cli``)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer

from cloud.build import BuildError


def out_dirs(stores: str, out: Path) -> tuple[list[str], dict[str, Path] | Path]:
    """``--store`` for Ray: one store (OUT is its snapshot), or ``a,b,c`` / ``all`` (OUT/<store> each)."""
    from storelens.protocol import check_id

    names = [s.strip() for s in stores.split(",") if s.strip()]
    if not names:
        raise BuildError("--store names no store")
    for s in names:
        if s != "all":
            check_id(s, "store id")
    if "all" in names and len(names) > 1:
        raise BuildError("--store all cannot be combined with store names")
    if len(names) == 1 and names[0] != "all":
        return names, {names[0]: out}
    return names, out


def run(
    *,
    catalog: Path,
    bundle: Path,
    stores: str,
    out: Path,
    key: Path,
    cache: Path | None,
    shared_cache: str | None,
    ray_address: str | None,
    actors: int | None,
    location_column: str | None,
    options: dict[str, Any],
) -> int:
    """Build every store's snapshot on Ray, print the summary; the exit code (2: a store failed)."""
    from cloud.cli import _guard
    from cloud.scale.embed import BundleEmbedders
    from cloud.scale.engine import build_stores, ray_session
    from storelens import signing

    def go() -> Any:
        names, outs = out_dirs(stores, out)
        if options.get("base") is not None and (len(names) != 1 or names == ["all"]):
            raise BuildError("--base (a delta) is for one store at a time")
        pk = signing.load_private_key(key)
        factory = BundleEmbedders(str(bundle))
        factory.space()  # a bad bundle fails here, before Ray starts
        uri = shared_cache or (str(cache / "embeddings-parquet") if cache is not None else None)
        with ray_session(ray_address):
            # http(s) photos kept where the single-process build keeps them (a rebuild downloads nothing).
            images = cache / "images" if cache is not None else None
            return build_stores(catalog, names, outs, pk, factory, cache_uri=uri, download_dir=images,
                                actors=actors, created_at=datetime.now(UTC), location_column=location_column,
                                progress=sys.stderr.isatty(), **options)  # fmt: skip

    summary = _guard(go)
    report = out.with_name(f"{out.name}.ray.json")
    report.write_text(json.dumps(asdict(summary), indent=1, sort_keys=True))
    for line in summary.lines():
        typer.echo(line)
    typer.echo(f"per-store reports beside each snapshot; this run: {report}")
    return 2 if any(v.startswith("error:") for v in summary.stores.values()) else 0

"""`storelens keys|catalog|dashboard|fleet|feedback` commands: thin wrappers over the cloud package.

Bad input prints one line and exits 2; heavy libraries load inside the commands.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from cloud import broker_cli as bc

catalog_app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="Build, verify, publish snapshots."
)
keys_app = typer.Typer(no_args_is_help=True, add_completion=False, help="Ed25519 snapshot signing keys.")
dashboard_app = typer.Typer(add_completion=False, help="Staff dashboard (store status, matches, alerts).")
fleet_app = typer.Typer(add_completion=False, help="Fleet rollout of model + snapshot releases.")
feedback_app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="Customer feedback: collect, review, relearn."
)


def _register_subapps() -> None:
    from cloud.dashboard.serve import register as register_dashboard
    from cloud.feedback.cli import register as register_feedback

    register_dashboard(dashboard_app)
    register_feedback(feedback_app)
    try:
        from cloud.fleet.cli import register as register_fleet
    except ImportError:  # fleet commands land with the rollout work
        return
    register_fleet(fleet_app)


_register_subapps()


def _fail(msg: str) -> NoReturn:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _guard(fn: Callable[[], Any]) -> Any:
    """Run a command body, turning the errors a user can fix into one line and exit code 2."""
    from cloud.build import BuildError
    from cloud.catalog import CatalogError
    from cloud.publish import PublishError
    from cloud.research.evaluate import EvalError
    from models.errors import ModelError
    from storelens.signing import SigningKeyError
    from storelens.snapshot import SnapshotRejected

    try:
        return fn()
    except SnapshotRejected as exc:
        _fail(f"REJECTED {exc.reason.value}: {exc.detail}")
    except (BuildError, CatalogError, EvalError, PublishError, ModelError, SigningKeyError) as exc:
        _fail(str(exc))
    except (OSError, ValueError) as exc:
        _fail(f"{type(exc).__name__}: {exc}")


@keys_app.command("generate")
def keys_generate(
    out: Annotated[Path, typer.Option("--out", help="Directory for private.pem/public.pem")],
) -> None:
    """Create an Ed25519 key pair: private.pem (0600) and public.pem (kiosks pin this one)."""
    from storelens import signing

    def generate() -> str:
        out.mkdir(parents=True, exist_ok=True)  # a file there: one line, not FileExistsError's traceback
        return signing.generate_keypair(out / "private.pem", out / "public.pem")

    kid = _guard(generate)
    typer.echo(f"key {kid}: {out / 'private.pem'} (keep secret), {out / 'public.pem'} (pin on kiosks)")


_LOCATION_COLUMN = typer.Option(
    "--location-column", help="Column (XML: element) with the store location/aisle, e.g. 'custom_label_0'"
)
LISTED = 50  # lines of one kind `catalog check` prints; --json has them all


def _listed(lines: list[str]) -> None:
    for line in lines[:LISTED]:
        typer.echo(line)
    if len(lines) > LISTED:
        typer.echo(f"... and {len(lines) - LISTED} more like these (all of them: --json)")


@catalog_app.command("build")
def catalog_build(
    catalog: Annotated[Path, typer.Option("--catalog", help="CSV or JSON Lines catalog")],
    bundle: Annotated[Path, typer.Option("--bundle", help="Model bundle directory")],
    store: Annotated[str, typer.Option("--store", help="Store id")],
    out: Annotated[Path, typer.Option("--out", help="Snapshot directory to write")],
    key: Annotated[Path, typer.Option("--key", help="Ed25519 private key PEM")] = Path("keys/private.pem"),
    base: Annotated[Path | None, typer.Option("--base", help="Previous full snapshot: build a delta")] = None,
    version: Annotated[
        int | None, typer.Option("--version", help="Snapshot version (default base+1 or 1)")
    ] = None,
    m: Annotated[int, typer.Option("--M", help="HNSW links per node")] = 16,
    ef_construction: Annotated[int, typer.Option("--ef-construction")] = 200,
    ef: Annotated[int, typer.Option("--ef", help="Query ef recorded for kiosks")] = 100,
    cache: Annotated[Path | None, typer.Option("--cache", help="Embedding cache directory")] = None,
    archive: Annotated[bool, typer.Option("--archive/--no-archive", help="Also write OUT.tar")] = True,
    location_column: Annotated[str | None, _LOCATION_COLUMN] = None,
    feedback: Annotated[
        str | None,
        typer.Option(
            "--feedback", help="Feedback store (a folder or s3://bucket/prefix): add approved store photos"
        ),
    ] = None,
    feedback_cap: Annotated[int, typer.Option("--feedback-cap", help="Store photos kept per product")] = 20,
    engine: Annotated[str, typer.Option("--engine", help="single (this process) or ray")] = "single",
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", help="Ray cluster to join (default $RAY_ADDRESS, else a local Ray)")] = None,
    shared_cache: Annotated[str | None, typer.Option(
        "--shared-cache", help="Ray: Parquet embedding cache, a path or s3://bucket/prefix "
        "(default CACHE/embeddings-parquet)")] = None,
    actors: Annotated[
        int | None, typer.Option("--actors", help="Ray: embedding actors (default: 1 per CPU)")
    ] = None,
) -> None:
    """Embed a catalog and write a signed snapshot (full, or a delta with --base).

    With --engine ray, --store may list stores (a,b,c) or say 'all': one snapshot each, OUT/<store>."""
    if engine == "ray":
        from cloud.scale.cli import run as run_ray

        if feedback is not None:
            _fail("--feedback is built by the default engine only (store photos are few): drop --engine ray")

        opts = {"base": base, "version": version, "M": m, "ef_construction": ef_construction, "ef": ef,
                "archive": archive}  # fmt: skip
        raise typer.Exit(run_ray(catalog=catalog, bundle=bundle, stores=store, out=out, key=key, cache=cache,
                                 shared_cache=shared_cache, ray_address=ray_address, actors=actors,
                                 location_column=location_column, options=opts))  # fmt: skip
    if engine != "single":
        _fail(f"--engine must be 'single' or 'ray', not {engine!r}")
    from cloud.build import BuildSpec, build_snapshot
    from cloud.feeds.summary import summary_lines
    from storelens import signing
    from storelens.protocol import check_id

    def run() -> Any:
        check_id(store, "store id")
        pk = signing.load_private_key(key)
        res = build_snapshot(BuildSpec(
            catalog=catalog,
            store=store,
            out_dir=out,
            private_key=pk,
            bundle=bundle,
            base=base,
            version=version,
            M=m,
            ef_construction=ef_construction,
            ef=ef,
            cache_dir=cache,
            archive=archive,
            location_column=location_column,
            feedback=feedback,
            feedback_cap=feedback_cap,
        ))
        return res

    res = _guard(run)
    r = res.report
    typer.echo(
        f"OK {r['kind']} snapshot v{r['version']} of {r['store']}: {r['items']} items, "
        f"{r['vectors']} vectors, threshold {r['threshold']}, "
        f"embedded {r['images_embedded']} (cache hits {r['cache_hits']})"
    )
    if r.get("delta_fallback"):
        typer.echo(f"full build instead of delta: {r['delta_fallback']}")
    if "feedback" in r:
        f = r["feedback"]
        typer.echo(
            f"store photos: {f['store_photos']} of {f['approved']} approved ({f['over_cap']} over the cap "
            f"of {f['cap']}); skipped: {f['skipped_unknown_sku']} of products not in the catalog, "
            f"{f['skipped_other_store']} of other stores"
        )
    for w in r["warnings"]:
        typer.echo(f"warning: {w}")
    for line in summary_lines(r, images_ok=r["vectors"]):
        typer.echo(line)
    typer.echo(f"report (every skipped row and photo): {res.report_path}")


@catalog_app.command("check")
def catalog_check(
    catalog: Annotated[Path, typer.Option("--catalog", help="CSV or JSON Lines catalog")],
    store: Annotated[str | None, typer.Option("--store", help="Only the items this store carries")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
    location_column: Annotated[str | None, _LOCATION_COLUMN] = None,
) -> None:
    """Check a catalog before building: every row validated, every image fetched and decoded; no model.

    Exit 2 when nothing could be built from it."""
    from dataclasses import asdict

    from cloud.check import check_catalog
    from cloud.feeds.summary import summary_lines

    rep = _guard(lambda: check_catalog(catalog, store=store, location_column=location_column,
                                       progress=not as_json and sys.stderr.isatty()))  # fmt: skip
    if as_json:
        typer.echo(json.dumps({**asdict(rep), "buildable": rep.buildable}, indent=1))
    else:
        _listed([f"bad row {e['row']} ({e['sku']}): {e['error']}" for e in rep.bad_rows])
        _listed([f"conflict: {c['sku']} has {kind} {c['kept']!r} (kept) and {c['other']!r}"
                 for kind, found in rep.conflicts.items() for c in found])  # fmt: skip
        _listed([f"bad image row {e['row']} ({e['sku']}) {e['source']}: {e['error']}"
                 for e in rep.bad_images])  # fmt: skip
        _listed([f"item {sku}: no usable image, it will not be in the snapshot"
                 for sku in rep.items_without_images])  # fmt: skip
        for w in rep.warnings:
            typer.echo(f"warning: {w}")
        for line in summary_lines(asdict(rep), images_ok=rep.images_ok):
            typer.echo(line)
        typer.echo(
            f"{'OK' if rep.buildable else 'NOTHING TO BUILD'}: {rep.rows} rows, {rep.items} items "
            f"({len(rep.bad_rows)} bad rows), {rep.images_ok} usable images ({len(rep.bad_images)} bad), "
            f"{rep.items_multi_image} items with two or more"
        )
    if not rep.buildable:
        raise typer.Exit(2)


@catalog_app.command("verify")
def catalog_verify(
    snapshot: Annotated[Path, typer.Argument(help="Snapshot directory or .tar archive")],
    public_key: Annotated[
        list[Path], typer.Option("--public-key", help="Pinned public key PEM (repeatable)")
    ],
    model_bundle: Annotated[
        Path | None, typer.Option("--model-bundle", help="Check the model matches")
    ] = None,
    store: Annotated[str | None, typer.Option("--store", help="Expected store")] = None,
) -> None:
    """Verify signature, files, model and index header; print OK and a summary or the reason (exit 2)."""
    from storelens import signing
    from storelens.archive import unpack
    from storelens.snapshot import verify_snapshot
    from storelens.swap import recover_for_reading

    _guard(lambda: recover_for_reading(snapshot))  # a build a crash interrupted: finish or undo it
    if not snapshot.exists():
        _fail(f"snapshot {snapshot} does not exist")

    def run() -> Any:
        keys = [signing.load_public_key(p) for p in public_key]
        model_id = model_dim = None
        if model_bundle is not None:
            from models.bundle import verify_bundle

            bm = verify_bundle(model_bundle)
            model_id, model_dim = bm.model_id, bm.dim
        if snapshot.is_dir():
            return verify_snapshot(snapshot, keys, model_id=model_id, model_dim=model_dim, store=store)
        with tempfile.TemporaryDirectory(prefix="storelens-verify-") as tmp:
            dest = Path(tmp) / "snap"
            unpack(snapshot, dest, max_total_bytes=snapshot.stat().st_size)
            return verify_snapshot(dest, keys, model_id=model_id, model_dim=model_dim, store=store)

    m = _guard(run)
    typer.echo(
        f"OK {m.kind} snapshot v{m.version} of {m.store}: {m.item_count} items, {m.vector_count} vectors, "
        f"dim {m.dim}, model {m.model_id[:12]}, ef {m.hnsw.ef}, threshold {m.threshold}, key {m.key_id}"
    )


@catalog_app.command("publish")
def catalog_publish(
    snapshot: Annotated[Path, typer.Argument(help="Snapshot directory or .tar archive")],
    to: Annotated[str, typer.Option("--to", help="file:///dir or s3://bucket/prefix")],
    broker: bc.Broker = None,
    s3_endpoint: Annotated[str | None, typer.Option("--s3-endpoint", help="S3 endpoint URL")] = None,
    config: bc.Config = None,
    username: bc.Username = None,
    password_env: bc.PasswordEnv = None,
    ca: bc.Ca = None,
    cert: bc.Cert = None,
    key: bc.Key = None,
) -> None:
    """Upload the snapshot archive and announce it retained on the store's snapshot topic."""
    from cloud.publish import publish_snapshot

    settings = bc.settings(broker, config, username, ca, cert, key, password_env, required=False)
    p = _guard(lambda: publish_snapshot(snapshot, to, settings, s3_endpoint=s3_endpoint))
    a = p.announcement
    typer.echo(
        f"OK published {a.store} v{a.version} ({a.kind}, {a.size} bytes, sha256 {a.sha256[:12]}) "
        f"{'uploaded' if p.uploaded else 'already stored'} at {p.key}"
        f"{f', announced on {settings.where()}' if settings else ''}"
    )


@catalog_app.command("eval")
def catalog_eval(
    snapshot: Annotated[Path, typer.Option("--snapshot", help="Full snapshot directory")],
    queries: Annotated[Path, typer.Option("--queries", help="CSV path,sku of labelled photos")],
    bundle: Annotated[Path, typer.Option("--bundle", help="Model bundle the snapshot was built with")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
) -> None:
    """Recall@1/@5 (items), mean similarity of right vs wrong top-1, most confused pairs."""
    from cloud.research.evaluate import EvalError, evaluate

    def run() -> Any:
        from models.embedder import Embedder
        from storelens.snapshot import MANIFEST

        if not (snapshot / MANIFEST).is_file():  # before the model compiles: say what is wrong at once
            raise EvalError(f"{snapshot} is not a snapshot directory (no {MANIFEST})")
        with Embedder(bundle, mode="throughput") as emb:
            return evaluate(snapshot, queries, emb)

    r = _guard(run)
    if as_json:
        typer.echo(json.dumps(r, indent=2, sort_keys=True))
        return
    typer.echo(
        f"queries {r['queries']} (skipped {r['skipped']}): recall@1 {r['recall@1']:.3f}, "
        f"recall@5 {r['recall@5']:.3f}; mean sim correct {r['mean_sim_correct']}, wrong {r['mean_sim_wrong']}"
    )
    for c in r["confused"]:
        typer.echo(f"  {c['true']} -> {c['predicted']}: {c['count']}")

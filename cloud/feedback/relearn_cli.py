"""`storelens feedback auto-review|relearn|release`: the loop's cloud steps after the collector (thin
wrappers)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cloud import broker_cli as bc

FEEDBACK_HELP = "Feedback store: a folder or s3://bucket/prefix"


def register(app: typer.Typer) -> None:
    """Add the auto-review, relearn and release commands to the `storelens feedback` app."""
    app.command("release")(release_cmd)

    @app.command("auto-review")
    def auto_review_cmd(
        store: Annotated[str, typer.Option("--store", help="Store id")],
        feedback_dir: Annotated[str, typer.Option("--feedback-dir", help=FEEDBACK_HELP)],
        snapshot: Annotated[Path, typer.Option("--snapshot", help="The store's current snapshot dir")],
    ) -> None:
        """Pre-approve the confirmations that agree with the catalog; the rest wait for staff."""
        from cloud.cli import _fail, _guard
        from cloud.feedback.auto import AutoReviewError, ReviewSpace, auto_review_all
        from cloud.feedback.store import FeedbackStoreError, open_feedback_store
        from storelens.protocol import check_id

        def run() -> Any:
            check_id(store, "store id")
            try:
                fb = open_feedback_store(feedback_dir)
                return auto_review_all(fb, store, ReviewSpace.load(snapshot))
            except (AutoReviewError, FeedbackStoreError) as exc:
                _fail(str(exc))

        s = _guard(run)
        typer.echo(f"OK auto-approved {s.approved}; left for staff {s.left_pending}; "
                   f"not confirmations (never auto) {s.not_confirmations}")  # fmt: skip

    @app.command("relearn")
    def relearn_cmd(
        store: Annotated[str, typer.Option("--store", help="Store id")],
        feedback_dir: Annotated[str, typer.Option("--feedback-dir", help=FEEDBACK_HELP)],
        catalog: Annotated[Path, typer.Option("--catalog", help="CSV or JSON Lines catalog")],
        bundle: Annotated[Path, typer.Option("--bundle", help="Model bundle directory")],
        snapshots: Annotated[Path, typer.Option("--snapshots", help="Folder of the store's snapshots")],
        key: Annotated[Path, typer.Option("--key", help="Ed25519 private key PEM")],
        cache: Annotated[Path | None, typer.Option("--cache", help="Embedding cache directory")] = None,
        auto_review: Annotated[
            bool, typer.Option("--auto-review", help="First pre-approve what agrees (feedback auto-review)")
        ] = False,
        force: Annotated[bool, typer.Option("--force", help="Build even when nothing changed")] = False,
        publish_to: Annotated[
            str | None,
            typer.Option("--publish-to", help="Then publish it: file:///dir or s3://bucket/prefix"),
        ] = None,
        broker: bc.Broker = None,
        config: bc.Config = None,
        username: bc.Username = None,
        password_env: bc.PasswordEnv = None,
        ca: bc.Ca = None,
    ) -> None:
        """`catalog build --feedback` on the newest full snapshot as base (a delta when it can be one), when
        the approved photos, catalog or bundle changed since the newest snapshot; then publish it if asked."""
        from cloud.cli import _fail, _guard
        from cloud.feedback.relearn import FeedbackError
        from cloud.feedback.schedule import relearn
        from cloud.publish import publish_snapshot
        from storelens import signing
        from storelens.protocol import check_id

        settings = None
        if publish_to is not None:
            settings = bc.settings(broker, config, username, ca, None, None, password_env, required=False)
        elif broker is not None:
            _fail("--broker announces a published snapshot: give --publish-to too")

        def run() -> Any:
            check_id(store, "store id")
            pk = signing.load_private_key(key)
            try:
                return relearn(store, feedback_dir, catalog, bundle, snapshots, pk, cache_dir=cache,
                               auto_review=auto_review, force=force)  # fmt: skip
            except FeedbackError as exc:
                _fail(str(exc))

        r = _guard(run)
        if auto_review:
            typer.echo(f"auto-approved {r.auto_approved}")
        if r.built is None or r.final is None:
            typer.echo(f"OK nothing new for {store} since {r.previous}: no snapshot built "
                       "(--force builds one)")  # fmt: skip
        else:
            fbr = r.built.report.get("feedback", {})
            typer.echo(
                f"OK {r.built.report['kind']} snapshot v{r.built.manifest.version} of {store} at {r.final}: "
                f"{fbr.get('store_photos', 0)} store photos, threshold {r.built.report['threshold']}"
            )
        # Also when nothing is new: a publish that failed last run (broker down) happens now; publishing an
        # already stored archive uploads nothing and announces it again (same version: kiosks keep theirs).
        newest = r.final or r.previous
        if publish_to is not None and newest is not None:
            p = _guard(lambda: publish_snapshot(newest, publish_to, settings))
            a = p.announcement
            typer.echo(f"OK published {a.store} v{a.version} ({a.kind}) at {p.key}"
                       f"{'' if p.uploaded else ' (already stored)'}"
                       f"{f', announced on {settings.where()}' if settings else ''}")  # fmt: skip


def release_cmd(
    store: Annotated[str, typer.Option("--store", help="Store id")],
    feedback_dir: Annotated[str, typer.Option("--feedback-dir", help=FEEDBACK_HELP)],
    catalog: Annotated[Path, typer.Option("--catalog", help="The retailer's CSV or JSON Lines catalog")],
    bundle: Annotated[Path, typer.Option("--bundle", help="The bundle the store's kiosks run (fp16/fp32)")],
    key: Annotated[Path, typer.Option("--key", help="Ed25519 private key PEM")],
    work: Annotated[Path, typer.Option("--work", help="New folder for the tuned bundle + tuning catalog")],
    to: Annotated[str, typer.Option("--to", help="file:///dir or s3://bucket/prefix")] = "file://releases",
    min_products: Annotated[
        int, typer.Option("--min-products", help="Tune once this many products have enough photos")
    ] = 10,
    min_photos: Annotated[
        int, typer.Option("--min-photos", help="Approved store photos a product needs to count")
    ] = 3,
    release_id: Annotated[
        str | None, typer.Option("--id", help="Release id (default r<seq>-<model>)")
    ] = None,
    sequence: Annotated[
        int | None, typer.Option("--sequence", help="Monotonic number (default: unix time)")
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="Embedding + OpenVINO cache")] = None,
    epochs: Annotated[int, typer.Option(min=1, max=50)] = 3,
    tune_convs: Annotated[
        int, typer.Option(min=1, max=12, help="Convolutions before the pool to train")
    ] = 8,  # relearn_model.RELEARN_TUNE_CONVS (not imported here: numpy on every `feedback --help`)
) -> None:
    """Enough approved store photos? Tune a bundle on them, build the store's snapshot with it, release both.

    Exit 0 with the reason when the threshold is not met yet; then roll the release out with
    `storelens fleet rollout` (canary gate, probation, rollback).
    """
    from cloud.build import BuildError
    from cloud.catalog import CatalogError
    from cloud.feedback.relearn import FeedbackError
    from cloud.feedback.release import CatalogTuner, ModelReleaseError, Threshold, release_relearned_model
    from cloud.fleet.cli import _fail
    from cloud.fleet.release import ReleaseError
    from cloud.publish import PublishError
    from models.errors import ModelError
    from storelens.protocol import ProtocolError, check_id
    from storelens.signing import SigningKeyError, load_private_key

    try:
        check_id(store, "store id")
        r = release_relearned_model(
            store, feedback_dir, catalog, bundle, load_private_key(key), to, work,
            threshold=Threshold(min_products, min_photos), tune=CatalogTuner(tune_convs, epochs),
            release_id=release_id, sequence=sequence, cache_dir=cache_dir,
        )  # fmt: skip
    except (ModelReleaseError, FeedbackError, CatalogError, ReleaseError, BuildError, PublishError,
            ModelError, SigningKeyError, ProtocolError, OSError, ValueError) as exc:  # fmt: skip
        _fail(str(exc))
    if r.published is None:
        typer.echo(f"not yet: {r.readiness.describe()}; nothing tuned or released")
        return
    m = r.published.manifest
    typer.echo(
        f"OK release {m.release} #{m.sequence}: model {m.bundle.name} {m.bundle.model_id[:12]} (tuned from "
        f"{r.base_model_id[:12]}, bundle at {r.tuned_bundle}), {store} snapshot v{m.stores[store].version} "
        f"with store photos; {r.readiness.describe()}"
    )
    typer.echo(r.published.url)
    for w in r.warnings:
        typer.echo(f"warning: {w}")
    typer.echo(f"next: storelens fleet rollout {r.published.url} --stores {store} --broker mqtts://HOST:8883")

"""`storelens fleet release|rollout|status`: thin wrappers over cloud.fleet (on cloud.cli's fleet_app)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from cloud import broker_cli as bc

_LOGGER = logging.getLogger(__name__)


def _fail(msg: str) -> NoReturn:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _stores(value: str) -> list[str]:
    from storelens.protocol import ProtocolError, check_id

    try:
        return [check_id(s.strip(), "store id") for s in value.split(",") if s.strip()]
    except ProtocolError as exc:
        _fail(str(exc))


def _read_release(url: str) -> tuple[Any, str, str]:
    import urllib.request

    from cloud.fleet.release import ReleaseError, sig_url_for
    from storelens.release import MAX_RELEASE_BYTES, ReleaseManifest

    if "://" not in url:
        url = Path(url).resolve().as_uri()
    try:
        with urllib.request.urlopen(url, timeout=30.0) as resp:
            data = resp.read(MAX_RELEASE_BYTES + 1)
        return ReleaseManifest.model_validate_json(data), url, sig_url_for(url)
    except (OSError, ReleaseError, ValueError) as exc:
        _fail(f"cannot read release {url}: {exc}")


def release_cmd(
    bundle: Annotated[Path, typer.Option("--bundle", help="Model bundle directory")],
    catalog: Annotated[Path, typer.Option("--catalog", help="CSV or JSON Lines catalog")],
    stores: Annotated[str, typer.Option("--stores", help="Comma-separated store ids")],
    key: Annotated[Path, typer.Option("--key", help="Ed25519 private key PEM")] = Path("keys/private.pem"),
    to: Annotated[str, typer.Option("--to", help="file:///dir or s3://bucket/prefix")] = "file://releases",
    release_id: Annotated[
        str | None, typer.Option("--id", help="Release id (default r<seq>-<model>)")
    ] = None,
    sequence: Annotated[
        int | None, typer.Option("--sequence", help="Monotonic number (default: unix time)")
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="Embedding + OpenVINO cache")] = None,
) -> None:
    """Build each store's snapshot with BUNDLE, sign the release, publish bundle, snapshots, release.json."""
    from cloud.build import BuildError
    from cloud.catalog import CatalogError
    from cloud.fleet.release import ReleaseError, build_release
    from cloud.publish import PublishError
    from models.errors import ModelError
    from storelens.signing import SigningKeyError, load_private_key

    try:
        r = build_release(
            bundle,
            catalog,
            _stores(stores),
            load_private_key(key),
            to,
            release_id=release_id,
            sequence=sequence,
            cache_dir=cache_dir,
        )
    except (ReleaseError, BuildError, CatalogError, PublishError, ModelError, SigningKeyError, OSError,
            ValueError) as exc:
        _fail(str(exc))
    m = r.manifest
    typer.echo(
        f"OK release {m.release} #{m.sequence}: model {m.bundle.model_id[:12]}, stores "
        f"{', '.join(f'{s} v{ref.version}' for s, ref in sorted(m.stores.items()))} in {r.seconds:.1f} s"
    )
    typer.echo(r.url)
    for w in r.warnings:
        typer.echo(f"warning: {w}")


def rollout_cmd(
    release: Annotated[str, typer.Argument(help="release.json URL or path")],
    stores: Annotated[str, typer.Option("--stores", help="Comma-separated store ids")],
    broker: bc.Broker = None,
    iot: Annotated[bool, typer.Option("--iot", help="AWS IoT Jobs (= --broker iot://)")] = False,
    canary: Annotated[int, typer.Option("--canary", help="Kiosks in the canary stage")] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Kiosks per later stage")] = 10,
    timeout_s: Annotated[float, typer.Option("--timeout-s", help="Per-stage timeout")] = 1800.0,
    deadline_s: Annotated[
        float, typer.Option("--deadline-s", help="Kiosk gives up an update after")
    ] = 1800.0,
    probation_s: Annotated[
        float | None, typer.Option("--probation-s", help="Override kiosk probation")
    ] = None,
    config: bc.Config = None,
    username: bc.Username = None,
    password_env: bc.PasswordEnv = None,
    ca: bc.Ca = None,
    cert: bc.Cert = None,
    key: bc.Key = None,
) -> None:
    """Stage RELEASE to canary kiosks, then batches; halt (exit 1) at the first failed stage."""
    from cloud.fleet.channel import ChannelError, MqttChannel, RolloutChannel
    from cloud.fleet.rollout import Outcome, desired_for, run_rollout

    m, url, sig_url = _read_release(release)
    store_ids = _stores(stores)
    missing = [s for s in store_ids if s not in m.stores]
    if missing:
        _fail(f"release {m.release} has no snapshot for {', '.join(missing)}")
    settings = None if iot else bc.settings(broker, config, username, ca, cert, key, password_env)
    channel: RolloutChannel
    try:
        if settings is None or settings.is_iot:
            import boto3

            from cloud.fleet.iot_jobs import IotJobsChannel

            channel = IotJobsChannel(boto3.client("iot"))
        else:
            channel = MqttChannel(settings)
        try:
            found = channel.discover(store_ids, timeout_s=10.0)
            kiosks = [k for k in found if k.state != "offline"]
            for k in found:
                if k.state == "offline":
                    typer.echo(f"skip {k.store}/{k.kiosk}: offline")
            report = run_rollout(
                channel,
                desired_for(m, url, sig_url, deadline_s=deadline_s, probation_s=probation_s),
                kiosks,
                canary=canary,
                batch_size=batch_size,
                stage_timeout_s=timeout_s,
                on_progress=typer.echo,
            )
        finally:
            channel.close()
    except ChannelError as exc:
        _fail(str(exc))
    typer.echo(
        f"{report.outcome.value} in {report.seconds:.1f} s" + (f": {report.reason}" if report.reason else "")
    )
    if report.outcome is Outcome.HALTED:
        raise typer.Exit(1)


def status_cmd(
    stores: Annotated[str, typer.Option("--stores", help="Comma-separated store ids")],
    broker: bc.Broker = None,
    config: bc.Config = None,
    username: bc.Username = None,
    password_env: bc.PasswordEnv = None,
    ca: bc.Ca = None,
    cert: bc.Cert = None,
    key: bc.Key = None,
) -> None:
    """Every kiosk's state, model, snapshot and last update step (from the store broker)."""
    from cloud.fleet.channel import ChannelError, MqttChannel

    settings = bc.settings(broker, config, username, ca, cert, key, password_env)
    assert settings is not None
    if settings.is_iot:
        _fail("fleet status reads the kiosks' retained telemetry: it needs a store broker, not iot://")
    try:
        channel = MqttChannel(settings)
        try:
            views = channel.discover(_stores(stores), timeout_s=5.0)
        finally:
            channel.close()
    except ChannelError as exc:
        _fail(str(exc))
    typer.echo(f"{'STORE':<12} {'KIOSK':<14} {'STATE':<9} {'MODEL':<13} {'SNAP':>10}  UPDATE")
    for v in views:
        upd = f"{v.release} {v.step}{'' if v.ok in (None, True) else ' FAILED'}" if v.release else "-"
        typer.echo(
            f"{v.store:<12} {v.kiosk:<14} {v.state or '-':<9} {(v.model or '-')[:12]:<13} "
            f"{v.snapshot if v.snapshot is not None else '-':>10}  {upd}"
        )


def register(app: typer.Typer) -> None:
    """Add release/rollout/status to ``app`` (cloud.cli's fleet_app)."""
    app.command("release")(release_cmd)
    app.command("rollout")(rollout_cmd)
    app.command("status")(status_cmd)

"""`storelens feedback collect`: the collector service (on cloud.cli's feedback_app)."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from types import FrameType
from typing import Annotated, NoReturn

import typer

from cloud import broker_cli as bc
from cloud.feedback.relearn_cli import FEEDBACK_HELP

_LOGGER = logging.getLogger(__name__)

PASSWORD_ENV = "STORELENS_MQTT_PASSWORD"


def _fail(msg: str) -> NoReturn:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def collect_cmd(
    store: Annotated[str, typer.Option("--store", help="Store id whose kiosks' feedback to collect")],
    feedback_dir: Annotated[str, typer.Option("--feedback-dir", help=FEEDBACK_HELP)],
    snapshots: Annotated[
        Path | None,
        typer.Option("--snapshots", help="Folder `catalog publish --to file://DIR` writes: known snapshots"),
    ] = None,
    model: Annotated[
        list[str] | None, typer.Option("--model", help="A known model id, any snapshot (repeatable)")
    ] = None,
    client_id: Annotated[
        str | None,
        typer.Option("--client-id", help="Fixed MQTT client id (default storelens-feedback-STORE)"),
    ] = None,
    broker: bc.Broker = None,
    config: bc.Config = None,
    username: bc.Username = None,
    password_env: bc.PasswordEnv = None,
    ca: bc.Ca = None,
    cert: bc.Cert = None,
    key: bc.Key = None,
    rate_per_hour: Annotated[
        float, typer.Option("--rate-per-hour", help="Per-kiosk sustained rate; over it: not stored")
    ] = 3600.0,
    burst: Annotated[int, typer.Option("--burst", help="Per-kiosk messages at once")] = 300,
    relearn_request: Annotated[
        Path | None,
        typer.Option("--relearn-request", help="File rewritten every --relearn-after new records (a systemd "
                                               "path unit starts `feedback relearn` on it)"),
    ] = None,
    relearn_after: Annotated[
        int, typer.Option("--relearn-after", min=1, help="New records per relearn request")
    ] = 25,
) -> None:
    """Collect a store's kiosk feedback until SIGTERM/SIGINT (exit 1 when a write failed: restart me)."""
    from cloud.feedback.collector import BrokerConfig, CollectorError, FeedbackCollector
    from cloud.feedback.store import FeedbackStoreError, open_feedback_store
    from cloud.feedback.trigger import RelearnRequest
    from cloud.feedback.verify import KnownSnapshots
    from storelens.protocol import ProtocolError, check_id

    models = model or []
    if snapshots is None and not models:
        _fail("give --snapshots DIR (the published snapshots) or --model ID: unknown ones are refused")
    bad = [m for m in models if not (8 <= len(m) <= 64 and all(c in "0123456789abcdef" for c in m))]
    if bad:
        _fail(f"--model {bad[0]!r} is not a model id (8-64 lowercase hex)")
    bs = bc.settings(broker, config, username, ca, cert, key, password_env)
    assert bs is not None
    if bs.is_iot:
        _fail("the collector needs the store broker (a persistent MQTT session), not iot://")
    try:
        check_id(store, "store id")
        cfg = BrokerConfig(
            url=bs.url, client_id=check_id(client_id or f"storelens-feedback-{store}", "client id"),
            username=bs.username, password=bs.password, ca=None if bs.ca is None else str(bs.ca),
            cert=None if bs.cert is None else str(bs.cert), key=None if bs.key is None else str(bs.key),
        )
        known = KnownSnapshots(store, snapshots_dir=snapshots, model_ids=models)
        fstore = open_feedback_store(feedback_dir, create=True)
        hook = None
        if relearn_request is not None:
            if not relearn_request.parent.is_dir():
                _fail(f"--relearn-request: folder {relearn_request.parent} does not exist")
            hook = RelearnRequest(relearn_request, relearn_after)
        collector = FeedbackCollector(store, cfg, fstore, known, rate_per_hour=rate_per_hour, burst=burst,
                                      on_stored=hook)  # fmt: skip
    except (ProtocolError, CollectorError, FeedbackStoreError, OSError, ValueError) as exc:
        _fail(str(exc))

    def on_signal(signum: int, frame: FrameType | None) -> None:
        collector.request_stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            collector.start()
        except CollectorError as exc:
            _fail(str(exc))
        typer.echo(
            f"collecting feedback of {store} from {bs.where()} into {fstore.where} "
            f"(published snapshot versions {sorted(known.versions())}, {len(models)} model ids given)",
            err=True,
        )
        collector.wait_done()
    finally:
        collector.stop()
        for s, h in previous.items():
            signal.signal(s, h)
    typer.echo(f"feedback collector stopped: {collector.summary()}", err=True)
    if collector.failed.is_set():
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    from cloud.feedback import relearn_cli

    app.command("collect")(collect_cmd)
    relearn_cli.register(app)

"""The broker options every cloud command shares (``--broker --config --username --ca --cert --key``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from cloud.mqtt import BrokerSettings

_BROKER_HELP = ("mqtt[s]://HOST:PORT, ws[s]://HOST:PORT/PATH or iot:// "
                "(default: $STORELENS_BROKER, then [broker] url of --config)")
Broker = Annotated[str | None, typer.Option("--broker", help=_BROKER_HELP)]
Config = Annotated[
    Path | None,
    typer.Option("--config", help="Cloud config file with a [broker] section (default $STORELENS_CONFIG)"),
]
Username = Annotated[str | None, typer.Option("--username", help="Broker user ($STORELENS_MQTT_USERNAME)")]
PasswordEnv = Annotated[
    str | None, typer.Option("--password-env", help="Env var holding the password (STORELENS_MQTT_PASSWORD)")
]
Ca = Annotated[Path | None, typer.Option("--ca", help="CA file that signed the broker's certificate")]
Cert = Annotated[Path | None, typer.Option("--cert", help="Client certificate (PEM)")]
Key = Annotated[Path | None, typer.Option("--key", help="Client certificate's key (PEM)")]


def settings(
    broker: str | None,
    config: Path | None,
    username: str | None,
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    password_env: str | None = None,
    *,
    required: bool = True,
) -> BrokerSettings | None:
    """The resolved settings, or one ``error:`` line and exit 2."""
    from cloud.mqtt import BrokerError, resolve

    try:
        return resolve(broker, config=config, username=username, ca=ca, cert=cert, key=key,
                       password_env=password_env, required=required)  # fmt: skip
    except BrokerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None

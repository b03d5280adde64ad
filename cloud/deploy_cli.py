"""`storelens deploy broker`: provision a store broker (cloud.provision) as deploy/mosquitto expects it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

deploy_app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="Provision what deploy/ installs (store broker files)."
)
_HOST_HELP = "Broker host name or IP in its certificate (repeatable; the first is the URL's)"

_TEMPLATES = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto"


@deploy_app.command("broker")
def broker_cmd(
    store: Annotated[str, typer.Option("--store", help="This broker's store id (fills @STORE@ in the ACL)")],
    kiosks: Annotated[str, typer.Option("--kiosks", help="Comma-separated kiosk ids (their logins)")],
    host: Annotated[list[str], typer.Option("--host", help=_HOST_HELP)],
    out: Annotated[Path, typer.Option("--out", help="New folder for the files (must not exist)")],
    homeassistant: Annotated[
        bool, typer.Option("--homeassistant", help="Also a login for Home Assistant")
    ] = False,
    templates: Annotated[
        Path, typer.Option("--templates", help="deploy/mosquitto of this release")
    ] = _TEMPLATES,
) -> None:
    """CA + server certificate, one login per kiosk and service, password file, ACL and client files."""
    from cloud.provision import ProvisionError, provision_broker

    try:
        p = provision_broker(out, store, [k.strip() for k in kiosks.split(",") if k.strip()], host,
                             templates, homeassistant=homeassistant)  # fmt: skip
    except (ProvisionError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"OK store broker {p.store} at {p.broker_url}: {len(p.kiosks)} kiosk login(s), "
               f"{len(p.passwords) - len(p.kiosks)} service login(s) in {p.out}")  # fmt: skip
    typer.echo(f"keep {p.out / 'ca' / 'ca.key'} offline; install {p.out / 'broker'} on the store server")

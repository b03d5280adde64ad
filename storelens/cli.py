"""The one console script: `storelens model|catalog|keys|kiosk|dashboard|fleet|feedback|deploy ...`."""

from __future__ import annotations

import logging
import sys

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="StoreLens visual search for stores.")


def _register() -> None:
    # Each package owns its sub-app; imports here stay light (heavy libraries load inside commands).
    from cloud.cli import catalog_app, dashboard_app, feedback_app, fleet_app, keys_app
    from cloud.deploy_cli import deploy_app
    from device.cli import kiosk_app
    from models.cli import model_app

    app.add_typer(model_app, name="model")
    app.add_typer(catalog_app, name="catalog")
    app.add_typer(keys_app, name="keys")
    app.add_typer(kiosk_app, name="kiosk")
    app.add_typer(dashboard_app, name="dashboard")
    app.add_typer(fleet_app, name="fleet")
    app.add_typer(feedback_app, name="feedback")
    app.add_typer(deploy_app, name="deploy")


def main() -> None:
    """Entry point: configure logging once, then dispatch."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    _register()
    app()

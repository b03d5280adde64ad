"""The one console script: `storelens model|catalog|keys|kiosk|dashboard|fleet|feedback|deploy ...`."""

from __future__ import annotations

import importlib
import logging
import sys

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="StoreLens visual search for stores.")


# command -> (module, sub-app): imported only for the command being run (all of them for --help), so this
# contracts package imports nothing of models/device/cloud at import time and a kiosk-only install works.
_SUBAPPS: dict[str, tuple[str, str]] = {
    "model": ("models.cli", "model_app"),
    "catalog": ("cloud.cli", "catalog_app"),
    "keys": ("cloud.cli", "keys_app"),
    "kiosk": ("device.cli", "kiosk_app"),
    "dashboard": ("cloud.cli", "dashboard_app"),
    "fleet": ("cloud.cli", "fleet_app"),
    "feedback": ("cloud.cli", "feedback_app"),
    "deploy": ("cloud.deploy_cli", "deploy_app"),
}


def _register(argv: list[str]) -> None:
    wanted = [argv[1]] if len(argv) > 1 and argv[1] in _SUBAPPS else list(_SUBAPPS)
    for name in wanted:
        module, attr = _SUBAPPS[name]
        sub = getattr(importlib.import_module(module), attr)
        if name == "model":
            _add_tune(sub)
        app.add_typer(sub, name=name)


def _add_tune(model_app: typer.Typer) -> None:
    """`model tune` reads catalogs: the cloud side's command, absent from a kiosk-only install."""
    try:
        tune_cli = importlib.import_module("cloud.tune_cli")
    except ImportError:
        return
    tune_cli.register(model_app)


def main() -> None:
    """Entry point: configure logging once, then dispatch."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    _register(sys.argv)
    app()

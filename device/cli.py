"""`storelens kiosk run --config kiosk.toml`: load the one config, build the kiosk, run until a signal."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

kiosk_app = typer.Typer(no_args_is_help=True, add_completion=False, help="Run a StoreLens kiosk.")

_LOGGER = logging.getLogger(__name__)


@kiosk_app.callback()
def _kiosk() -> None:
    """Kiosk commands."""


@kiosk_app.command("run")
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="kiosk TOML file")],
    max_seconds: Annotated[float | None, typer.Option(help="stop after this many seconds")] = None,
    exit_at_eof: Annotated[bool, typer.Option(help="stop when a file source has been processed")] = False,
) -> None:
    """Run the kiosk: camera, held-item detection, search, MQTT, local screen. SIGTERM/SIGINT stop it."""
    from device.app import KioskApp
    from device.config import ConfigError, load_config
    from models.errors import ModelError
    from storelens.signing import SigningKeyError

    # What an installer gets wrong (a key, bundle or folder the config names): one line, exit 2.
    setup_errors = (ConfigError, SigningKeyError, ModelError, OSError)
    try:
        cfg = load_config(config)
        app = KioskApp(cfg)
    except setup_errors as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc

    def on_signal(signum: int, frame: FrameType | None) -> None:
        _LOGGER.info("signal %d: stopping", signum)
        app.stop_event.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    try:
        app.run(max_seconds=max_seconds, exit_at_eof=exit_at_eof)
    except setup_errors as exc:  # the model failed to load at start; the kiosk stopped what had started
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc

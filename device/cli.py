"""`storelens kiosk run --config kiosk.toml`: load the one config, build the kiosk, run until a signal."""

from __future__ import annotations

import faulthandler
import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

kiosk_app = typer.Typer(no_args_is_help=True, add_completion=False, help="Run a StoreLens kiosk.")

_LOGGER = logging.getLogger(__name__)

STOP_BUDGET_S = 15.0  # from SIGTERM to exit; deploy/systemd/storelens-kiosk.service gives 20 (TimeoutStopSec)


def _with_stderr_fd(arm: Callable[[], None]) -> None:
    """Arm a faulthandler hook; skipped where stderr is no file (an embedding host, a test runner)."""
    try:
        arm()
    except (OSError, ValueError, AttributeError) as exc:  # io.UnsupportedOperation: no fileno
        _LOGGER.debug("faulthandler not armed: %s", exc)


@kiosk_app.callback()
def _kiosk() -> None:
    """Kiosk commands."""


def installer_errors() -> tuple[type[Exception], ...]:
    """What an installer gets wrong (a key, bundle, folder, outbox file or video file the config names),
    whether found while building the kiosk or while its start loads the model: `kiosk run` says it in
    one line and exits 2 (the kiosk has stopped whatever had started)."""
    from device.camera.port import CameraError
    from device.comms.outbox import OutboxError
    from device.comms.port import TransportError
    from device.config import ConfigError
    from models.errors import ModelError
    from storelens.signing import SigningKeyError

    return ConfigError, CameraError, OutboxError, TransportError, SigningKeyError, ModelError, OSError


@kiosk_app.command("run")
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="kiosk TOML file")],
    max_seconds: Annotated[float | None, typer.Option(help="stop after this many seconds")] = None,
    exit_at_eof: Annotated[bool, typer.Option(help="stop when a file source has been processed")] = False,
) -> None:
    """Run the kiosk: camera, held-item detection, search, MQTT, local screen. SIGTERM/SIGINT stop it."""
    from device.app import KioskApp
    from device.config import load_config

    try:
        app = KioskApp(load_config(config, check_files=True))
        if threading.current_thread() is threading.main_thread():

            def on_signal(signum: int, frame: FrameType | None) -> None:
                _LOGGER.info("signal %d: stopping", signum)
                # Every part's stop is bounded, but a native call (a camera driver, a library's exit
                # handler) can still hang: past the budget, every thread's stack goes to stderr (the
                # journal) and the process exits 1, before systemd's TimeoutStopSec would SIGKILL it
                # with nothing said.
                _with_stderr_fd(lambda: faulthandler.dump_traceback_later(STOP_BUDGET_S, exit=True))
                app.stop_event.set()

            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
            # `kill -USR1 <pid>` writes every thread's stack to stderr (the journal): what ops need when
            # a kiosk hangs instead of stopping, without a debugger on the device.
            _with_stderr_fd(lambda: faulthandler.register(signal.SIGUSR1, all_threads=True))
        app.run(max_seconds=max_seconds, exit_at_eof=exit_at_eof)
    except installer_errors() as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc

"""`storelens dashboard serve`: serve the built staff page with a config.json naming broker and store.

The page needs no backend: it connects straight to the store's mosquitto over websockets with
read-only credentials. This server only hands out the static files of build/dashboard (built by
`make setup`), a generated config.json, and optionally the thumbnails of local snapshots.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Annotated, Any

import typer

from storelens.protocol import ProtocolError

_LOGGER = logging.getLogger(__name__)

DEFAULT_BUILD_DIR = Path(__file__).resolve().parents[2] / "build" / "dashboard"
PASSWORD_ENV = "STORELENS_DASHBOARD_PASSWORD"
_SNAPSHOTS_PREFIX = "/snapshots/"


class DashboardError(RuntimeError):
    """The dashboard cannot be served (not built, bad directory)."""


@dataclass(frozen=True, slots=True)
class PageConfig:
    """What the page reads from config.json. The credentials are the broker's read-only dashboard user."""

    broker_ws_url: str
    store: str
    username: str | None = None
    password: str | None = None
    thumbnail_base: str | None = None  # URL prefix; "{snapshot}" is replaced by the event's snapshot

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()


class _Handler(SimpleHTTPRequestHandler):
    """Static files from ``directory``; /config.json from memory; /snapshots/ from a second root."""

    def __init__(self, *args: Any, config_json: bytes, snapshots_dir: Path | None, **kwargs: Any) -> None:
        self._config_json = config_json
        self._snapshots_dir = snapshots_dir
        super().__init__(*args, **kwargs)

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")  # a rebuilt page or new config shows at once
        self.send_header("X-Content-Type-Options", "nosniff")
        super().end_headers()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/config.json":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(self._config_json)))
            self.end_headers()
            self.wfile.write(self._config_json)
            return
        super().do_GET()

    def translate_path(self, path: str) -> str:
        if self._snapshots_dir is not None and path.startswith(_SNAPSHOTS_PREFIX):
            # Same normalisation as the base class ('..' and absolute parts dropped), other root.
            rel = super().translate_path("/" + path[len(_SNAPSHOTS_PREFIX) :])
            return str(self._snapshots_dir / os.path.relpath(rel, self.directory))
        return super().translate_path(path)

    def log_message(self, format: str, *args: Any) -> None:
        _LOGGER.debug("%s %s", self.address_string(), format % args)


class DashboardServer:
    """A threaded HTTP server for the page; ``start()`` runs it in a thread, ``stop()`` joins it."""

    def __init__(
        self,
        host: str,
        port: int,
        config: PageConfig,
        *,
        static_dir: Path = DEFAULT_BUILD_DIR,
        snapshots_dir: Path | None = None,
    ) -> None:
        if not (static_dir / "index.html").is_file() or not (static_dir / "mqtt.min.js").is_file():
            raise DashboardError(f"{static_dir} has no built dashboard; run `make setup`")
        handler = functools.partial(
            _Handler, directory=str(static_dir), config_json=config.to_json(), snapshots_dir=snapshots_dir
        )
        try:
            self._httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:  # port taken, no permission for it, unknown or foreign address
            raise DashboardError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{shown!s}:{port}/"

    def serve_forever(self) -> None:
        """Block serving requests until ``stop()`` (from another thread) or KeyboardInterrupt."""
        self._httpd.serve_forever(poll_interval=0.2)

    def start(self) -> DashboardServer:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, name="dashboard-http", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, close the socket and join the thread."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout)
            if self._thread.is_alive():
                _LOGGER.warning("dashboard HTTP thread still alive after %.1f s", timeout)
            self._thread = None
        self._httpd.server_close()


def serve(
    host: str,
    port: int,
    broker_ws_url: str,
    username: str | None,
    password: str | None,
    store: str,
    *,
    static_dir: Path = DEFAULT_BUILD_DIR,
    snapshots_dir: Path | None = None,
) -> None:
    """Serve the dashboard until interrupted, printing its URL."""
    from storelens.protocol import check_id

    if snapshots_dir is not None and not snapshots_dir.is_dir():  # a typo would only show as missing images
        raise DashboardError(f"snapshots folder {snapshots_dir} does not exist (thumbnails come from it)")
    config = PageConfig(
        broker_ws_url=broker_ws_url,
        store=check_id(store, "store id"),
        username=username,
        password=password,
        thumbnail_base=_SNAPSHOTS_PREFIX.lstrip("/") + "{snapshot}/" if snapshots_dir is not None else None,
    )
    server = DashboardServer(host, port, config, static_dir=static_dir, snapshots_dir=snapshots_dir)
    typer.echo(f"StoreLens dashboard for store {store}: {server.url}  (broker {broker_ws_url})")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command to ``app`` (the ``storelens dashboard`` sub-app)."""

    @app.command("serve")
    def serve_cmd(
        store: Annotated[str, typer.Option(help="Store id whose kiosks to show.")],
        broker_ws_url: Annotated[
            str,
            typer.Option("--broker", help="Broker websockets URL; {host} = the host the page came from."),
        ] = "ws://{host}:9001",
        username: Annotated[str, typer.Option(help="Read-only broker user.")] = "dashboard",
        password: Annotated[
            str | None, typer.Option(envvar=PASSWORD_ENV, help="Its password (prefer the env variable).")
        ] = None,
        host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
        port: Annotated[int, typer.Option(help="HTTP port.")] = 8080,
        static_dir: Annotated[Path, typer.Option(help="Built page (make setup).")] = DEFAULT_BUILD_DIR,
        snapshots_dir: Annotated[
            Path | None, typer.Option(help="Folder of snapshot folders named by version, for thumbnails.")
        ] = None,
    ) -> None:
        """Serve the staff dashboard (static page + config.json) and print its URL."""
        try:
            serve(
                host,
                port,
                broker_ws_url,
                username,
                password,
                store,
                static_dir=static_dir,
                snapshots_dir=snapshots_dir,
            )
        except (DashboardError, ProtocolError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc

"""`storelens dashboard serve`: serve the built staff page with a config.json naming broker and store.

The live page needs no backend: it connects straight to the store's mosquitto over websockets with
read-only credentials. This server hands out the static files of build/dashboard (built by
`make setup`), a generated config.json, the thumbnails of local snapshots (cloud/dashboard/snapshots.py)
and, with ``--feedback-dir``, the review queue's JSON API (cloud/dashboard/review.py) behind a staff login
(HTTP Basic against ``--staff-users``, cloud/dashboard/staff.py).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import mimetypes
import os
import sys
import threading
import urllib.parse
from dataclasses import asdict, dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Annotated, Any

import typer

from cloud.dashboard import review
from cloud.dashboard.snapshots import SnapshotShelf
from cloud.dashboard.staff import StaffError, StaffUsers, add_user
from cloud.feedback.store import FeedbackStoreError, open_feedback_store
from storelens.protocol import ProtocolError

_LOGGER = logging.getLogger(__name__)

DEFAULT_BUILD_DIR = Path(__file__).resolve().parents[2] / "build" / "dashboard"
PASSWORD_ENV = "STORELENS_DASHBOARD_PASSWORD"
STAFF_PASSWORD_ENV = "STORELENS_STAFF_PASSWORD"
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
    review: bool = False  # the review queue is served (the page links to it)

    def to_json(self) -> bytes:
        body = asdict(self)
        if not self.review:
            del body["review"]  # unchanged config.json for dashboards without a review queue
        return json.dumps(body, separators=(",", ":")).encode()


class _Handler(SimpleHTTPRequestHandler):
    """Static files from ``directory``; /config.json from memory; /snapshots/ and /api/ from ``app``."""

    def __init__(self, *args: Any, app: _App, **kwargs: Any) -> None:
        self._app = app
        super().__init__(*args, **kwargs)

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")  # a rebuilt page or new config shows at once
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")  # no clickjacking of the review buttons
        super().end_headers()

    def _who(self) -> str | None:
        """The signed-in staff name; answers 401 and returns None when a login is needed and missing."""
        if self._app.staff is None:
            return ""
        who = self._app.staff.check_basic(self.headers.get("Authorization"))
        if who is None:
            body = b"staff login required"
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="StoreLens staff", charset="UTF-8"')
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        return who

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj, separators=(",", ":")).encode(), "application/json")

    def _file(self, path: Path | None, content_type: str | None = None) -> None:
        if path is None:
            self._json(404, {"error": "not found"})
            return
        try:
            data = path.read_bytes()
        except OSError:
            self._json(404, {"error": "not found"})
            return
        ctype = content_type or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        self._send(200, data, ctype)

    def do_GET(self) -> None:
        who = self._who()
        if who is None:
            return
        url = urllib.parse.urlsplit(self.path)
        path = url.path
        if path == "/config.json":
            self._send(200, self._app.config_json, "application/json")
        elif path.startswith(_SNAPSHOTS_PREFIX):
            version, _, rel = path[len(_SNAPSHOTS_PREFIX) :].partition("/")
            shelf, ok = self._app.shelf, version.isdigit() and len(version) < 16
            found = shelf.file(int(version), rel) if shelf is not None and ok else None
            self._file(found)
        elif path == "/api/models":
            self._json(200, {"models": self._app.shelf.models() if self._app.shelf else {}})
        elif path == review.API or path.startswith(review.API + "/"):
            self._review_get(path, urllib.parse.parse_qs(url.query), who)
        else:
            super().do_GET()

    def _review_get(self, path: str, query: dict[str, list[str]], who: str) -> None:
        queue = self._app.queue
        if queue is None:
            self._json(404, {"error": "no review queue: serve with --feedback-dir"})
            return
        try:
            if path == review.API:
                status = query.get("status", ["pending"])[0]
                self._json(200, queue.listing(status, query.get("store", [None])[0], who))
            elif path.startswith(review.CROP_PREFIX) and path.endswith(".jpg"):
                self._file(queue.crop(path[len(review.CROP_PREFIX) : -4]), "image/jpeg")
            else:
                self._json(404, {"error": "not found"})
        except review.ReviewError as exc:
            self._json(exc.status, {"error": str(exc)})

    def do_POST(self) -> None:
        who = self._who()
        if who is None:
            return
        queue = self._app.queue
        if urllib.parse.urlsplit(self.path).path != review.DECIDE or queue is None:
            self._json(404, {"error": "not found"})
            return
        try:
            self._check_same_origin()
            length = int(self.headers.get("Content-Length") or "0")
            if length <= 0 or length > review.MAX_BODY_BYTES:
                raise review.ReviewError(400, f"body of {length} bytes (1-{review.MAX_BODY_BYTES})")
            try:
                body = json.loads(self.rfile.read(length))
            except ValueError as exc:
                raise review.ReviewError(400, f"the body is not JSON: {exc}") from exc
            self._json(200, queue.decide(body, who))
        except review.ReviewError as exc:
            _LOGGER.warning("review decision refused (%s): %s", who or "-", exc)
            self._json(exc.status, {"error": str(exc)})

    def _check_same_origin(self) -> None:
        """CSRF: a JSON body, the custom header (cross-site pages cannot send it without a CORS
        preflight, which this server never allows) and, when the browser names one, our own origin."""
        if self.headers.get(review.CSRF_HEADER) != "1":
            raise review.ReviewError(403, f"missing {review.CSRF_HEADER} header")
        if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
            raise review.ReviewError(415, "the body must be application/json")
        origin = self.headers.get("Origin")
        if origin is not None and urllib.parse.urlsplit(origin).netloc != self.headers.get("Host"):
            raise review.ReviewError(403, f"cross-origin request from {origin[:80]!r}")

    def log_message(self, format: str, *args: Any) -> None:
        _LOGGER.debug("%s %s", self.address_string(), format % args)


@dataclass(frozen=True, slots=True)
class _App:
    """What every request handler shares."""

    config_json: bytes
    shelf: SnapshotShelf | None
    queue: review.ReviewQueue | None
    staff: StaffUsers | None


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
        feedback_dir: str | Path | None = None,
        staff: StaffUsers | None = None,
    ) -> None:
        if not (static_dir / "index.html").is_file() or not (static_dir / "mqtt.min.js").is_file():
            raise DashboardError(f"{static_dir} has no built dashboard; run `make setup`")
        shelf = SnapshotShelf(snapshots_dir, config.store) if snapshots_dir is not None else None
        queue = None
        if feedback_dir is not None:
            if staff is None or shelf is None:  # decisions need a who; the picker needs the catalog
                raise DashboardError("the review queue (--feedback-dir) needs --staff-users and "
                                     "--snapshots-dir")
            try:
                feedback = open_feedback_store(feedback_dir)
            except FeedbackStoreError as exc:
                raise DashboardError(f"{exc} (the collector writes it)") from exc
            queue = review.ReviewQueue(feedback, shelf, config.store)
            config = PageConfig(**{**asdict(config), "review": True})
        app = _App(config.to_json(), shelf, queue, staff)
        handler = functools.partial(_Handler, directory=str(static_dir), app=app)
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
    feedback_dir: str | None = None,
    staff_users: Path | None = None,
) -> None:
    """Serve the dashboard until interrupted, printing its URL."""
    from storelens.protocol import check_id

    if snapshots_dir is not None and not snapshots_dir.is_dir():  # a typo would only show as missing images
        raise DashboardError(f"snapshots folder {snapshots_dir} does not exist (thumbnails come from it)")
    try:
        staff = StaffUsers(staff_users) if staff_users is not None else None
    except StaffError as exc:
        raise DashboardError(str(exc)) from exc
    if staff is not None and not _is_loopback(host):
        _LOGGER.warning("staff passwords cross the network in clear on http://%s:%d: put TLS in front",
                        host, port)
    config = PageConfig(
        broker_ws_url=broker_ws_url,
        store=check_id(store, "store id"),
        username=username,
        password=password,
        thumbnail_base=_SNAPSHOTS_PREFIX.lstrip("/") + "{snapshot}/" if snapshots_dir is not None else None,
    )
    server = DashboardServer(host, port, config, static_dir=static_dir, snapshots_dir=snapshots_dir,
                             feedback_dir=feedback_dir, staff=staff)  # fmt: skip
    typer.echo(f"StoreLens dashboard for store {store}: {server.url}  (broker {broker_ws_url})")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def register(app: typer.Typer) -> None:
    """Add the ``serve`` and ``add-staff`` commands to ``app`` (the ``storelens dashboard`` sub-app)."""

    @app.command("serve")
    def serve_cmd(
        store: Annotated[str, typer.Option(help="Store id whose kiosks to show.")],
        broker_ws_url: Annotated[
            str,
            typer.Option("--broker", help="Broker websockets URL; {host} = the host the page came from."),
        ] = "wss://{host}:9001",  # the shipped store broker: TLS websockets
        username: Annotated[str, typer.Option(help="Read-only broker user.")] = "dashboard",
        password: Annotated[
            str | None, typer.Option(envvar=PASSWORD_ENV, help="Its password (prefer the env variable).")
        ] = None,
        host: Annotated[
            str, typer.Option(help="Address to listen on (0.0.0.0: every interface; put TLS in front).")
        ] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="HTTP port.")] = 8080,
        static_dir: Annotated[Path, typer.Option(help="Built page (make setup).")] = DEFAULT_BUILD_DIR,
        snapshots_dir: Annotated[
            Path | None,
            typer.Option(help="Snapshot folders (a kiosk state root or catalog build outputs): thumbnails, "
                              "the catalog for review, model names."),
        ] = None,
        feedback_dir: Annotated[
            str | None,
            typer.Option(help="Feedback store to review, a folder or s3://bucket/prefix (needs "
                              "--staff-users, --snapshots-dir)."),
        ] = None,
        staff_users: Annotated[
            Path | None, typer.Option(help="Staff logins file (add-staff); the whole page then needs one.")
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
                feedback_dir=feedback_dir,
                staff_users=staff_users,
            )
        except (DashboardError, ProtocolError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc

    @app.command("add-staff")
    def add_staff_cmd(
        users: Annotated[Path, typer.Option(help="Staff logins file (created if missing).")],
        name: Annotated[str, typer.Option(help="Login name, stored with every decision it makes.")],
    ) -> None:
        """Add a staff login (or set its password): the password from $STORELENS_STAFF_PASSWORD or stdin."""
        password = os.environ.get(STAFF_PASSWORD_ENV)
        if password is None:
            if sys.stdin.isatty():
                import getpass

                password = getpass.getpass(f"password for {name}: ")
            else:
                password = sys.stdin.readline().rstrip("\r\n")
        try:
            new = add_user(users, name, password)
        except (StaffError, OSError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
        typer.echo(f"{'added' if new else 'updated'} staff login {name} in {users}")

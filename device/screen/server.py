"""The kiosk's own screen: a local web page (stdlib HTTP server), live MJPEG preview, SSE state pushes.

Everything is served from the kiosk itself (page, preview, catalog thumbnails from the active snapshot),
so the screen keeps working with the network down. JPEG encoding happens in the HTTP threads, lazily and
at most ``preview_fps`` times a second, never on the frame path.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final

import cv2
import numpy as np

from device.camera.port import Image
from device.config import ScreenConfig
from device.screen.page import PAGE

_LOGGER = logging.getLogger(__name__)

_WAIT_S: Final = 0.5  # streaming handlers re-check the closing flag this often
_KEEPALIVE_S: Final = 15.0  # SSE comment line so proxies and the browser keep the stream open
_PREVIEW_WIDTH: Final = 640  # preview is downscaled to this: enough for a kiosk panel, cheap to encode
_BOX_COLOURS: Final = {"present": (0, 200, 255), "steady": (0, 140, 255), "result_shown": (80, 220, 60)}


@dataclass(frozen=True, slots=True)
class PreviewFrame:
    seq: int
    image: Image
    box: tuple[int, int, int, int] | None
    state: str


class ScreenServer:
    """Serves ``/`` (page), ``/events`` (SSE), ``/preview.mjpg``/``.jpg``, ``/api/state``, ``/thumbs/``."""

    def __init__(self, cfg: ScreenConfig, *, thumbs_dir: Callable[[], Path | None] = lambda: None) -> None:
        self._cfg = cfg
        self._thumbs_dir = thumbs_dir
        self._cond = threading.Condition()
        self._closing = threading.Event()
        self._state: dict[str, Any] = {"status": "starting", "camera": "stopped", "detect": "idle",
                                       "snapshot": None, "model": None, "result": None, "version": 0,
                                       "price_format": {"currency": cfg.currency, "locale": cfg.locale}}
        self._preview: PreviewFrame | None = None
        self._jpeg: tuple[int, bytes] | None = None
        self._jpeg_lock = threading.Lock()
        self._result_t: float | None = None
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --
    def start(self) -> None:
        """Bind and serve on a named thread."""
        handler = type("Handler", (_Handler,), {"screen": self})
        addr = (self._cfg.host, self._cfg.port)
        try:
            self._httpd = ThreadingHTTPServer(addr, handler)
        except OSError as exc:  # port taken, no permission for it, unknown or foreign address: name it
            raise OSError(exc.errno, f"kiosk screen cannot listen on {addr[0]}:{addr[1]} ([screen] in the "
                                     f"config): {exc.strerror or exc}") from exc  # fmt: skip
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="screen-http", daemon=True)
        self._thread.start()
        _LOGGER.info("kiosk screen on %s", self.url)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Close streams, stop serving, join."""
        self._closing.set()
        with self._cond:
            self._cond.notify_all()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                _LOGGER.error("screen thread still alive after %.1f s", timeout_s)
        self._httpd = self._thread = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1]) if self._httpd else self._cfg.port

    @property
    def url(self) -> str:
        return f"http://{self._cfg.host}:{self.port}/"

    # -- pushes from the kiosk --
    def show_frame(self, seq: int, image: Image, box: tuple[int, int, int, int] | None, state: str) -> None:
        """Latest frame for the preview (a reference, no copy) and the detector state."""
        now = time.monotonic()
        with self._cond:
            self._preview = PreviewFrame(seq, image, box, state)
            changed = self._state["detect"] != state
            expired = self._result_t is not None and now - self._result_t > self._cfg.result_hold_s
            if state == "idle" and expired:
                self._state["result"], self._result_t, changed = None, None, True
            if changed:
                self._state["detect"] = state
                self._bump()
            else:
                self._cond.notify_all()

    def show_result(self, result: dict[str, Any]) -> None:
        """A held item's answer: {matched, results: [{sku,title,price,location,score,thumbnail}], ...}."""
        shown = dict(result)
        shown["results"] = [dict(r, thumbnail_url=_thumb_url(r.get("thumbnail"))) for r in result["results"]]
        with self._cond:
            self._state["result"] = shown
            self._result_t = time.monotonic()
            self._bump()

    def set_status(self, **fields: Any) -> None:
        """Update status fields (status, camera, snapshot, model) and push them."""
        with self._cond:
            if all(self._state.get(k) == v for k, v in fields.items()):
                return
            self._state.update(fields)
            self._bump()

    def state(self) -> dict[str, Any]:
        """A copy of what the page shows."""
        with self._cond:
            copy: dict[str, Any] = json.loads(json.dumps(self._state))
        return copy

    def _bump(self) -> None:
        self._state["version"] += 1
        self._cond.notify_all()

    # -- for the handlers --
    def _wait(self, seen: int, key: str) -> int | None:
        """Block until the state version (key 'state') or frame seq (key 'frame') passes ``seen``."""
        with self._cond:
            while not self._closing.is_set():
                if key == "state":
                    cur = self._state["version"]
                else:
                    cur = self._preview.seq if self._preview else -1
                if cur != seen:
                    return int(cur)
                if not self._cond.wait(_WAIT_S) and key == "state":
                    return None  # timeout: caller may send a keep-alive
            return None

    def jpeg(self) -> bytes | None:
        """The latest preview frame as JPEG with the item box drawn (encoded once per frame)."""
        with self._cond:
            pf = self._preview
        if pf is None:
            return None
        with self._jpeg_lock:
            if self._jpeg is not None and self._jpeg[0] == pf.seq:
                return self._jpeg[1]
            img = pf.image
            scale = min(1.0, _PREVIEW_WIDTH / img.shape[1])
            if scale < 1.0:
                img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            else:
                img = np.array(img, copy=True)
            if pf.box is not None:
                x, y, w, h = (int(v * scale) for v in pf.box)
                cv2.rectangle(img, (x, y), (x + w, y + h), _BOX_COLOURS.get(pf.state, (200, 200, 200)), 3)
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 75])
            if not ok:
                return None
            self._jpeg = (pf.seq, buf.tobytes())
            return self._jpeg[1]

    def thumb_path(self, rel: str) -> Path | None:
        """A thumbnail file inside the active snapshot, or None (never outside it)."""
        root = self._thumbs_dir()
        if root is None:
            return None
        root = root.resolve()
        p = (root / rel).resolve()
        return p if root in p.parents and p.is_file() else None


def _thumb_url(path: object) -> str | None:
    """The URL of a snapshot-relative thumbnail path (as in MatchItem.thumbnail)."""
    return "/thumbs/" + urllib.parse.quote(str(path)) if path else None


class _Handler(BaseHTTPRequestHandler):
    screen: ScreenServer
    timeout = 10  # a stuck client cannot hold a handler thread forever
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        _LOGGER.debug("screen %s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        try:
            if path in ("/", "/index.html"):
                self._send(200, "text/html; charset=utf-8", PAGE.encode())
            elif path == "/api/state":
                self._send(200, "application/json", json.dumps(self.screen.state()).encode())
            elif path == "/events":
                self._events()
            elif path == "/preview.mjpg":
                self._mjpeg()
            elif path == "/preview.jpg":
                data = self.screen.jpeg()
                if data:
                    self._send(200, "image/jpeg", data)
                else:
                    self._send(404, "text/plain", b"no frame yet")
            elif path.startswith("/thumbs/"):
                p = self.screen.thumb_path(urllib.parse.unquote(path[len("/thumbs/"):]))
                if p is None:
                    self._send(404, "text/plain", b"not found")
                else:
                    self._send(200, "image/jpeg" if p.suffix.lower() in (".jpg", ".jpeg") else "image/png",
                               p.read_bytes(), cache=True)
            else:
                self._send(404, "text/plain", b"not found")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            _LOGGER.debug("screen client went away")

    def _send(self, code: int, ctype: str, body: bytes, *, cache: bool = False) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _events(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        seen, last_sent = -1, time.monotonic()
        while not self.screen._closing.is_set():
            ver = self.screen._wait(seen, "state")
            if ver is None:
                if time.monotonic() - last_sent > _KEEPALIVE_S:
                    self.wfile.write(b": keep-alive\n\n")
                    self.wfile.flush()
                    last_sent = time.monotonic()
                continue
            seen = ver
            data = json.dumps(self.screen.state(), separators=(",", ":"))
            self.wfile.write(f"event: state\ndata: {data}\n\n".encode())
            self.wfile.flush()
            last_sent = time.monotonic()

    def _mjpeg(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        period_s = 1.0 / self.screen._cfg.preview_fps
        seen = -2
        while not self.screen._closing.is_set():
            t0 = time.monotonic()
            cur = self.screen._wait(seen, "frame")
            if cur is None:
                continue
            seen = cur
            data = self.screen.jpeg()
            if data:
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                 + str(len(data)).encode() + b"\r\n\r\n" + data + b"\r\n")
                self.wfile.flush()
            self.screen._closing.wait(max(0.0, period_s - (time.monotonic() - t0)))

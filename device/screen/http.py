"""The kiosk screen's HTTP side: the page's static files, and the request handler (page, thumbnails,
MJPEG preview, SSE state pushes, ``POST /answer``) that serves one ``ScreenServer``."""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from device.screen.answers import AnswerRefused

if TYPE_CHECKING:
    from device.screen.server import ScreenServer

_LOGGER = logging.getLogger(__name__)

_KEEPALIVE_S: Final = 15.0  # SSE comment line so proxies and the browser keep the stream open
_STATIC: Final = Path(__file__).resolve().parent / "static"  # packaged with the wheel (hatch: all files)
_STATIC_TYPES: Final = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
                        ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
_MAX_ANSWER_BYTES: Final = 4096  # a tap is ~100 bytes of JSON; anything bigger is not the page


def load_static() -> dict[str, tuple[str, bytes]]:
    """URL path -> (content type, bytes) of every file under static/ (``/`` is index.html)."""
    files: dict[str, tuple[str, bytes]] = {}
    for p in sorted(_STATIC.rglob("*")):
        if p.is_file() and p.suffix in _STATIC_TYPES:
            files["/static/" + p.relative_to(_STATIC).as_posix()] = (_STATIC_TYPES[p.suffix], p.read_bytes())
    index = files.get("/static/index.html")
    if index is None:
        raise FileNotFoundError(f"kiosk screen page missing: {_STATIC / 'index.html'} (broken install?)")
    files["/"] = files["/index.html"] = index
    return files



class ScreenHandler(BaseHTTPRequestHandler):
    """One request to the screen (``screen`` is set on a subclass per server)."""

    screen: ScreenServer
    timeout = 10  # a stuck client cannot hold a handler thread forever
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        _LOGGER.debug("screen %s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        try:
            static = self.screen.static_file(path)
            if static is not None:
                self._send(200, static[0], static[1])
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

    def do_POST(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        try:
            if path != "/answer":
                self._send(404, "text/plain", b"not found")
                return
            try:
                match_id, answer, sku = self._answer_body()
                a = self.screen.take_answer(match_id, answer, sku)
            except AnswerRefused as exc:
                _LOGGER.warning("screen answer refused (%d): %s", exc.status, exc)
                self._send(exc.status, "application/json", json.dumps({"error": str(exc)}).encode())
                return
            self._send(200, "application/json", json.dumps({"ok": True, "answer": a.answer}).encode())
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            _LOGGER.debug("screen client went away")

    def _answer_body(self) -> tuple[str, str, str | None]:
        """The posted tap as (match_id, answer, sku); AnswerRefused(400/413) naming what is wrong."""
        try:
            length = int(self.headers.get("Content-Length") or "")
        except ValueError:
            self.close_connection = True
            raise AnswerRefused(411, "answer needs a Content-Length") from None
        if length < 0 or length > _MAX_ANSWER_BYTES:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            raise AnswerRefused(413, f"answer body of {length} bytes (at most {_MAX_ANSWER_BYTES})")
        try:
            body = json.loads(self.rfile.read(length))
        except (ValueError, UnicodeDecodeError) as exc:
            raise AnswerRefused(400, f"answer is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise AnswerRefused(400, "answer must be a JSON object")
        match_id, answer, sku = body.get("match_id"), body.get("answer"), body.get("sku")
        if not isinstance(match_id, str) or not isinstance(answer, str):
            raise AnswerRefused(400, "answer needs match_id and answer (strings)")
        if sku is not None and not isinstance(sku, str):
            raise AnswerRefused(400, "sku must be a string")
        return match_id, answer, sku

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

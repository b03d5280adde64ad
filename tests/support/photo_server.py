"""A photo server on loopback for download tests: real HTTP, scripted failures, concurrency counted."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class PhotoServer:
    """Serves ``files`` (path -> bytes) on 127.0.0.1; ``fail_first[path]`` 503s before the bytes."""

    def __init__(self, hold_s: float = 0.0) -> None:
        self.files: dict[str, bytes] = {}
        self.fail_first: dict[str, int] = {}
        self.requests: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.hold_s = hold_s  # each request waits this long (on an Event) so overlapping ones are counted
        self._lock = threading.Lock()
        self._never = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server._lock:
                    server.requests[self.path] = server.requests.get(self.path, 0) + 1
                    n = server.requests[self.path]
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    server._never.wait(server.hold_s)
                    body = server.files.get(self.path)
                    if body is None:
                        self.send_error(404)
                    elif n <= server.fail_first.get(self.path, 0):
                        self.send_error(503)
                    else:
                        self.send_response(200)
                        self.send_header("Content-Type", "image/jpeg")
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="photo-server")

    def url(self, path: str) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}{path}"

    def __enter__(self) -> PhotoServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

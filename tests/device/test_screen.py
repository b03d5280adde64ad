"""The kiosk's local screen: page, JSON state, SSE pushes, MJPEG preview, thumbnails inside the snapshot."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from device.config import ScreenConfig
from device.screen import ScreenServer


@pytest.fixture
def screen(tmp_path: Path) -> Iterator[ScreenServer]:
    (tmp_path / "snap" / "thumbs").mkdir(parents=True)
    (tmp_path / "snap" / "thumbs" / "a.jpg").write_bytes(b"\xff\xd8jpeg")
    (tmp_path / "secret.txt").write_text("no")
    s = ScreenServer(ScreenConfig(port=0, preview_fps=50), thumbs_dir=lambda: tmp_path / "snap")
    s.start()
    yield s
    s.stop()


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def test_page_state_and_thumbnails(screen: ScreenServer) -> None:
    code, body = _get(screen.url)
    assert code == 200 and b"EventSource" in body and b"ask staff" in body
    screen.set_status(status="online", camera="streaming", snapshot=3)
    code, body = _get(screen.url + "api/state")
    state = json.loads(body)
    assert state["status"] == "online" and state["snapshot"] == 3 and state["result"] is None
    assert state["price_format"] == {"currency": None, "locale": "en-US"}  # the page formats prices with it
    assert _get(screen.url + "thumbs/thumbs/a.jpg") == (200, b"\xff\xd8jpeg")
    assert _get(screen.url + "thumbs/..%2Fsecret.txt")[0] == 404  # never outside the snapshot
    assert _get(screen.url + "preview.jpg")[0] == 404  # no frame yet


def test_sse_pushes_a_result_and_mjpeg_streams_frames(screen: ScreenServer) -> None:
    """The page is updated by push: a result must arrive on /events without polling."""
    with urllib.request.urlopen(screen.url + "events", timeout=5) as stream:
        first = json.loads(_next_event(stream))
        screen.show_result({"matched": True, "results": [
            {"sku": "a", "title": "Apple", "price": "1.00", "location": "Aisle 1", "score": 0.9,
             "thumbnail": "thumbs/a.jpg"}]})
        pushed = json.loads(_next_event(stream))
    assert pushed["version"] > first["version"]
    assert pushed["result"]["results"][0]["thumbnail_url"] == "/thumbs/thumbs/a.jpg"
    frame = np.zeros((480, 640, 3), np.uint8)
    screen.show_frame(1, frame, (10, 10, 100, 100), "steady")
    with urllib.request.urlopen(screen.url + "preview.mjpg", timeout=5) as stream:
        assert stream.readline().strip() == b"--frame"
        assert stream.readline().startswith(b"Content-Type: image/jpeg")
    code, body = _get(screen.url + "preview.jpg")
    assert code == 200 and body[:2] == b"\xff\xd8"


def _next_event(stream: object) -> str:
    data = ""
    while True:
        line = stream.readline().decode()  # type: ignore[attr-defined]
        if line.startswith("data: "):
            data = line[6:]
        elif line == "\n" and data:
            return data


def test_a_taken_port_names_the_address_and_the_config_section() -> None:
    """Another process on the screen's port: the error must say where, not a bare "Address already in use"."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        s = ScreenServer(ScreenConfig(host="127.0.0.1", port=port))
        with pytest.raises(OSError, match=rf"127\.0\.0\.1:{port} \(\[screen\]"):
            s.start()
        s.stop()

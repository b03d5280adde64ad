"""The kiosk's local screen: page, JSON state, SSE pushes, MJPEG preview, thumbnails inside the snapshot."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from device.config import ScreenConfig
from device.screen import ScreenServer
from device.screen.answers import Answer


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
    assert code == 200 and b'src="/static/kiosk.js"' in body  # the page is static files, served locally
    code, body = _get(screen.url + "static/kiosk.js")
    assert code == 200 and b"EventSource" in body and b"ask staff" in body and b"/answer" in body
    assert _get(screen.url + "static/kiosk.css")[0] == 200
    assert _get(screen.url + "static/../server.py")[0] == 404
    screen.set_status(status="online", camera="streaming", snapshot=3)
    code, body = _get(screen.url + "api/state")
    state = json.loads(body)
    assert state["status"] == "online" and state["snapshot"] == 3 and state["result"] is None
    assert state["broker"] is None and state["feedback_note"] is False
    screen.set_status(broker="offline")
    assert json.loads(_get(screen.url + "api/state")[1])["broker"] == "offline"  # the page shows "offline"
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


def _post(url: str, body: bytes) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _result(match_id: str, skus: list[str], matched: bool = True) -> dict[str, object]:
    return {"id": match_id, "matched": matched, "results": [
        {"sku": s, "title": s.upper(), "price": "1.00", "location": "A1", "score": 0.9, "thumbnail": None}
        for s in skus]}


def test_answers_are_checked_against_what_was_shown(tmp_path: Path) -> None:
    """A tap for a result not on screen, a sku not shown, a second tap or junk must be refused with a reason
    (never a traceback, never handed to the kiosk); one good tap is handed over exactly once."""
    got: list[Answer] = []
    s = ScreenServer(ScreenConfig(port=0), answer_timeout_s=60, on_answer=got.append)
    s.start()
    try:
        url = s.url + "answer"
        s.show_result(_result("m1", ["a", "b", "c", "d", "e"]))
        assert _post(url, b'{"match_id": "zz", "answer": "confirmed", "sku": "a"}')[0] == 404
        code, body = _post(url, b'{"match_id": "m1", "answer": "confirmed", "sku": "e"}')
        assert code == 400 and "not shown" in str(body["error"])  # the 5th hit is not on screen
        assert _post(url, b'{"match_id": "m1", "answer": "maybe"}')[0] == 400
        assert _post(url, b'{"match_id": "m1", "answer": "not_here", "sku": "a"}')[0] == 400
        assert _post(url, b"[1, 2]")[0] == 400
        assert _post(url, b"not json")[0] == 400
        assert _post(url, b"x" * 5000)[0] == 413
        assert got == []
        assert _post(url, b'{"match_id": "m1", "answer": "confirmed", "sku": "d"}') == (
            200, {"ok": True, "answer": "confirmed"})
        assert _post(url, b'{"match_id": "m1", "answer": "not_here"}')[0] == 409  # one answer per result
        assert [(a.match_id, a.answer, a.sku, a.shown) for a in got] == [
            ("m1", "confirmed", "d", ("a", "b", "c", "d"))]
        assert s.state()["result"]["ask"] == {"shown": ["a", "b", "c", "d"], "state": "confirmed", "sku": "d"}
        s.show_result(_result("m2", ["x", "y"]))
        s.show_result(_result("m3", ["y"]))  # m2 left the screen unanswered
        assert [(a.match_id, a.answer) for a in got[1:]] == [("m2", "no_answer")]
        assert _post(url, b'{"match_id": "m2", "answer": "confirmed", "sku": "x"}')[0] == 409
    finally:
        s.stop()


def test_an_unanswered_result_times_out_as_no_answer() -> None:
    """Nobody taps: after the configured timeout the kiosk gets no_answer (and only that) for the result."""
    done = threading.Event()
    got: list[Answer] = []

    def on_answer(a: Answer) -> None:
        got.append(a)
        done.set()

    s = ScreenServer(ScreenConfig(port=0), answer_timeout_s=0.3, on_answer=on_answer)
    s.start()
    try:
        s.show_result(_result("m1", ["a", "b"], matched=False))
        assert done.wait(5)
        assert [(a.match_id, a.answer, a.sku, a.shown) for a in got] == [
            ("m1", "no_answer", None, ("a", "b"))]
        assert got[0].answered_after_s >= 0.3
        assert s.state()["result"]["ask"]["state"] == "no_answer"
    finally:
        s.stop()

"""The kiosk process speaks systemd's notify protocol: READY once serving, WATCHDOG while frames flow, and
no more WATCHDOG once its camera read hangs (so systemd's WatchdogSec restarts it)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device.notify import Notifier

REPO = Path(__file__).resolve().parents[2]
WATCHDOG_USEC = 1_000_000  # pings every 0.5 s
KIOSK_START_S = 60.0  # imports + a model compile on 2 busy cores


class _Camera:
    """An MJPEG-over-HTTP camera: frames flow until ``stall`` is set, then the socket stays open, silent,
    until ``release`` (a camera whose read hangs, the failure no read timeout of ours catches)."""

    def __init__(self) -> None:
        self.stall, self.release = threading.Event(), threading.Event()
        cam = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                i = 0
                while not cam.stall.is_set() and not cam.release.is_set():
                    img = np.full((240, 320, 3), (i * 7) % 255, np.uint8)
                    jpg = cv2.imencode(".jpg", img)[1].tobytes()
                    head = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg)
                    self.wfile.write(head + jpg + b"\r\n")
                    i += 1
                    cam.release.wait(1 / 30)  # paced like a 30 fps camera
                cam.release.wait()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="mjpeg-camera", daemon=True)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/cam.mjpg"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def camera() -> Iterator[_Camera]:
    cam = _Camera()
    cam.thread.start()
    try:
        yield cam
    finally:
        cam.close()


class _Output:
    """A process's stdout+stderr, read on a thread; ``wait_for`` wakes when a pattern appears."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._chunks: list[str] = []
        self._cond = threading.Condition()
        assert proc.stdout is not None
        self._stream = proc.stdout
        self._thread = threading.Thread(target=self._read, name="kiosk-output", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in iter(self._stream.readline, b""):
            with self._cond:
                self._chunks.append(line.decode(errors="replace"))
                self._cond.notify_all()

    def text(self) -> str:
        with self._cond:
            return "".join(self._chunks)

    def wait_for(self, pattern: str, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: re.search(pattern, "".join(self._chunks)) is not None,
                                       timeout_s)  # fmt: skip


def _messages(sock: socket.socket, timeout_s: float) -> Iterator[str]:
    """Datagrams until ``timeout_s`` passes without one."""
    sock.settimeout(timeout_s)
    while True:
        try:
            yield sock.recv(4096).decode()
        except TimeoutError:
            return


def _wait_or_dump(proc: subprocess.Popen[bytes], timeout_s: float, out: _Output) -> int:
    """The exit code; if the kiosk has not stopped by then, fail with every thread's stack (the kiosk
    dumps them on SIGUSR1) and its output."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            pass
        pytest.fail(f"kiosk still running {timeout_s:.0f} s after SIGTERM:\n{out.text()[-12000:]}")


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(180, method="thread")
def test_kiosk_notifies_ready_feeds_the_watchdog_and_stops_feeding_when_the_camera_hangs(
    camera: _Camera, tmp_path: Path
) -> None:
    """Type=notify + WatchdogSec in the unit are only as good as the kiosk's pings: READY must come once it
    serves, WATCHDOG while frames flow, and none once a camera read hangs (systemd then restarts it)."""
    from models.export import export_model

    bundle = tmp_path / "bundle"
    export_model("tiny", bundle)
    pub = tmp_path / "catalog.pub"
    pub.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    cfg = {
        "kiosk": {"store_id": "s042", "kiosk_id": "k01"},
        "camera": {"source": camera.url, "read_timeout_ms": 120000},
        "model": {"bundle": str(bundle)},
        "snapshots": {"state_dir": str(tmp_path / "state"), "public_keys": [str(pub)]},
        "broker": {"transport": "none"},
        "outbox": {"path": str(tmp_path / "outbox.sqlite")},
    }
    conf = tmp_path / "kiosk.toml"
    conf.write_text("".join(f"[{s}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in vals.items())
                            for s, vals in cfg.items()))  # fmt: skip
    sock_path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    env = {**os.environ, "PYTHONPATH": str(REPO), "NOTIFY_SOCKET": str(sock_path),
           "WATCHDOG_USEC": str(WATCHDOG_USEC)}  # fmt: skip
    cmd = [sys.executable, "-m", "device", "run", "--config", str(conf)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    out = _Output(proc)
    try:
        first = next(_messages(sock, KIOSK_START_S), "")
        assert first.startswith("READY=1"), f"{first!r}\n{out.text()[-3000:]}"
        assert f"MAINPID={proc.pid}" in first
        pings = 0
        for msg in _messages(sock, 5.0):
            pings += msg == "WATCHDOG=1"
            if pings >= 4:
                break
        assert pings >= 4, out.text()[-3000:]
        camera.stall.set()
        # Frames in flight drain within a ping or two; then silence for 6 ping intervals.
        late = [m for m in _messages(sock, 3.0)]
        assert len(late) <= 3 and all(m == "WATCHDOG=1" for m in late), late
        assert proc.poll() is None
        # Ops' view of the hang: `kill -USR1` writes every thread's stack, the camera read among them.
        proc.send_signal(signal.SIGUSR1)
        stack = r"device/camera/sources\.py\", line \d+ in read"
        assert out.wait_for(stack, 10), out.text()[-3000:]
        camera.release.set()  # the hung read returns; SIGTERM then stops cleanly
        proc.send_signal(signal.SIGTERM)
        assert _wait_or_dump(proc, 30, out) == 0, out.text()[-3000:]
        assert any(m.startswith("STOPPING=1") for m in _messages(sock, 0.5))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        sock.close()


def test_notifier_pings_only_on_progress_or_while_the_camera_retries(tmp_path: Path) -> None:
    """The rule itself, with an injected clock: no progress and no retrying camera means no ping."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "n"))
    now = [0.0]
    n = Notifier(str(tmp_path / "n"), 2_000_000, clock=lambda: now[0])
    try:
        assert n.tick(1)  # first: fed
        now[0] = 0.5
        assert not n.tick(2)  # not due yet (every 1 s for WatchdogSec=2)
        now[0] = 1.0
        assert n.tick(2) and not n.tick(2)
        now[0] = 2.0
        assert not n.tick(2)  # stuck: starve the watchdog
        assert n.tick(2, idle_ok=True)  # camera retrying on its own: alive
        assert [m for m in _messages(sock, 0.05)] == ["WATCHDOG=1"] * 3
        assert not Notifier.from_env({}).enabled and not Notifier(None).tick(5)
        assert Notifier.from_env({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000",
                                  "WATCHDOG_PID": "1"}).watchdog_interval_s is None  # fmt: skip
        assert not Notifier(str(tmp_path / "absent")).send("READY=1")  # logged, never raised
    finally:
        sock.close()

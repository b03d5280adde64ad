"""The kiosk's own screen: a local web page (stdlib HTTP server; requests: ``device.screen.http``), live
MJPEG preview, SSE state pushes.

Everything is served from the kiosk itself (page and its script from ``static/``, preview, catalog
thumbnails from the active snapshot), so the screen keeps working with the network down. JPEG encoding
happens in the HTTP threads, lazily and at most ``preview_fps`` times a second, never on the frame path.

After a result the page asks "Is this it?" and posts the tap to ``POST /answer`` (JSON ``{"match_id",
"answer": "confirmed"|"not_here", "sku"}``); the server checks it against what it showed (``AnswerBook``)
and hands every resolved result, taps and timeouts alike, to ``on_answer``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final

import cv2
import numpy as np

from device.camera.port import Image
from device.config import ScreenConfig
from device.screen.answers import Answer, AnswerBook
from device.screen.http import ScreenHandler, load_static

_LOGGER = logging.getLogger(__name__)

_WAIT_S: Final = 0.5  # streaming handlers re-check the closing flag this often
_PREVIEW_WIDTH: Final = 640  # preview is downscaled to this: enough for a kiosk panel, cheap to encode
_BOX_COLOURS: Final = {"present": (0, 200, 255), "steady": (0, 140, 255), "result_shown": (80, 220, 60)}
_SHOWN_MATCH: Final = 4  # the page shows the top result and 3 similar items
_SHOWN_NO_MATCH: Final = 3  # "not found": 3 candidates the customer may still recognise


@dataclass(frozen=True, slots=True)
class PreviewFrame:
    seq: int
    image: Image
    box: tuple[int, int, int, int] | None
    state: str


class ScreenServer:
    """Serves ``/`` and ``/static/`` (page), ``/events`` (SSE), ``/preview.mjpg``/``.jpg``, ``/api/state``,
    ``/thumbs/``; takes ``POST /answer``."""

    def __init__(
        self, cfg: ScreenConfig, *, thumbs_dir: Callable[[], Path | None] = lambda: None,
        answer_timeout_s: float = 15.0, feedback_note: bool = False,
        on_answer: Callable[[Answer], object] | None = None,
    ) -> None:
        self._cfg = cfg
        self._thumbs_dir = thumbs_dir
        self._cond = threading.Condition()
        self._closing = threading.Event()
        self._state: dict[str, Any] = {"status": "starting", "camera": "stopped", "detect": "idle",
                                       "broker": None, "snapshot": None, "model": None, "result": None,
                                       "version": 0, "feedback_note": feedback_note,
                                       "price_format": {"currency": cfg.currency, "locale": cfg.locale}}
        self.answers = AnswerBook(answer_timeout_s)
        self._on_answer = on_answer
        self._answers_wake = threading.Event()
        self._answers_thread: threading.Thread | None = None
        self._static: dict[str, tuple[str, bytes]] = {}
        self._preview: PreviewFrame | None = None
        self._jpeg: tuple[int, bytes] | None = None
        self._jpeg_lock = threading.Lock()
        self._result_t: float | None = None
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --
    def start(self) -> None:
        """Load the page's files, bind and serve on a named thread; time out unanswered results."""
        self._static = load_static()
        handler = type("Handler", (ScreenHandler,), {"screen": self})
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
        self._answers_thread = threading.Thread(target=self._answers_loop, name="screen-answers", daemon=True)
        self._answers_thread.start()
        _LOGGER.info("kiosk screen on %s", self.url)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Close streams, stop serving, join."""
        self._closing.set()
        self._answers_wake.set()
        with self._cond:
            self._cond.notify_all()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                _LOGGER.error("screen thread still alive after %.1f s", timeout_s)
        if self._answers_thread is not None:
            self._answers_thread.join(timeout_s)
        self._httpd = self._thread = self._answers_thread = None

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
            expired = (self._result_t is not None and now - self._result_t > self._cfg.result_hold_s
                       and not self._asking())  # the question stays until answered or timed out
            if state == "idle" and expired:
                self._state["result"], self._result_t, changed = None, None, True
            if changed:
                self._state["detect"] = state
                self._bump()
            else:
                self._cond.notify_all()

    def show_result(self, result: dict[str, Any]) -> None:
        """A held item's answer: {id, matched, results: [{sku,title,price,location,score,thumbnail}], ...};
        with an ``id`` and results, the page asks "Is this it?" about the skus it shows."""
        shown = dict(result)
        shown["results"] = [dict(r, thumbnail_url=_thumb_url(r.get("thumbnail"))) for r in result["results"]]
        match_id = result.get("id")
        skus = tuple(str(r["sku"]) for r in result["results"])[
            : _SHOWN_MATCH if result.get("matched") else _SHOWN_NO_MATCH]
        asking = isinstance(match_id, str) and bool(skus)
        shown["ask"] = {"shown": list(skus), "state": "open", "sku": None} if asking else None
        superseded: list[Answer] = []
        with self._cond:  # offered and shown in one step: a tap cannot land in between
            if asking:
                superseded = self.answers.offer(str(match_id), skus)
            self._state["result"] = shown
            self._result_t = time.monotonic()
            self._bump()
        self._answers_wake.set()
        for a in superseded:
            self._resolved(a)

    def take_answer(self, match_id: str, answer: str, sku: str | None) -> Answer:
        """A tap posted by the page; AnswerRefused (with an HTTP status) when it is not one we asked for."""
        a = self.answers.answer(match_id, answer, sku)
        self._resolved(a)
        return a

    def _resolved(self, a: Answer) -> None:
        """Show the answer (when its result is still on screen) and hand it to the kiosk."""
        with self._cond:
            r = self._state["result"]
            if r is not None and r.get("id") == a.match_id and r.get("ask"):
                r["ask"] = dict(r["ask"], state=a.answer, sku=a.sku)
                self._result_t = time.monotonic()  # "thank you" stays for the hold time
                self._bump()
        _LOGGER.info("result %s: %s%s after %.1f s", a.match_id[:12], a.answer,
                     f" {a.sku}" if a.sku else "", a.answered_after_s)
        if self._on_answer is not None:
            try:
                self._on_answer(a)
            except Exception:
                _LOGGER.exception("answer handler failed for result %s", a.match_id)

    def _asking(self) -> bool:
        r = self._state["result"]
        return bool(r and r.get("ask") and r["ask"].get("state") == "open")

    def _answers_loop(self) -> None:
        """Resolve results nobody answered in time (``no_answer``), waking at the next deadline."""
        while not self._closing.is_set():
            for a in self.answers.expire():
                self._resolved(a)
            self._answers_wake.wait(self.answers.next_due_s())
            self._answers_wake.clear()

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

    def static_file(self, path: str) -> tuple[str, bytes] | None:
        """(content type, bytes) of the page's own files, loaded at start."""
        return self._static.get(path)

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

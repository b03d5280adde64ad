"""The staff dashboard and the kiosk's own screen in real headless Chromium, driven by a REAL kiosk.

The kiosk is a `python -m device run` process playing a generated video (rendered products held up in
turn) through the tiny exported model and a signed snapshot built from a small store catalog with
cloud.build.build_snapshot. For the dashboard it talks to a real mosquitto (plain listener for the kiosk,
logging in as its kiosk id as the deploy ACL expects; websockets listener for the page's read-only
``dashboard`` user). The kiosk-screen tests need no broker and run with ``transport = "none"``.
Every step saves a screenshot under build/screenshots/.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.catalogs import write_catalog
from device.camera.synthetic import make_scene, render_items, write_video
from tests.dashboard import conftest as dash
from tests.dashboard.conftest import PASSWORDS, page_config, screenshot
from tests.support.mosquitto import Mosquitto, free_port

# thread method: a hang inside native code (OpenVINO, Chromium IPC) cannot take a signal.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(120, method="thread")]

# The browser fixtures live in tests/dashboard/conftest.py; binding them here makes them visible to this
# module (a conftest only serves its own folder).
dashboard_build = dash.dashboard_build
serve_page = dash.serve_page
page = dash.page
store_broker = dash.store_broker

REPO = Path(__file__).resolve().parents[2]
STORE, KIOSK = "s042", "k01"
# (sku, title, price, location): what the kiosk screen and the dashboard must show for a held item.
CATALOG = [
    ("A100", "Oat milk 1 l", "1.89", "Aisle 4 · Dairy"),
    ("B200", "Sourdough rye bread", "3.49", "Aisle 1 · Bakery"),
    ("C300", "Ground coffee 500 g", "6.99", "Aisle 7 · Hot drinks"),
    ("D400", "Sparkling water 1.5 l", "0.79", "Aisle 9 · Drinks"),
]
HELD = 0  # the catalog item held up in the match clips
UNKNOWN = 5  # a rendered product the store does not carry (item 4 is left out too)
N_RENDERED = 6
SEED = 11
FPS = 30.0  # the file source is paced in real time, so the page sees idle, then the answer
LEAD_S = 2.5  # background only before the first item: time to load the page and see the idle state
KIOSK_WAIT_MS = 45_000  # a kiosk process start (imports, model compile, snapshot install) on 2 busy cores
UI_WAIT_MS = 15_000  # one UI change once the kiosk runs


@dataclass(frozen=True)
class World:
    bundle: Path
    snapshot: Path
    public_key: Path
    match_clip: Path
    unknown_clip: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """Tiny model bundle, a catalog of rendered products, its signed snapshot, and two clips."""
    from cloud.build import BuildSpec, build_snapshot
    from models.export import export_model

    root = tmp_path_factory.mktemp("browser-real-kiosk")
    bundle = root / "bundle"
    export_model("tiny", bundle)
    items = render_items(N_RENDERED, seed=SEED)
    products = [{"sku": sku, "title": title, "price": price, "location": location}
                for sku, title, price, location in CATALOG]
    catalog = write_catalog(root, products, items[: len(CATALOG)])
    key = Ed25519PrivateKey.generate()
    pub = root / "catalog.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo))
    snap = build_snapshot(BuildSpec(catalog=catalog, store=STORE, out_dir=root / "snapshot-v1",
                                    private_key=key, bundle=bundle, progress=False)).out_dir

    def clip(order: Sequence[int], name: str) -> Path:
        scene = make_scene(items, order=order, fps=FPS, lead_s=LEAD_S, hold_s=1.5, seed=SEED)
        return write_video(scene, root / name)

    return World(bundle, snap, pub, clip([HELD], "held.avi"), clip([UNKNOWN], "unknown.avi"))


def _toml(cfg: dict[str, dict[str, Any]]) -> str:
    """A flat two-level TOML document (JSON string and array syntax is valid TOML for these values)."""
    lines = []
    for section, values in cfg.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


@dataclass
class KioskProcess:
    """A kiosk started with `python -m device run`; its log goes to a file shown on failure."""

    proc: subprocess.Popen[bytes]
    log: Path
    screen_url: str

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def wait_screen(self, timeout_s: float) -> None:
        """Wait until the kiosk's screen answers /api/state (model loaded, snapshot installed)."""
        poll = threading.Event()  # never set: its wait() is the poll interval
        for _ in range(int(timeout_s / 0.1)):
            assert self.proc.poll() is None, f"kiosk exited with {self.proc.returncode}:\n{self.log_tail()}"
            try:
                with urllib.request.urlopen(self.screen_url + "api/state", timeout=1.0) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            poll.wait(0.1)
        raise AssertionError(f"kiosk screen not up within {timeout_s} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: no DISCONNECT reaches the broker, which then publishes the kiosk's last will."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM (the kiosk's own stop path) and its exit code; SIGKILL if it does not stop in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"kiosk ignored SIGTERM for {timeout_s} s:\n{self.log_tail()}") from None
        return int(self.proc.returncode)


@pytest.fixture
def start_kiosk(world: World, tmp_path: Path) -> Iterator[Callable[..., KioskProcess]]:
    """Factory: run a kiosk over ``clip``, with a broker (username = kiosk id) or offline; all are
    stopped at teardown."""
    started: list[KioskProcess] = []

    def start(clip: Path, broker: Mosquitto | None = None) -> KioskProcess:
        work = tmp_path / f"kiosk-{len(started)}"
        work.mkdir()
        screen_port = free_port()
        broker_cfg: dict[str, Any] = {"transport": "none"}
        if broker is not None:
            broker_cfg = {"transport": "paho", "url": broker.url, "username": KIOSK}
        cfg: dict[str, dict[str, Any]] = {
            "kiosk": {"store_id": STORE, "kiosk_id": KIOSK},
            "camera": {"source": str(clip), "fps": FPS},
            "model": {"bundle": str(world.bundle)},
            "snapshots": {"state_dir": str(work / "state"), "public_keys": [str(world.public_key)],
                          "initial": str(world.snapshot)},
            "broker": broker_cfg,
            "screen": {"host": "127.0.0.1", "port": screen_port, "result_hold_s": 30.0,
                       "currency": "SEK", "locale": "sv-SE"},
            "outbox": {"path": str(work / "outbox.sqlite")},
            "health": {"interval_s": 1.0},
        }
        conf = work / "kiosk.toml"
        conf.write_text(_toml(cfg), encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": str(REPO), "STORELENS_MQTT_PASSWORD": PASSWORDS[KIOSK]}
        log = work / "kiosk.log"
        with log.open("wb") as log_f:
            proc = subprocess.Popen([sys.executable, "-m", "device", "run", "--config", str(conf)], cwd=work,
                                    env=env, stdin=subprocess.DEVNULL, stdout=log_f, stderr=subprocess.STDOUT)
        kiosk = KioskProcess(proc, log, f"http://127.0.0.1:{screen_port}/")
        started.append(kiosk)
        return kiosk

    yield start
    for k in started:
        if k.proc.poll() is None:
            k.kill()


def _loaded(page: Any, selector: str, timeout_ms: int = UI_WAIT_MS) -> None:
    """Wait until the image at ``selector`` has decoded a picture (for the MJPEG preview: a frame)."""
    page.wait_for_function(
        "s => { const i = document.querySelector(s); return !!i && i.naturalWidth > 0; }",
        arg=selector, timeout=timeout_ms,
    )


def _text(element: Any) -> str:
    """What the element reads, line breaks folded to spaces."""
    return " ".join(element.inner_text().split())


def test_dashboard_shows_real_kiosk_online_then_its_match_then_offline_by_last_will(
    page: Any, store_broker: Mosquitto, serve_page: Callable[..., str],
    start_kiosk: Callable[..., KioskProcess], world: World, tmp_path: Path,
) -> None:
    """A real kiosk's retained status, match event (catalog title, thumbnail) and last will all reach
    the dashboard through the deploy ACL: a kiosk/dashboard topic or auth mismatch fails here."""
    snapshots = tmp_path / "snapshots"
    snapshots.mkdir()
    (snapshots / "1").symlink_to(world.snapshot, target_is_directory=True)  # the page's thumbnail_base
    page.goto(serve_page(page_config(store_broker, STORE), snapshots_dir=snapshots))
    page.wait_for_selector('#conn[data-state="connected"]', timeout=UI_WAIT_MS)

    kiosk = start_kiosk(world.match_clip, broker=store_broker)
    card = page.wait_for_selector(f'article.kiosk[data-kiosk="{KIOSK}"][data-state="online"]',
                                  timeout=KIOSK_WAIT_MS)
    assert card.query_selector('[data-role="snapshot"]').inner_text() == "v1"
    screenshot(page, "dashboard_real_kiosk_online")

    item = page.wait_for_selector("#feed li.match:not(.no-match)", timeout=KIOSK_WAIT_MS)
    _sku, title, _price, location = CATALOG[HELD]
    assert item.query_selector(".match-title").inner_text() == title, kiosk.log_tail()
    assert location in item.inner_text()
    _loaded(page, "#feed li.match:not(.no-match) img.thumb")  # served from the snapshot's thumbs/
    assert item.query_selector("img.thumb").get_attribute("data-placeholder") == "false"
    assert title in page.inner_text("#top-items")
    screenshot(page, "dashboard_real_kiosk_match")

    kiosk.kill()
    card = page.wait_for_selector(f'article.kiosk[data-kiosk="{KIOSK}"][data-state="offline"]',
                                  timeout=UI_WAIT_MS)
    assert "connection lost" in card.inner_text()
    page.wait_for_selector(f'#alert-list li.alert.bad[data-kiosk="{KIOSK}"]', timeout=UI_WAIT_MS)
    screenshot(page, "dashboard_real_kiosk_offline")


def test_kiosk_screen_shows_the_held_product_and_the_live_preview(
    page: Any, start_kiosk: Callable[..., KioskProcess], world: World
) -> None:
    """Idle prompt first, then the held item's title, price, aisle and thumbnail beside a live preview:
    a broken SSE push, thumbnail route or preview stream fails here."""
    kiosk = start_kiosk(world.match_clip)
    kiosk.wait_screen(KIOSK_WAIT_MS / 1000)
    page.goto(kiosk.screen_url)
    idle = page.wait_for_selector('#answer[data-state="idle"]', timeout=UI_WAIT_MS)
    assert "Hold an item up to the camera" in _text(idle)
    _loaded(page, "#preview")
    screenshot(page, "kiosk_screen_idle")

    sku, title, price, location = CATALOG[HELD]
    answer = page.wait_for_selector('#answer[data-state="match"]', timeout=KIOSK_WAIT_MS)
    assert answer.query_selector('[data-role="title"]').inner_text() == title
    shown = answer.query_selector('[data-role="price"]').inner_text()
    assert shown.replace("\u00a0", " ") == price.replace(".", ",") + " kr", shown  # as a Swedish shelf label
    assert answer.query_selector('[data-role="location"]').inner_text() == location
    _loaded(page, '#answer [data-role="thumb"]')
    _loaded(page, "#preview")
    frame_w = page.evaluate("() => document.getElementById('preview').naturalWidth")
    assert frame_w == 640  # the clip's own frames, not a placeholder
    state = json.loads(urllib.request.urlopen(kiosk.screen_url + "api/state", timeout=5).read())
    assert state["result"]["matched"] and state["result"]["results"][0]["sku"] == sku
    screenshot(page, "kiosk_screen_match")
    assert kiosk.stop() == 0, kiosk.log_tail()


def test_kiosk_screen_says_not_found_for_an_item_the_store_does_not_carry(
    page: Any, start_kiosk: Callable[..., KioskProcess], world: World
) -> None:
    """A product outside the catalog must read "Not found — please ask staff", never a wrong product."""
    kiosk = start_kiosk(world.unknown_clip)
    kiosk.wait_screen(KIOSK_WAIT_MS / 1000)
    page.goto(kiosk.screen_url)
    answer = page.wait_for_selector('#answer[data-state="not-found"]', timeout=KIOSK_WAIT_MS)
    text = _text(answer)
    assert "Not found" in text and "please ask staff" in text, text
    assert not page.query_selector('#answer [data-role="title"]')
    _loaded(page, "#preview")
    state = json.loads(urllib.request.urlopen(kiosk.screen_url + "api/state", timeout=5).read())
    assert state["result"]["matched"] is False
    screenshot(page, "kiosk_screen_not_found")
    assert kiosk.stop() == 0, kiosk.log_tail()

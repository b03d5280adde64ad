"""Fixtures for the dashboard tests: a fresh build, the page server, kiosk simulators, Debian Chromium, a
store broker with the deploy ACL. tests/e2e/test_browser_real_kiosk.py re-uses them with a real kiosk."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.browser import BrowserMissing, chromium_context
from cloud.dashboard.serve import DashboardServer, PageConfig
from tests.support.mosquitto import Mosquitto, mosquitto_binary

REPO = Path(__file__).resolve().parents[2]
STATIC = REPO / "cloud" / "dashboard" / "static"
SCREENSHOTS = REPO / "build" / "screenshots"
DEPLOY_ACL = (REPO / "deploy" / "mosquitto" / "acl").read_text().replace("@STORE@", "s042")  # as installed
PASSWORDS = {"dashboard": "pw-dash", "k01": "pw-k01", "k02": "pw-k02"}  # kiosk users are kiosk ids (ACL)
WAIT_MS = 15_000  # upper bound for one UI change; MQTT.js retries every 2 s after a broker restart


def kiosk_card(page: Any, kiosk: str, state: str) -> Any:
    """Wait until the card of ``kiosk`` shows ``state`` (data-state) and return it."""
    selector = f'article.kiosk[data-kiosk="{kiosk}"][data-state="{state}"]'
    return page.wait_for_selector(selector, timeout=WAIT_MS)


def page_config(b: Mosquitto, store: str) -> PageConfig:
    """config.json for ``store`` on broker ``b``: the read-only dashboard user, local thumbnails."""
    return PageConfig(broker_ws_url=f"ws://127.0.0.1:{b.ws_port}", store=store, username="dashboard",
                      password=PASSWORDS["dashboard"], thumbnail_base="snapshots/{snapshot}/")


@pytest.fixture
def store_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """mosquitto with plain + websockets listeners, the deploy ACL and test passwords."""
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed; run `make setup`")
    b = Mosquitto(tmp_path / "mosquitto", websockets=True, acl=DEPLOY_ACL, passwords=PASSWORDS).start()
    yield b
    b.stop()


def _mqtt_bundle() -> Path | None:
    candidates = (REPO / "node_modules" / "mqtt" / "dist", REPO / "build" / "dashboard")
    for p in (c / "mqtt.min.js" for c in candidates):
        if p.is_file():
            return p
    return None


@pytest.fixture(scope="session")
def dashboard_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The current page sources plus the vendored MQTT.js bundle (as scripts/build_dashboard.sh does)."""
    bundle = _mqtt_bundle()
    if bundle is None:
        pytest.skip("MQTT.js bundle missing (node_modules/mqtt or build/dashboard); run `make setup`")
    out = tmp_path_factory.mktemp("dashboard")
    for f in STATIC.iterdir():
        shutil.copy2(f, out / f.name)
    shutil.copy2(bundle, out / "mqtt.min.js")
    return out


@dataclass
class KioskSim:
    """A kiosk simulator subprocess (tests/dashboard/kiosk_sim.py) driven over stdin."""

    proc: subprocess.Popen[str]

    def send(self, cmd: str, **kw: Any) -> None:
        """Run one command and wait for the simulator's ack."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def kill(self) -> None:
        """SIGKILL: no DISCONNECT reaches the broker, so it publishes the last will."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def close(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def start_sim() -> Iterator[Callable[..., KioskSim]]:
    """Factory: start a kiosk simulator connected to a broker port; all are stopped at teardown."""
    sims: list[KioskSim] = []

    def start(port: int, store: str, kiosk: str, **opts: Any) -> KioskSim:
        cmd = [sys.executable, "-m", "tests.dashboard.kiosk_sim", "--port", str(port), "--store", store,
               "--kiosk", kiosk]
        for k, v in opts.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        proc = subprocess.Popen(cmd, cwd=REPO, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        sim = KioskSim(proc)
        sims.append(sim)
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line == "ready", f"simulator said {line!r}"
        return sim

    yield start
    for s in sims:
        s.close()


@pytest.fixture
def serve_page(dashboard_build: Path) -> Iterator[Callable[..., str]]:
    """Factory: serve the built page with a config.json; returns the page URL."""
    servers: list[DashboardServer] = []

    def serve(config: PageConfig, snapshots_dir: Path | None = None) -> str:
        srv = DashboardServer("127.0.0.1", 0, config, static_dir=dashboard_build,
                              snapshots_dir=snapshots_dir).start()
        servers.append(srv)
        return srv.url

    yield serve
    for s in servers:
        s.stop()


@contextlib.contextmanager
def chromium_page(tmp_path: Path, **context_args: Any) -> Iterator[Any]:
    """A Playwright page in Debian's Chromium (never a downloaded browser), 1280x800, a fresh profile;
    ``context_args`` go to the context (e.g. ``http_credentials``). Fails the test on a page error."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        try:  # a fresh profile per test (Playwright passes it as --user-data-dir)
            context = stack.enter_context(chromium_context(tmp_path / "chromium-profile", **context_args))
        except BrowserMissing as exc:
            pytest.skip(str(exc))
        pg = context.pages[0] if context.pages else context.new_page()
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        yield pg
        assert not errors, f"page raised: {errors}"


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Any]:
    """A Playwright page in Debian's Chromium (never a downloaded browser), 1280x800."""
    with chromium_page(tmp_path) as pg:
        yield pg


def screenshot(page: Any, name: str) -> Path:
    """Save a full-page screenshot under build/screenshots/ and return its path."""
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path

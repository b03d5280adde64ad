"""The store teaches the kiosk, end to end with real parts (issue 19, "Show it").

A real kiosk process (`python -m device run`, tiny exported model) watches a looping clip of one product
held up, H. The first signed snapshot answers H wrong: H is the current pack of product A, whose catalog
photo is an older, quite different pack, and product B is a look-alike, so H's nearest catalog photo is
B's; A is among the similar items the screen shows. A customer clicks A in the real kiosk page (real
Chromium); the kiosk publishes the answer (durable outbox, real mosquitto); the real collector verifies and
stores it, and its auto-review leaves it for a person (it disagrees with the catalog); a staff member
approves it by clicking in the real dashboard's review page (HTTP Basic login); `storelens catalog build
--feedback --base v1` builds a delta carrying the crop as a store photo of A; it is published to the
folder the kiosk may fetch from and announced; the running kiosk syncs it and answers H as A.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import pytest

from bench.browser import CHROMIUM, CHROMIUM_ARGS, VIEWPORT
from bench.catalogs import write_catalog
from cloud.dashboard.serve import DashboardServer, PageConfig
from cloud.dashboard.staff import StaffUsers, add_user
from cloud.feedback.auto import ReviewSpace, auto_review
from cloud.feedback.collector import BrokerConfig, FeedbackCollector
from cloud.feedback.store import DecisionEntry, FeedbackStore
from cloud.feedback.verify import KnownSnapshots
from cloud.publish import publish_snapshot
from device.camera.port import Image
from device.camera.synthetic import make_scene, render_items, write_video
from storelens import signing
from storelens.feedback import FeedbackEvent, parse_feedback
from storelens.protocol import MatchEvent, Topics, decode
from tests.dashboard import conftest as dash
from tests.device.comms.helpers import Collector as Subscriber
from tests.e2e.test_browser_real_kiosk import KioskProcess, _toml
from tests.support.mosquitto import Mosquitto, free_port, mosquitto_binary

# thread method: a hang inside native code (OpenVINO, Chromium IPC) cannot take a signal.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(180, method="thread")]

dashboard_build = dash.dashboard_build  # the dashboard's static files (+ MQTT.js), session-scoped

REPO = Path(__file__).resolve().parents[2]
STORE, KIOSK = "s042", "k01"
TOPICS = Topics(STORE, KIOSK)
A, B = "A100", "B200"  # A: the product held up (catalog photo of its old pack); B: a look-alike
CATALOG = {  # sku -> (title, which rendered image its catalog photos show)
    A: ("Oat drink barista 1 l", 4),  # the catalog still shows the old pack: a quite different image
    B: ("Oat drink light 1 l", -1),  # -1: the look-alike of the held pack (see _lookalike)
    "C300": ("Ground coffee 500 g", 1),
    "D400": ("Sparkling water 1.5 l", 2),
}
HELD = 0  # rendered image of A's current pack, the one customers hold up
SEED, FPS = 11, 30.0
STAFF_NAME, STAFF_PASSWORD = "anna", "anna-pw-123"
KIOSK_WAIT_S = 60.0  # a kiosk start (imports, model compile, snapshot install) on 2 busy cores
WAIT_S = 30.0  # one step of the loop once everything runs
UI_WAIT_MS = 15_000


def _lookalike(img: Image) -> Image:
    """Another product in nearly the same pack: the same design, paler."""
    return cv2.convertScaleAbs(img, alpha=0.8, beta=30)


def _write_catalog(root: Path, items: list[Image]) -> Path:
    products, images = [], []
    for n, (sku, (title, which)) in enumerate(CATALOG.items()):
        images.append(_lookalike(items[HELD]) if which < 0 else items[which])
        products.append({"sku": sku, "title": title, "price": f"{n + 1}.49", "location": f"Aisle {n + 2}"})
    return write_catalog(root, products, images)


def _storelens(*args: str, timeout_s: float = 120.0) -> str:
    """Run the `storelens` command line; its stdout (the test fails with its output when it fails)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "storelens", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout_s, env=env)  # fmt: skip
    assert proc.returncode == 0, f"storelens {' '.join(args[:2])} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _start_kiosk(conf: Path, log: Path, screen_url: str) -> KioskProcess:
    """`python -m device run` on ``conf``; its log goes to a file shown on failure."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log.open("wb") as log_f:
        proc = subprocess.Popen([sys.executable, "-m", "device", "run", "--config", str(conf)],
                                cwd=conf.parent, env=env, stdin=subprocess.DEVNULL, stdout=log_f,
                                stderr=subprocess.STDOUT)  # fmt: skip
    return KioskProcess(proc, log, screen_url)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed; run `make setup`")
    b = Mosquitto(tmp_path / "mosquitto").start()
    yield b
    b.stop()


@pytest.fixture
def browser() -> Iterator[Any]:
    """Debian's Chromium through Playwright (one browser; the test opens a context per person)."""
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed (/usr/bin/chromium); `make setup` installs it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="python playwright missing (dev extra)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Callable[[Any], Any]]:
    """Stops what the test started (``push`` returns it), last started first."""
    stops: list[Callable[[], object]] = []

    def push(stop: Any) -> Any:
        stops.append(stop)
        return stop

    yield push
    for stop in reversed(stops):
        stop()


def _matches(sub: Subscriber) -> list[MatchEvent]:
    """Unique match events by id, in arrival order (QoS 1 may deliver one twice)."""
    seen: dict[str, MatchEvent] = {}
    for p in sub.payloads(TOPICS.match):
        e = decode(p, MatchEvent)
        seen.setdefault(e.id, e)
    return list(seen.values())


def _confirmations(sub: Subscriber) -> list[FeedbackEvent]:
    return [m for m in (parse_feedback(TOPICS.feedback, p) for p in sub.payloads(TOPICS.feedback))
            if m.answer == "confirmed"]  # fmt: skip


def test_a_customers_tap_approved_by_staff_teaches_the_running_kiosk(
    tmp_path: Path, broker: Mosquitto, browser: Any, dashboard_build: Path, stack: Callable[[Any], Any]
) -> None:
    """Click A on the kiosk -> feedback -> collector -> staff approval -> delta -> sync -> H answered A:
    a break anywhere in the loop (topic, verify, review, provenance, delta, sync) fails here."""
    items = render_items(6, seed=SEED)
    catalog = _write_catalog(tmp_path, items)
    bundle, keys = tmp_path / "bundle", tmp_path / "keys"
    _storelens("model", "export", "--source", "tiny", "--out", str(bundle))
    signing.generate_keypair(keys / "private.pem", keys / "public.pem")
    v1, v2 = tmp_path / "snapshot-v1", tmp_path / "snapshot-v2"
    common = ["--catalog", str(catalog), "--bundle", str(bundle), "--store", STORE, "--key",
              str(keys / "private.pem"), "--cache", str(tmp_path / "cache")]  # fmt: skip
    _storelens("catalog", "build", *common, "--out", str(v1))
    bucket = tmp_path / "store-bucket"  # the one folder the kiosk may fetch snapshots from
    publish_snapshot(v1, f"file://{bucket}", broker.url)

    sub = Subscriber(broker.port, [TOPICS.match, TOPICS.feedback])
    stack(sub.close)
    feedback_dir = tmp_path / "feedback"
    fstore = FeedbackStore(feedback_dir)
    space = ReviewSpace.load(v1)
    auto: dict[str, DecisionEntry | None] = {}  # record id -> the auto rule's decision, per stored record
    reviewed = threading.Condition()

    def on_stored(fb: FeedbackStore, rid: str, msg: FeedbackEvent) -> None:
        decision = auto_review(fb, rid, space)
        with reviewed:
            if msg.answer == "confirmed":
                auto[rid] = decision
            reviewed.notify_all()

    collector = FeedbackCollector(STORE, BrokerConfig(broker.url, client_id=f"storelens-feedback-{STORE}"),
                                  fstore, KnownSnapshots(STORE, snapshots_dir=bucket), on_stored=on_stored)
    collector.start()
    stack(collector.stop)

    staff = tmp_path / "staff.json"
    add_user(staff, STAFF_NAME, STAFF_PASSWORD)
    state = tmp_path / "kiosk" / "state"

    dashboard = DashboardServer("127.0.0.1", 0, PageConfig(f"ws://127.0.0.1:{free_port()}", STORE),
                                static_dir=dashboard_build, snapshots_dir=state, feedback_dir=feedback_dir,
                                staff=StaffUsers(staff)).start()  # fmt: skip
    stack(dashboard.stop)

    scene = make_scene([items[HELD]], fps=FPS, lead_s=1.0, hold_s=1.5, seed=SEED)
    clip = write_video(scene, tmp_path / "held.avi")
    screen_port = free_port()
    conf = tmp_path / "kiosk" / "kiosk.toml"
    conf.parent.mkdir()
    conf.write_text(_toml({
        "kiosk": {"store_id": STORE, "kiosk_id": KIOSK},
        "camera": {"source": str(clip), "fps": FPS, "loop": True},  # H held up again and again
        "model": {"bundle": str(bundle)},
        "snapshots": {"state_dir": str(state), "public_keys": [str(keys / "public.pem")], "initial": str(v1)},
        "sync": {"sources": [bucket.as_uri() + "/"]},
        "broker": {"url": broker.url},
        "screen": {"host": "127.0.0.1", "port": screen_port, "result_hold_s": 30.0},
        "feedback": {"enabled": True, "answer_timeout_s": 60.0},
        "outbox": {"path": str(tmp_path / "kiosk" / "outbox.sqlite")},
        "health": {"interval_s": 1.0},
    }), encoding="utf-8")  # fmt: skip
    kiosk = _start_kiosk(conf, tmp_path / "kiosk" / "kiosk.log", f"http://127.0.0.1:{screen_port}/")
    stack(kiosk.stop)
    kiosk.wait_screen(KIOSK_WAIT_S)

    # Round 1: the first snapshot answers H as the look-alike B; A is among the similar items.
    shopper = browser.new_context(viewport=VIEWPORT)
    stack(shopper.close)
    screen = shopper.new_page()
    screen.goto(kiosk.screen_url, wait_until="domcontentloaded")  # the preview stream never finishes
    assert sub.wait_for(lambda _m: bool(_matches(sub)), KIOSK_WAIT_S), kiosk.log_tail()
    first = _matches(sub)[0]
    assert first.snapshot == 1 and first.matched, first
    assert first.results[0].sku == B and A in [r.sku for r in first.results[1:4]], first.results
    similar_a = f'#answer[data-state="match"] [data-role="similar"][data-sku="{A}"]:not([disabled])'
    screen.wait_for_selector(similar_a, timeout=UI_WAIT_MS)
    assert screen.inner_text('#answer [data-role="title"]') == CATALOG[B][0]
    dash.screenshot(screen, "loop_kiosk_asks")
    screen.click(similar_a)
    screen.wait_for_selector('[data-role="ask"][data-answer="confirmed"]', timeout=UI_WAIT_MS)

    # The answer on the wire, as the contract parses it, then in the collector's store.
    assert sub.wait_for(lambda _m: bool(_confirmations(sub)), WAIT_S), kiosk.log_tail()
    msg = _confirmations(sub)[0]
    assert (msg.store, msg.kiosk, msg.chosen_sku, msg.snapshot) == (STORE, KIOSK, A, 1)
    assert msg.shown[0] == B and A in msg.shown
    with reviewed:  # the collector stored it, acknowledged it, then ran the auto rule on it
        assert reviewed.wait_for(lambda: bool(auto), WAIT_S), collector.summary()
    [rid] = list(auto)
    rec = fstore.get(rid)
    assert (rec.answer, rec.chosen_sku, rec.status) == ("confirmed", A, "pending")
    assert auto[rid] is None  # H is nearer B's photos: the rule leaves it to a person
    assert fstore.crop_path(rid).is_file()
    assert collector.stats()["stored"] >= 1 and collector.stats()["forged"] == 0

    # Staff approve it by clicking in the review page, signed in with HTTP Basic.
    back_office = browser.new_context(viewport=VIEWPORT,
                                      http_credentials={"username": STAFF_NAME, "password": STAFF_PASSWORD})
    stack(back_office.close)
    review = back_office.new_page()
    review.goto(dashboard.url + "review.html")
    card = review.wait_for_selector(f'article.card[data-record="{rid}"][data-status="pending"]',
                                    timeout=UI_WAIT_MS)
    assert review.inner_text("#who") == STAFF_NAME
    assert CATALOG[A][0] in review.inner_text(f'section.group[data-sku="{A}"]')
    dash.screenshot(review, "loop_review_pending")
    card.query_selector('button[data-action="approved"]').click()
    review.wait_for_selector(f'article.card[data-record="{rid}"]', state="detached", timeout=UI_WAIT_MS)
    last = fstore.history(rid)[-1]
    assert (last.decision, last.sku, last.who) == ("approved", A, STAFF_NAME)
    assert [r.record_id for r in fstore.approved(STORE)] == [rid]

    # Relearn: a delta on v1 with the approved crop as a store photo of A, published and announced.
    out = _storelens("catalog", "build", *common, "--out", str(v2), "--base", str(v1),
                     "--feedback", str(feedback_dir))
    assert "OK delta snapshot v2" in out, out
    manifest = json.loads((v2 / "manifest.json").read_text())
    assert manifest["kind"] == "delta" and manifest["base_version"] == 1
    added = [json.loads(line) for line in (v2 / "added.jsonl").read_text().splitlines()]  # the delta's rows
    assert [(r["sku"], r["source"], r["record"]) for r in added] == [(A, "store", rid)], added
    assert json.loads((v2 / "removed.json").read_text())["labels"] == []
    publish_snapshot(v2, f"file://{bucket}", broker.url)

    # The running kiosk syncs it and answers the same held item as A.
    def answered_a(_m: object) -> bool:
        return any(e.snapshot == 2 and e.matched and e.results[0].sku == A for e in _matches(sub))

    assert sub.wait_for(answered_a, WAIT_S + 15), (
        [(e.snapshot, [r.sku for r in e.results]) for e in _matches(sub)][-5:], kiosk.log_tail())
    screen.wait_for_function(
        "t => document.querySelector('#answer [data-role=\"title\"]')?.innerText === t",
        arg=CATALOG[A][0], timeout=UI_WAIT_MS)  # fmt: skip
    dash.screenshot(screen, "loop_kiosk_learned")
    [applied] = list((state / "snapshots").glob("v2-*"))  # the kiosk's applied delta: v1's rows + the new one
    kiosk_rows = [json.loads(line) for line in (applied / "vectors.jsonl").read_text().splitlines()]
    assert [r["record"] for r in kiosk_rows if r["source"] == "store"] == [rid]
    assert kiosk.stop() == 0, kiosk.log_tail()

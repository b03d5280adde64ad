"""The kiosk screen's "Is this it?" in real headless Chromium at 1280x800, clicked like a person.

The screen server runs in-process with a recorded ``on_answer``; results are pushed as the kiosk pushes
them. Screenshots go to build/screenshots/.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from device.config import ScreenConfig
from device.screen import ScreenServer
from device.screen.answers import Answer
from tests.dashboard import conftest as dash

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90, method="thread")]

page = dash.page  # Debian Chromium via Playwright, 1280x800 (tests/dashboard/conftest.py)
WAIT_MS = 10_000
TITLES = ["Organic Oat Milk Barista Edition 1 l", "Oat Milk Light 1 l", "Soy Drink Unsweetened 1 l",
          "Almond Drink Original 1 l", "Rice Drink 1 l"]


class Answers:
    def __init__(self) -> None:
        self.got: list[Answer] = []
        self.event = threading.Event()

    def __call__(self, a: Answer) -> None:
        self.got.append(a)
        self.event.set()


Kiosk = tuple[ScreenServer, "Answers"]


@pytest.fixture
def kiosk_screen(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[ScreenServer, Answers]]:
    snap = tmp_path / "snap"
    (snap / "thumbs").mkdir(parents=True)
    for i in range(5):
        img = np.full((120, 90, 3), (40 * i, 120, 255 - 40 * i), np.uint8)
        cv2.imwrite(str(snap / "thumbs" / f"{i}.jpg"), img)
    timeout_s = getattr(request, "param", 60.0)
    answers = Answers()
    s = ScreenServer(ScreenConfig(port=0, currency="SEK", locale="sv-SE"), thumbs_dir=lambda: snap,
                     answer_timeout_s=timeout_s, feedback_note=True, on_answer=answers)
    s.start()
    s.set_status(status="online", camera="streaming", snapshot=4, broker="connected")
    yield s, answers
    s.stop()


def _result(match_id: str, matched: bool = True) -> dict[str, Any]:
    return {"id": match_id, "matched": matched, "results": [
        {"sku": f"sku-{i}", "title": TITLES[i], "price": "12,90" if i == 0 else f"{i}9.50",
         "location": f"Aisle {i + 3}, dairy shelf", "score": 0.9 - i / 10, "thumbnail": f"thumbs/{i}.jpg"}
        for i in range(5)]}


def test_clicking_the_main_result_confirms_its_sku(kiosk_screen: Kiosk, page: Any) -> None:
    """A tap on the shown product must reach the kiosk as 'confirmed' for that sku, once, and thank."""
    screen, answers = kiosk_screen
    page.goto(screen.url, wait_until="domcontentloaded")
    screen.show_result(_result("m1"))
    page.wait_for_selector('[data-role="ask"]:has-text("Is this it?")', timeout=WAIT_MS)
    price = page.inner_text('[data-role="price"]').replace("\u00a0", " ")
    assert price == "12,90 kr"  # the store's currency; "12,90" in the catalog was shown bare before
    assert page.inner_text('[data-role="feedback-note"]')
    page.click('[data-role="confirm"]')
    assert answers.event.wait(5)
    page.wait_for_selector('[data-role="ask"][data-answer="confirmed"]', timeout=WAIT_MS)
    assert [(a.match_id, a.answer, a.sku) for a in answers.got] == [("m1", "confirmed", "sku-0")]
    assert page.is_disabled('[data-role="similar"][data-sku="sku-1"]')  # one answer per result
    dash.screenshot(page, "kiosk-confirmed")


def test_clicking_a_similar_item_or_not_here(kiosk_screen: Kiosk, page: Any) -> None:
    """A similar item's tap confirms that item; "Not here" on a not-found result says the store lacks it."""
    screen, answers = kiosk_screen
    page.goto(screen.url, wait_until="domcontentloaded")
    screen.show_result(_result("m1"))
    page.click('[data-role="similar"][data-sku="sku-2"]', timeout=WAIT_MS)
    page.wait_for_selector('[data-role="ask"][data-answer="confirmed"]', timeout=WAIT_MS)
    screen.show_result(_result("m2", matched=False))
    page.wait_for_selector('#answer[data-state="not-found"] [data-role="ask"]', timeout=WAIT_MS)
    page.click('[data-role="not-here"]')
    page.wait_for_selector('[data-role="ask"][data-answer="not_here"]', timeout=WAIT_MS)
    dash.screenshot(page, "kiosk-not-here")
    assert [(a.match_id, a.answer, a.sku) for a in answers.got] == [
        ("m1", "confirmed", "sku-2"), ("m2", "not_here", None)]


@pytest.mark.parametrize("kiosk_screen", [0.5], indirect=True)
def test_no_click_is_no_answer_after_the_timeout(kiosk_screen: Kiosk, page: Any) -> None:
    """Nobody taps: the kiosk gets no_answer after the configured time and the question leaves the page."""
    screen, answers = kiosk_screen
    page.goto(screen.url, wait_until="domcontentloaded")
    screen.show_result(_result("m1"))
    page.wait_for_selector('[data-role="ask"]', timeout=WAIT_MS)
    assert answers.event.wait(5)
    assert [(a.match_id, a.answer, a.sku) for a in answers.got] == [("m1", "no_answer", None)]
    page.wait_for_selector('[data-role="ask"]', state="detached", timeout=WAIT_MS)
    assert page.query_selector('[data-role="not-here"]') is None


def test_1280x800_shows_the_result_and_all_three_similar_items(
    kiosk_screen: Kiosk, page: Any
) -> None:
    """Long titles at the kiosk panel's size: every tap target must be inside the viewport (the third
    similar item was clipped at 1280x800) and not cut off by its panel."""
    screen, _ = kiosk_screen
    page.goto(screen.url, wait_until="domcontentloaded")
    screen.show_result(_result("m1"))
    page.wait_for_selector('[data-role="not-here"]', timeout=WAIT_MS)
    dash.screenshot(page, "kiosk-ask-1280x800")
    vw, vh = 1280, 800
    panel = page.query_selector("#answer").bounding_box()
    targets = page.query_selector_all('[data-role="confirm"], [data-role="similar"], [data-role="not-here"]')
    assert len(targets) == 5
    for el in targets:
        b = el.bounding_box()
        assert b["x"] >= 0 and b["y"] >= 0 and b["x"] + b["width"] <= vw and b["y"] + b["height"] <= vh, b
        assert b["y"] + b["height"] <= panel["y"] + panel["height"] + 0.5, (b, panel)  # not clipped
        assert b["height"] >= 44 and b["width"] >= 44  # a finger's tap target


def test_the_page_records_when_it_painted_each_result(kiosk_screen: Kiosk, page: Any) -> None:
    """Each result shown must leave one paint entry (its id, the kiosk's held/answered times, the page's
    wall-clock paint time after the update): bench/paint.py measures held still -> painted from them; a
    re-render of the same result (a status push) must not add a second entry."""
    screen, _ = kiosk_screen
    page.goto(screen.url, wait_until="domcontentloaded")
    page.wait_for_selector('#answer[data-state="idle"]', timeout=WAIT_MS)
    shown_ms = time.time() * 1000.0
    first = dict(_result("m1"), held_ms=shown_ms - 80.0, answered_ms=shown_ms - 5.0)
    screen.show_result(first)
    page.wait_for_function("window.storelensPaints.length === 1", timeout=WAIT_MS)
    screen.set_status(snapshot=5)
    page.wait_for_selector('#status:has-text("catalog v5")', timeout=WAIT_MS)
    screen.show_result(_result("m2", matched=False))  # a result without the kiosk's times
    page.wait_for_function("window.storelensPaints.length === 2", timeout=WAIT_MS)
    done_ms = time.time() * 1000.0
    paints = page.evaluate("window.storelensPaints")
    assert [(p["id"], p["held_ms"], p["answered_ms"]) for p in paints] == [
        ("m1", first["held_ms"], first["answered_ms"]), ("m2", None, None)]
    slack_ms = 5.0  # the page's clock (performance.timeOrigin + now) and Python's are one wall clock
    assert shown_ms - slack_ms <= paints[0]["paint_ms"] <= paints[1]["paint_ms"] <= done_ms + slack_ms

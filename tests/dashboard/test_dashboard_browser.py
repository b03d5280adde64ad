"""The staff dashboard in real headless Chromium against a real mosquitto websockets listener.

Kiosks are simulated (tests/dashboard/kiosk_sim.py, storelens.protocol payloads, a subprocess so a
SIGKILL fires its last will). The real kiosk over a generated video: tests/e2e/test_browser_real_kiosk.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.dashboard.conftest import PASSWORDS, WAIT_MS, KioskSim, kiosk_card, page_config, screenshot
from tests.support.mosquitto import Mosquitto

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_kiosk_online_match_in_feed_then_offline_by_last_will(
    page: Any, store_broker: Mosquitto, start_sim: Callable[..., KioskSim],
    serve_page: Callable[..., str], tmp_path: Path,
) -> None:
    """The page shows the kiosk online, a match with its title, and offline once the kiosk dies."""
    thumbs = tmp_path / "snapshots" / "7" / "thumbs"
    thumbs.mkdir(parents=True)
    (thumbs / "oat.svg").write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" width="40" height="40"><rect width="40" height="40" '
        'fill="#c9a66b"/></svg>'
    )
    sim = start_sim(store_broker.port, "s042", "k01", username="k01", password=PASSWORDS["k01"])
    page.goto(serve_page(page_config(store_broker, "s042"), snapshots_dir=tmp_path / "snapshots"))
    card = kiosk_card(page, "k01", "online")
    assert page.get_attribute("#conn", "data-state") == "connected"
    assert card.query_selector('[data-role="fps"]').inner_text() == "14.8"
    assert card.query_selector('[data-role="camera"]').inner_text() == "streaming"
    assert card.query_selector('[data-role="snapshot"]').inner_text() == "v7"
    assert "embed" in card.query_selector('[data-role="latency"]').inner_text()
    screenshot(page, "dashboard_kiosk_online")

    sim.send("match", title="Oat milk 1 l", sku="A100", score=0.91, thumbnail="thumbs/oat.svg",
             location="Aisle 4")
    item = page.wait_for_selector("#feed li.match:not(.no-match)", timeout=WAIT_MS)
    assert item.query_selector(".match-title").inner_text() == "Oat milk 1 l"
    assert item.query_selector(".score").inner_text() == "0.91"
    img = item.query_selector("img.thumb")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img, timeout=WAIT_MS)
    assert img.get_attribute("data-placeholder") == "false"
    sim.send("match", title="Rye bread", sku="B200", score=0.77, thumbnail="thumbs/missing.jpg")
    sim.send("nomatch", title="Unknown", score=0.31)
    page.wait_for_selector("#feed li.no-match", timeout=WAIT_MS)
    # An unreachable thumbnail falls back to the placeholder instead of a broken image.
    page.wait_for_selector('#feed li.match img.thumb[data-placeholder="true"][src="placeholder.svg"]',
                           timeout=WAIT_MS)
    assert page.inner_text("#feed li.no-match .match-title") == "No match"
    assert "Oat milk 1 l" in page.inner_text("#top-items")
    # What customers looked for and the store could not answer: an assortment question for staff.
    page.wait_for_selector("#top-missed:not([hidden])", timeout=WAIT_MS)
    assert page.inner_text("#top-missed").startswith("Not found: 1 search")
    screenshot(page, "dashboard_match_feed")

    sim.kill()
    card = kiosk_card(page, "k01", "offline")
    assert "connection lost" in card.inner_text()
    # The camera state an offline kiosk last reported is shown as such, not as its state now.
    assert card.query_selector('[data-role="camera"]').inner_text() == "last: streaming"
    page.wait_for_selector('#alert-list li.alert.bad[data-kiosk="k01"]', timeout=WAIT_MS)
    assert "Kiosk offline" in page.inner_text("#alert-list")
    screenshot(page, "dashboard_kiosk_offline_lwt")


def test_survives_broker_restart_with_reconnecting_banner(
    page: Any, store_broker: Mosquitto, start_sim: Callable[..., KioskSim], serve_page: Callable[..., str]
) -> None:
    """A broker restart shows 'Reconnecting…', marks every kiosk not live, then recovers by itself."""
    start_sim(store_broker.port, "s042", "k01", username="k01", password=PASSWORDS["k01"])
    page.goto(serve_page(page_config(store_broker, "s042")))
    kiosk_card(page, "k01", "online")
    assert page.is_hidden("#banner")

    store_broker.stop()
    page.wait_for_selector("#banner:not([hidden])", timeout=WAIT_MS)
    assert page.get_attribute("#conn", "data-state") == "reconnecting"
    card = kiosk_card(page, "k01", "unknown")
    assert "not-live" in (card.get_attribute("class") or "")
    assert "No connection" in card.inner_text()
    screenshot(page, "dashboard_reconnecting")

    store_broker.start()  # same ports; retained messages are gone (no persistence in tests)
    page.wait_for_selector('#conn[data-state="connected"]', timeout=WAIT_MS)
    assert page.is_hidden("#banner")
    kiosk_card(page, "k01", "online")  # the simulator reconnected and re-sent its status
    screenshot(page, "dashboard_reconnected")


def test_stale_health_alerts_and_update_progress(
    page: Any, store_broker: Mosquitto, start_sim: Callable[..., KioskSim], serve_page: Callable[..., str]
) -> None:
    """Old health is shown as stale, never live; alerts come from events and from health; updates show."""
    k1 = start_sim(store_broker.port, "s042", "k01", username="k01", password=PASSWORDS["k01"],
                   health_interval_s=2)
    k2 = start_sim(store_broker.port, "s042", "k02", username="k02", password=PASSWORDS["k02"])
    page.goto(serve_page(page_config(store_broker, "s042")))
    kiosk_card(page, "k01", "online")
    kiosk_card(page, "k02", "online")

    # A health report older than 2.5 x its interval: the kiosk process hangs but its socket lives.
    k1.send("health", age_s=30)
    card = kiosk_card(page, "k01", "stale")
    assert "not-live" in (card.get_attribute("class") or "")
    assert "not reporting" in card.inner_text()

    k2.send("health", camera="stalled", outbox_dropped=0, outbox_depth=40)
    k2.send("health", camera="stalled", outbox_dropped=12, outbox_depth=500)
    k2.send("alert", kind="snapshot_refused", detail="bad_signature")
    k2.send("update", release="r2026-11-21", step="verify")
    alerts = page.wait_for_selector('#alert-list li.alert[data-kiosk="k02"]', timeout=WAIT_MS)
    assert alerts is not None
    page.wait_for_function(
        "() => ['Camera lost', 'Outbox dropping', 'Catalog update refused', 'Not reporting']"
        ".every(t => document.querySelector('#alert-list').innerText.includes(t))",
        timeout=WAIT_MS,
    )
    upd = page.wait_for_selector('article[data-kiosk="k02"] [data-role="update"]:not([hidden])',
                                 timeout=WAIT_MS)
    assert "r2026-11-21" in upd.inner_text() and "verify" in upd.inner_text()
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 1280  # no sideways scrolling
    screenshot(page, "dashboard_alerts_stale_update")

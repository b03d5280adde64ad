"""The review queue and the dashboard fixes in real headless Chromium, clicked like a person.

Staff sign in with HTTP Basic (the browser context's credentials, as a person types them into the
browser's login prompt); decisions land in the real FeedbackStore under tmp_path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud.dashboard.serve import DashboardServer, PageConfig
from cloud.dashboard.staff import StaffUsers
from cloud.feedback.store import FeedbackStore
from tests.dashboard.conftest import (
    PASSWORDS,
    WAIT_MS,
    KioskSim,
    chromium_page,
    kiosk_card,
    page_config,
    screenshot,
)
from tests.dashboard.review_support import MODEL, STAFF, STORE, seed, staff_file, write_snapshot
from tests.support.mosquitto import Mosquitto, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def staff_page(tmp_path: Path) -> Iterator[Any]:
    """Debian's Chromium signed in as staff member 'anna' (HTTP Basic credentials of the context)."""
    with chromium_page(tmp_path, http_credentials={"username": "anna", "password": STAFF["anna"]}) as pg:
        yield pg


@pytest.fixture
def review_server(dashboard_build: Path, tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Factory: serve the dashboard with a review queue over ``feedback_dir``; returns the page URL."""
    servers: list[DashboardServer] = []

    def start(config: PageConfig, snapshots_dir: Path, feedback_dir: Path) -> str:
        staff = StaffUsers(staff_file(tmp_path / "staff.json"))
        srv = DashboardServer("127.0.0.1", 0, config, static_dir=dashboard_build, snapshots_dir=snapshots_dir,
                              feedback_dir=feedback_dir, staff=staff).start()  # fmt: skip
        servers.append(srv)
        return srv.url

    yield start
    for s in servers:
        s.stop()


def _card(page: Any, rid: str, status: str) -> Any:
    selector = f'article.card[data-record="{rid}"][data-status="{status}"]'
    return page.wait_for_selector(selector, timeout=WAIT_MS)


def _gone(page: Any, rid: str) -> None:
    page.wait_for_selector(f'article.card[data-record="{rid}"]', state="detached", timeout=WAIT_MS)


def test_staff_approve_reassign_not_carried_and_undo_by_clicking(
    staff_page: Any, review_server: Callable[..., str], tmp_path: Path
) -> None:
    """Each click must store exactly its decision with the staff name; undo must bring a photo back."""
    page = staff_page
    snaps, fb = tmp_path / "kiosk-state", tmp_path / "feedback"
    write_snapshot(snaps, 1)
    a, b = seed(fb, "confirmed", "A100", 1), seed(fb, "confirmed", "B200", 2)
    n, c = seed(fb, "not_here", None, 3), seed(fb, "confirmed", "A100", 4)
    url = review_server(PageConfig("ws://127.0.0.1:1", STORE), snaps, fb)
    page.goto(url + "review.html")
    _card(page, a, "pending")
    assert page.inner_text("#who") == "anna"
    group = page.wait_for_selector('section.group[data-sku="A100"]', timeout=WAIT_MS)
    assert "Oat milk 1 l" in group.inner_text()
    photo = group.query_selector("img.catalog-photo")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=photo, timeout=WAIT_MS)
    assert photo.get_attribute("src") == "snapshots/1/thumbs/A100.jpg"  # the catalog photo, not a placeholder
    crop = page.query_selector(f'article.card[data-record="{a}"] img.crop')
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=crop, timeout=WAIT_MS)
    screenshot(page, "review_queue_pending")

    page.click(f'article.card[data-record="{a}"] button[data-action="approved"]')
    _gone(page, a)
    page.select_option(f'article.card[data-record="{b}"] select[data-role="picker"]', "C300")
    page.click(f'article.card[data-record="{b}"] button[data-action="reassigned"]')
    _gone(page, b)
    page.click(f'#not-here article.card[data-record="{n}"] button[data-action="not_carried"]')
    _gone(page, n)
    page.click(f'article.card[data-record="{c}"] button[data-action="approved"]')
    _gone(page, c)

    page.click('.tab[data-status="decided"]')
    done = _card(page, a, "approved")
    assert "Approved as Oat milk 1 l by anna" in done.inner_text()
    assert "Re-assigned to Green tea by anna" in _card(page, b, "approved").inner_text()
    assert "Not carried by anna" in _card(page, n, "not_carried").inner_text()
    screenshot(page, "review_queue_decided")
    page.click(f'article.card[data-record="{c}"] button[data-action="pending"]')
    _gone(page, c)
    page.click('.tab[data-status="pending"]')
    _card(page, c, "pending")

    store = FeedbackStore(fb)
    got = [(e.record_id, e.decision, e.sku, e.who) for e in store.history()]
    assert got == [(a, "approved", "A100", "anna"), (b, "reassigned", "C300", "anna"),
                   (n, "not_carried", None, "anna"), (c, "approved", "A100", "anna"),
                   (c, "pending", None, "anna")]  # fmt: skip
    status = {r.record_id: (r.status, r.label_sku) for r in store.records(STORE)}
    assert status == {a: ("approved", "A100"), b: ("approved", "C300"), n: ("not_carried", None),
                      c: ("pending", None)}  # fmt: skip


def test_live_page_names_the_model_and_finds_kiosk_layout_thumbnails(
    page: Any, store_broker: Mosquitto, start_sim: Callable[..., KioskSim], serve_page: Callable[..., str],
    tmp_path: Path,
) -> None:
    """The model showed as a sha256 and every thumbnail as a placeholder (v<version>-<sha12> folders)."""
    state = tmp_path / "kiosk-state"
    write_snapshot(state, 7, model_info={"name": "mobilenetv2-tuned", "version": "2026-11-20T10:00:00Z"})
    sim = start_sim(store_broker.port, STORE, "k01", username="k01", password=PASSWORDS["k01"], model=MODEL)
    page.goto(serve_page(page_config(store_broker, STORE), snapshots_dir=state))
    card = kiosk_card(page, "k01", "online")
    page.wait_for_function(
        "el => el.innerText === 'mobilenetv2-tuned · 2026-11-20'",
        arg=card.query_selector('[data-role="model"]'), timeout=WAIT_MS,
    )
    assert card.query_selector('[data-role="model"]').get_attribute("title") == MODEL
    assert page.is_hidden("#review-link")  # no review queue served: no link to one
    sim.send("match", title="Oat milk 1 l", sku="A100", score=0.91, thumbnail="thumbs/A100.jpg")
    img = page.wait_for_selector("#feed li.match img.thumb", timeout=WAIT_MS)
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img, timeout=WAIT_MS)
    assert img.get_attribute("data-placeholder") == "false"


def test_broker_down_from_the_start_shows_one_clear_state(
    page: Any, serve_page: Callable[..., str]
) -> None:
    """'Connecting…' sat beside 'All quiet' forever when the broker was down: neither was true."""
    cfg = PageConfig(broker_ws_url=f"ws://127.0.0.1:{free_port()}", store=STORE)
    page.goto(serve_page(cfg))
    page.wait_for_selector('#conn[data-state="unreachable"]', timeout=WAIT_MS)
    assert page.inner_text("#conn") == "Broker unreachable"
    assert page.is_visible("#banner") and "cannot be reached" in page.inner_text("#banner")
    body = page.inner_text("body")
    assert "All quiet" not in body and "Connecting" not in body, body
    assert "not connected to the broker" in page.inner_text("#alert-empty")
    screenshot(page, "dashboard_broker_unreachable")

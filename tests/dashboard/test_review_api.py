"""The review queue's HTTP API and staff logins: auth, CSRF, checked ids, decisions with who/when."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from cloud.dashboard.serve import DashboardError, DashboardServer, PageConfig, register
from cloud.dashboard.staff import StaffError, StaffUsers
from cloud.feedback.store import FeedbackStore
from tests.dashboard.review_support import STAFF, STORE, jpeg, seed, staff_file, write_snapshot

ANNA = "Basic " + base64.b64encode(f"anna:{STAFF['anna']}".encode()).decode()
POST_HEADERS = {"Content-Type": "application/json", "X-StoreLens-Review": "1", "Authorization": ANNA}


def _req(
    url: str, *, headers: dict[str, str] | None = None, body: Any = None
) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.fixture
def world(dashboard_build: Path, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A served dashboard with a review queue: two confirmations, one 'Not here', another store's record."""
    snaps = tmp_path / "kiosk-state"
    write_snapshot(snaps, 1, model_info={"name": "mobilenetv2-tuned", "version": "2026-11-20T10:00:00Z"})
    fb = tmp_path / "feedback"
    ids = {"a": seed(fb, "confirmed", "A100", 1), "b": seed(fb, "confirmed", "B200", 2),
           "n": seed(fb, "not_here", None, 3),
           "other": seed(fb, "confirmed", "A100", 4, store="s999")}  # fmt: skip
    srv = DashboardServer("127.0.0.1", 0, PageConfig("ws://x", STORE), static_dir=dashboard_build,
                          snapshots_dir=snaps, feedback_dir=fb,
                          staff=StaffUsers(staff_file(tmp_path / "staff.json"))).start()  # fmt: skip
    yield {"url": srv.url, "ids": ids, "fb": fb}
    srv.stop()


def test_every_request_needs_a_staff_login(world: dict[str, Any]) -> None:
    """Nobody on the network may read customers' photos or decide without a login."""
    url = world["url"]
    for path in ("", "config.json", "api/review", f"api/review/crop/{world['ids']['a']}.jpg"):
        status, headers, _ = _req(url + path)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic"), path
    wrong = "Basic " + base64.b64encode(b"anna:nope-nope").decode()
    assert _req(url + "api/review", headers={"Authorization": wrong})[0] == 401
    assert _req(url + "api/review", headers={"Authorization": "Basic !!!"})[0] == 401
    status, _, body = _req(url + "config.json", headers={"Authorization": ANNA})
    assert status == 200 and json.loads(body)["review"] is True


def test_listing_and_crop_of_this_store_only(world: dict[str, Any]) -> None:
    """The queue lists this store's records with the catalog; crops are JPEG by id, never by path."""
    url, ids = world["url"], world["ids"]
    status, _, body = _req(url + "api/review?status=pending", headers={"Authorization": ANNA})
    data = json.loads(body)
    assert status == 200 and data["who"] == "anna" and data["catalog_version"] == 1
    assert {r["record_id"] for r in data["records"]} == {ids["a"], ids["b"], ids["n"]}
    assert {c["sku"]: c["thumbnail"] for c in data["catalog"]}["A100"] == "snapshots/1/thumbs/A100.jpg"
    status, headers, crop = _req(url + f"api/review/crop/{ids['a']}.jpg", headers={"Authorization": ANNA})
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and crop == jpeg((201, 166, 107), seed=1)
    for bad in ("..%2F..%2Fstaff.json", "../records/x", ids["other"], "0" * 32, "ZZ"):
        assert _req(url + f"api/review/crop/{bad}.jpg", headers={"Authorization": ANNA})[0] in (400, 404), bad
    assert _req(url + "api/review?store=s999", headers={"Authorization": ANNA})[0] == 403
    assert _req(url + "api/review?status=everything", headers={"Authorization": ANNA})[0] == 400
    status, _, body = _req(url + "api/models", headers={"Authorization": ANNA})
    named = {"name": "mobilenetv2-tuned", "version": "2026-11-20T10:00:00Z"}
    assert json.loads(body)["models"] == {"ab" * 32: named}


def test_posts_are_csrf_safe_and_bad_decisions_refused(world: dict[str, Any]) -> None:
    """A cross-site form, a missing header or a nonsense decision must not change a record."""
    url, ids, decide = world["url"], world["ids"], world["url"] + "api/review/decide"
    ok = {"record_id": ids["a"], "decision": "approved"}
    no_header = {k: v for k, v in POST_HEADERS.items() if k != "X-StoreLens-Review"}
    assert _req(decide, headers=no_header, body=ok)[0] == 403
    form = {**POST_HEADERS, "Content-Type": "application/x-www-form-urlencoded"}
    assert _req(decide, headers=form, body=ok)[0] == 415
    assert _req(decide, headers={**POST_HEADERS, "Origin": "http://evil.example"}, body=ok)[0] == 403
    for body, why in (
        ({"record_id": ids["n"], "decision": "approved"}, "cannot be"),
        ({"record_id": ids["a"], "decision": "reassigned", "sku": "NOPE"}, "not a product"),
        ({"record_id": ids["a"], "decision": "reassigned"}, "needs the product"),
        ({"record_id": "../../x", "decision": "approved"}, "not a record id"),
        ({"record_id": ids["other"], "decision": "approved"}, "no feedback record"),
        (b"{not json", "not JSON"),
    ):
        status, _, answer = _req(decide, headers=POST_HEADERS, body=body)
        assert status in (400, 404) and why in json.loads(answer)["error"], body
    assert FeedbackStore(world["fb"]).history() == []
    status, _, answer = _req(decide, headers={**POST_HEADERS, "Origin": url.rstrip("/")}, body=ok)
    assert status == 200 and json.loads(answer)["status"] == "approved"
    [entry] = FeedbackStore(world["fb"]).history()
    assert (entry.record_id, entry.decision, entry.sku, entry.who) == (ids["a"], "approved", "A100", "anna")


def test_thumbnails_resolve_in_the_kiosk_snapshot_layout(dashboard_build: Path, tmp_path: Path) -> None:
    """The page asks snapshots/<version>/thumbs/..; kiosks keep snapshots/v<version>-<sha12>/: a 404
    left every thumbnail a placeholder."""
    write_snapshot(tmp_path / "state", 3)
    write_snapshot(tmp_path / "state", 2, store="s999")  # another store's folder is never served
    srv = DashboardServer("127.0.0.1", 0, PageConfig("ws://x", STORE), static_dir=dashboard_build,
                          snapshots_dir=tmp_path / "state").start()  # fmt: skip
    try:
        status, headers, body = _req(srv.url + "snapshots/3/thumbs/A100.jpg")
        assert status == 200 and headers["Content-Type"] == "image/jpeg" and body[:2] == b"\xff\xd8"
        assert _req(srv.url + "snapshots/2/thumbs/A100.jpg")[0] == 404
        assert _req(srv.url + "snapshots/3/../manifest.json")[0] == 404
        assert _req(srv.url + "api/review")[0] == 404  # no --feedback-dir: no queue, no login
    finally:
        srv.stop()


def test_review_needs_staff_logins_and_add_staff_cli(tmp_path: Path, dashboard_build: Path) -> None:
    """A queue without logins would accept decisions from anyone; add-staff stores only a salted hash."""
    with pytest.raises(DashboardError, match="--staff-users"):
        DashboardServer("127.0.0.1", 0, PageConfig("ws://x", STORE), static_dir=dashboard_build,
                        snapshots_dir=tmp_path, feedback_dir=tmp_path)  # fmt: skip
    app = typer.Typer()
    register(app)
    users = tmp_path / "staff.json"
    add = ["add-staff", "--users", str(users), "--name"]
    out = CliRunner().invoke(app, [*add, "anna"], input="s3cret-pass\n")
    assert out.exit_code == 0, out.output
    assert "s3cret-pass" not in users.read_text()
    assert StaffUsers(users).check_basic("Basic " + base64.b64encode(b"anna:s3cret-pass").decode()) == "anna"
    short = CliRunner().invoke(app, [*add, "ben"], input="short\n")
    assert short.exit_code == 2 and "too short" in short.output
    bad = CliRunner().invoke(app, [*add, "a/b"], input="long-enough\n")
    assert bad.exit_code == 2 and "staff name" in bad.output
    with pytest.raises(StaffError, match="add-staff"):
        StaffUsers(tmp_path / "missing.json")
    served = CliRunner().invoke(app, ["serve", "--store", STORE, "--static-dir", str(dashboard_build),
                                      "--feedback-dir", str(tmp_path), "--snapshots-dir", str(tmp_path),
                                      "--staff-users", str(tmp_path / "missing.json"),
                                      "--port", "0"])  # fmt: skip
    assert served.exit_code == 2 and "add-staff" in served.output

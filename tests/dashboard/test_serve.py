"""The dashboard server: static files, config.json for the page, snapshot thumbnails, the CLI command."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cloud.dashboard.serve import DashboardError, DashboardServer, PageConfig, register


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def test_serves_page_bundle_and_config(serve_page: Callable[..., str], tmp_path: Path) -> None:
    """The page must get MQTT.js locally (no CDN) and its broker/store/credentials from config.json."""
    snaps = tmp_path / "snaps"
    (snaps / "7" / "thumbs").mkdir(parents=True)
    (snaps / "7" / "thumbs" / "a.jpg").write_bytes(b"\xff\xd8jpeg")
    (tmp_path / "secret.txt").write_text("nope")
    cfg = PageConfig(broker_ws_url="ws://{host}:9001", store="s042", username="dashboard", password="pw",
                     thumbnail_base="snapshots/{snapshot}/")
    url = serve_page(cfg, snapshots_dir=snaps)
    status, body = _get(url)
    assert status == 200 and b'src="mqtt.min.js"' in body and b"http" not in body.split(b"<body>")[0]
    assert _get(url + "mqtt.min.js")[0] == 200
    status, body = _get(url + "config.json")
    assert status == 200 and json.loads(body) == {
        "broker_ws_url": "ws://{host}:9001", "store": "s042", "username": "dashboard", "password": "pw",
        "thumbnail_base": "snapshots/{snapshot}/",
    }
    assert _get(url + "snapshots/7/thumbs/a.jpg") == (200, b"\xff\xd8jpeg")
    assert _get(url + "snapshots/../secret.txt")[0] == 404
    assert _get(url + "snapshots/7/thumbs/missing.jpg")[0] == 404


def test_refuses_to_serve_an_unbuilt_dashboard(tmp_path: Path) -> None:
    """Without `make setup` the page would load but never connect: fail loudly instead."""
    with pytest.raises(DashboardError, match="make setup"):
        DashboardServer("127.0.0.1", 0, PageConfig("ws://x", "s1"), static_dir=tmp_path)


def test_register_adds_serve_command() -> None:
    """`storelens dashboard serve` exists with the store, broker and credential options."""
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:
        """Force a group so the command is addressed by name."""

    out = CliRunner().invoke(app, ["serve", "--help"])
    assert out.exit_code == 0, out.output
    for opt in ("--store", "--broker", "--username", "--password", "--port", "--snapshots-dir"):
        assert opt in out.output
    bad = CliRunner().invoke(app, ["serve", "--store", "s1", "--static-dir", "/nonexistent", "--port", "0"])
    assert bad.exit_code == 2 and "make setup" in bad.output


def test_serve_names_bad_store_taken_port_and_missing_folder(tmp_path: Path) -> None:
    """A bad store id, a taken port or a missing snapshots folder must be one line, not a traceback."""
    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("<html></html>")
    (static / "mqtt.min.js").write_text("//")
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:
        """Force a group so the command is addressed by name."""

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cases = {
            "store id 'a/b#'": ["--store", "a/b#", "--port", "0"],
            f"cannot listen on 127.0.0.1:{port}": ["--store", "s1", "--host=127.0.0.1", "--port", f"{port}"],
            "snapshots folder": ["--store", "s1", "--port", "0", "--snapshots-dir", str(tmp_path / "none")],
        }
        for expected, args in cases.items():
            out = CliRunner().invoke(app, ["serve", "--static-dir", str(static), *args])
            assert out.exit_code == 2, (args, out.output, out.exception)
            assert expected in out.output and "Traceback" not in out.output

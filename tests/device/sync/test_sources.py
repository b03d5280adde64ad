"""The kiosk's download allow-list: where announcements and releases may point, checked before connecting."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from device.config import ConfigError, parse_config
from device.sync import DownloadError, Sources, fetch

ALLOWED = ["https://cdn.example.com/store-1/", "s3://bucket/prefix/", "file:///srv/storelens/snapshots/"]


class _Server:
    """A loopback HTTP server that counts every request it sees (and can redirect to ``redirect_to``)."""

    def __init__(self, body: bytes = b"", redirect_to: str | None = None) -> None:
        outer = self
        self.requests: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append(self.path)
                if redirect_to is not None:
                    self.send_response(302)
                    self.send_header("Location", redirect_to)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._t = threading.Thread(target=self.httpd.serve_forever, name="test-http", daemon=True)
        self._t.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._t.join(5)


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server(b"snapshot bytes")
    yield s
    s.close()


@pytest.mark.parametrize(
    "url",
    [
        "https://cdn.example.com/store-1/v2.tar",
        "https://CDN.example.com:443/store-1/v2.tar?X-Amz-Signature=abc",
        "https://cdn.example.com/store-1/deep/v2.tar",
        "s3://bucket/prefix/v2.tar",
        "file:///srv/storelens/snapshots/v2.tar",
        "file://localhost/srv/storelens/snapshots/v2.tar",
    ],
)
def test_urls_under_a_source_are_allowed(url: str) -> None:
    """Guards: the allow-list refusing the store's own CDN, bucket or folder (kiosks would never update)."""
    assert Sources(ALLOWED).allows(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/iam",  # cloud metadata (link-local)
        "http://10.0.0.1/store-1/v2.tar",  # a private address
        "http://cdn.example.com/store-1/v2.tar",  # scheme differs
        "https://cdn.example.com:8443/store-1/v2.tar",  # port differs
        "https://cdn.example.com/store-10/v2.tar",  # not on a segment boundary
        "https://cdn.example.com/store-1/../store-2/v2.tar",
        "https://cdn.example.com/store-1/%2e%2e/store-2/v2.tar",
        "https://cdn.example.com/store-1/a%2fb.tar",
        "https://cdn.example.com/store-1//v2.tar",
        "https://cdn.example.com@169.254.169.254/store-1/v2.tar",  # user info trick
        "https://cdn.example.com.evil.net/store-1/v2.tar",
        "https://cdn.example.com/store-1/",  # the folder itself
        "file:///etc/passwd",
        "file:///dev/zero",
        "file:///srv/storelens/snapshots/../../../etc/passwd",
        "file://evil.net/srv/storelens/snapshots/v2.tar",
        "s3://other-bucket/prefix/v2.tar",
        "ftp://cdn.example.com/store-1/v2.tar",
        "https://cdn.example.com/store-1/v2.tar\nHost: x",
        "https://cdn.example.com\\@evil.net/store-1/v2.tar",
        "",
    ],
)
def test_urls_outside_the_sources_are_refused(url: str) -> None:
    """Guards: a message pointing the kiosk at metadata endpoints, local files or another store's data."""
    assert not Sources(ALLOWED).allows(url)


def test_an_empty_list_allows_nothing() -> None:
    """Guards: a kiosk with no configured sources fetching whatever a message names."""
    with pytest.raises(ValueError, match="no download sources"):
        Sources([]).check("https://cdn.example.com/store-1/v2.tar")


def test_a_bad_source_in_the_config_is_refused_by_name(tmp_path: Path) -> None:
    """Guards: an unusable prefix (user info, query, unknown scheme) silently widening or breaking it."""
    base = {
        "kiosk": {"store_id": "s1", "kiosk_id": "k1"},
        "model": {"kind": "fake"},
        "snapshots": {"state_dir": "st", "public_keys": ["k.pem"]},
        "outbox": {"path": "o.db"},
    }
    assert parse_config(base, base_dir=tmp_path).sync.sources == []
    for bad in ("https://u:p@cdn.example.com/", "https://cdn.example.com/x?y=1", "gopher://h/", "x"):
        with pytest.raises(ConfigError, match="sync"):
            parse_config({**base, "sync": {"sources": [bad]}}, base_dir=tmp_path)


def test_a_server_outside_the_sources_is_never_connected_to(server: _Server, tmp_path: Path) -> None:
    """Guards: the refusal happening after the request (the kiosk already talked to the metadata service)."""
    with pytest.raises(DownloadError) as err:
        fetch(f"{server.url}/v2.tar", tmp_path / "a.tar", size=14, sha256="0" * 64, timeout_s=5,
              sources=Sources(["https://cdn.example.com/store-1/"]))
    assert err.value.reason == "source_not_allowed"
    assert server.requests == [] and not (tmp_path / "a.tar").exists()


def test_a_redirect_out_of_the_sources_is_not_followed(server: _Server, tmp_path: Path) -> None:
    """Guards: an allowed CDN redirecting the kiosk to a host outside the list (e.g. 169.254.169.254)."""
    hop = _Server(redirect_to=f"{server.url}/v2.tar")
    try:
        with pytest.raises(DownloadError) as err:
            fetch(f"{hop.url}/store-1/v2.tar", tmp_path / "a.tar", size=14, sha256="0" * 64, timeout_s=5,
                  sources=Sources([f"{hop.url}/store-1/"]))
    finally:
        hop.close()
    assert err.value.reason == "source_not_allowed"
    assert hop.requests == ["/store-1/v2.tar"] and server.requests == []


def test_an_allowed_source_downloads(server: _Server, tmp_path: Path) -> None:
    """Guards: the allow-list refusing a loopback/file source that is configured."""
    body = b"snapshot bytes"
    digest = hashlib.sha256(body).hexdigest()
    fetch(f"{server.url}/store-1/v2.tar", tmp_path / "a.tar", size=len(body), sha256=digest, timeout_s=5,
          sources=Sources([f"{server.url}/store-1/"]))
    assert (tmp_path / "a.tar").read_bytes() == body and server.requests == ["/store-1/v2.tar"]
    src = tmp_path / "bucket" / "v2.tar"
    src.parent.mkdir()
    src.write_bytes(body)
    fetch(src.as_uri(), tmp_path / "b.tar", size=len(body), sha256=digest, timeout_s=5,
          sources=Sources([src.parent.as_uri() + "/"]))
    assert (tmp_path / "b.tar").read_bytes() == body


def _bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io to count reads")
def test_dev_zero_stops_at_the_cap(tmp_path: Path) -> None:
    """Guards: an endless source (file:///dev/zero) read a whole chunk or more past the announced size."""
    size = (3 << 20) + 5
    before = _bytes_read()
    with pytest.raises(DownloadError) as err:
        fetch("file:///dev/zero", tmp_path / "z.tar", size=size, sha256="0" * 64, timeout_s=30,
              sources=Sources(["file:///dev/"]))
    read = _bytes_read() - before
    assert err.value.reason == "too_large"
    assert size < read <= size + 1 + (64 << 10), read  # the cap + 1 byte, plus a little reading by others
    assert not (tmp_path / "z.tar").exists()

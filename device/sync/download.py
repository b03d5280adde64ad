"""Fetch a snapshot archive: file://, http(s):// (presigned S3 too), s3:// when boto3 is installed.

Every URL is checked against the kiosk's allow-list of sources (``device.sync.sources``) before anything
connects, and each HTTP redirect again. Every fetch reads at most the announced size + 1 byte (so
``file:///dev/zero`` stops at the cap), is bounded by an overall deadline, checked against the announced
sha256 before anything unpacks it, and written to a temp file that is removed on failure. URLs are
logged without their query string (presigned credentials).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from device.sync.sources import SourceError, Sources
from storelens.errors import ReasonError

_LOGGER = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # 1 MiB reads: throughput without holding the archive in memory
SOCKET_TIMEOUT_S = 30.0  # one stalled read; the overall deadline bounds a trickle


class DownloadError(ReasonError[str]):
    """A fetch failed; ``reason`` is a stable string for the status/alert."""


def redact_url(url: str) -> str:
    """The URL without query, fragment or user info (presigned S3 URLs carry credentials)."""
    p = urllib.parse.urlsplit(url)
    host = p.hostname or ""
    if p.port:
        host = f"{host}:{p.port}"
    suffix = "?<redacted>" if p.query else ""
    return urllib.parse.urlunsplit((p.scheme, host, p.path, "", "")) + suffix


def fetch(
    url: str,
    dest: Path,
    *,
    size: int,
    sha256: str,
    timeout_s: float,
    sources: Sources,
    stop: threading.Event | None = None,
) -> None:
    """Download ``url`` to ``dest`` (exactly ``size`` bytes with this ``sha256``) or raise DownloadError;
    a URL outside ``sources`` is refused (``source_not_allowed``) before anything connects."""
    check_source(sources, url)
    deadline = time.monotonic() + timeout_s
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    total = 0
    try:
        with open(dest, "wb") as out:
            for chunk in open_url(url, min(timeout_s, SOCKET_TIMEOUT_S), sources, limit=size + 1):
                total += len(chunk)
                if total > size:
                    raise DownloadError(
                        "too_large", f"{redact_url(url)} sent more than the announced {size} bytes"
                    )
                if stop is not None and stop.is_set():
                    raise DownloadError("cancelled", "sync is stopping")
                if time.monotonic() > deadline:
                    raise DownloadError("timeout", f"{redact_url(url)} took longer than {timeout_s:.0f} s")
                h.update(chunk)
                out.write(chunk)
        if total != size:
            raise DownloadError("size_mismatch", f"got {total} bytes, announced {size}")
        if h.hexdigest() != sha256:
            raise DownloadError("hash_mismatch", "archive sha256 differs from the announcement")
    except DownloadError:
        dest.unlink(missing_ok=True)
        raise
    except Exception as exc:  # urllib, OSError, botocore: any transport failure is a failed download
        dest.unlink(missing_ok=True)
        raise DownloadError("download_failed", f"{redact_url(url)}: {_clean(exc, url)}") from exc
    _LOGGER.info("downloaded %d bytes from %s", total, redact_url(url))


def check_source(sources: Sources, url: str) -> None:
    """DownloadError ``source_not_allowed`` unless ``url`` lies under one of ``sources``."""
    try:
        sources.check(url)
    except SourceError as exc:
        raise DownloadError(exc.reason, str(exc)) from exc


def _clean(exc: BaseException, url: str) -> str:
    return str(exc).replace(url, redact_url(url))


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only into the allow-list (a CDN may redirect; to a metadata endpoint, never)."""

    def __init__(self, sources: Sources) -> None:
        super().__init__()
        self._sources = sources

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        check_source(self._sources, newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def open_url(url: str, socket_timeout_s: float, sources: Sources, *, limit: int) -> Iterator[bytes]:
    """The body of ``url`` in chunks, at most ``limit`` bytes read in all (the caller checks the total).

    The URL must already be checked against ``sources``; redirects are checked here."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "file":
        path = urllib.request.url2pathname(urllib.parse.urlsplit(url).path)
        with open(path, "rb") as fh:
            yield from _chunks(fh.read, limit)
    elif scheme in ("http", "https"):
        req = urllib.request.Request(url, headers={"User-Agent": "storelens-kiosk"})
        opener = urllib.request.build_opener(_CheckedRedirects(sources))
        with opener.open(req, timeout=socket_timeout_s) as resp:
            yield from _chunks(resp.read, limit)
    elif scheme == "s3":
        yield from _s3(url, socket_timeout_s, limit)
    else:
        raise DownloadError("bad_url", f"unsupported url scheme {scheme!r}")


def _chunks(read: Callable[[int], bytes], limit: int) -> Iterator[bytes]:
    left = limit
    while left > 0 and (chunk := read(min(CHUNK_BYTES, left))):
        left -= len(chunk)
        yield chunk


def _s3(url: str, socket_timeout_s: float, limit: int) -> Iterator[bytes]:
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:
        raise DownloadError(
            "bad_url", "s3:// needs boto3 (not installed on kiosks: use presigned https)"
        ) from exc
    p = urllib.parse.urlsplit(url)
    cfg = Config(connect_timeout=socket_timeout_s, read_timeout=socket_timeout_s, retries={"max_attempts": 3})
    body: Any = boto3.client("s3", config=cfg).get_object(Bucket=p.netloc, Key=p.path.lstrip("/"))["Body"]
    try:
        yield from _chunks(body.read, limit)
    finally:
        body.close()

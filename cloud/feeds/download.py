"""http(s) catalog photos: downloaded once, concurrently, into a content-addressed cache.

``objects/<sha256[:2]>/<sha256>`` holds each photo's bytes and ``urls/<sha256 of the URL>`` the sha256 its
URL gave, so a rebuild reads photos it has already fetched from disk (a photo whose URL changes, as
Shopify's ``?v=`` does, is fetched again; one that changes behind the same URL is not: clear the cache).
Each download is size-capped and timed out, retried with backoff on network errors, 429 and 5xx, and
at most ``PER_HOST`` run against one host at once. A dead link fails that photo (``FetchError`` with the
reason), never the build.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cloud.catalog import FETCH_TIMEOUT_S, MAX_IMAGE_BYTES, FetchError
from storelens.fsutil import atomic_write_bytes

_LOGGER = logging.getLogger(__name__)

WORKERS = 16  # downloads in flight over all hosts: network-bound, threads cost little
PER_HOST = 4  # at once against one host: polite to a shop's server or CDN, still 4x one at a time
TRIES = 3  # a flaky CDN recovers within a retry or two; a dead link costs 3 tries, not the build
BACKOFF_S = 0.5  # wait before retry k: BACKOFF_S * 2**k, +-50% jitter so hosts are not hit in step
_PERMANENT = {400, 401, 403, 404, 405, 410, 451}  # no retry: asking again gives the same answer


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Downloader:
    """Fetches http(s) URLs into ``cache_dir`` (content-addressed; None: no cache, the retries and limits
    only); thread-safe."""

    def __init__(
        self,
        cache_dir: Path | None,
        *,
        max_bytes: int = MAX_IMAGE_BYTES,
        timeout_s: float = FETCH_TIMEOUT_S,
        tries: int = TRIES,
        backoff_s: float = BACKOFF_S,
        per_host: int = PER_HOST,
        workers: int = WORKERS,
    ) -> None:
        self._dir = Path(cache_dir) if cache_dir is not None else None
        self._max_bytes, self._timeout_s = max_bytes, timeout_s
        self._tries, self._backoff_s = max(1, tries), backoff_s
        self._per_host, self._workers = max(1, per_host), max(1, workers)
        self._lock = threading.Lock()
        self._hosts: dict[str, threading.BoundedSemaphore] = {}
        self._failed: dict[str, str] = {}  # url -> reason, so a dead link is not tried again this run
        self._quit = threading.Event()  # set by close(): backoff waits end at once
        self.downloaded = 0  # fetched over the network (not from the cache)

    def close(self) -> None:
        """Stop waiting between retries (an interrupted build)."""
        self._quit.set()

    def fetch(self, url: str) -> bytes:
        """The URL's bytes, from the cache or downloaded into it; FetchError with the reason."""
        cached = self._cached(url)
        if cached is not None:
            return cached
        with self._lock:
            failed = self._failed.get(url)
        if failed is not None:
            raise FetchError(failed)
        try:
            data = self._download(url)
        except FetchError as exc:
            with self._lock:
                self._failed[url] = str(exc)
            raise
        if self._dir is None:
            return data
        sha = hashlib.sha256(data).hexdigest()
        obj = self._dir / "objects" / sha[:2] / sha
        if not obj.is_file():
            obj.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(obj, data)
        (self._dir / "urls").mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self._dir / "urls" / _sha(url), sha.encode())
        return data

    def prefetch(self, urls: Iterable[str], *, progress: bool = False) -> dict[str, str]:
        """Fetch every URL not yet cached, concurrently; url -> reason for those that failed."""
        todo = list(dict.fromkeys(u for u in urls if self._cached_sha(u) is None))
        if not todo:
            return {}
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc="downloading", unit="img")
        failed: dict[str, str] = {}

        def one(url: str) -> None:
            try:
                self.fetch(url)
            except FetchError as exc:
                failed[url] = str(exc)
            if bar is not None:
                bar.update(1)

        try:
            with ThreadPoolExecutor(self._workers, thread_name_prefix="catalog-download") as pool:
                list(pool.map(one, todo))
        finally:
            if bar is not None:
                bar.close()
        return failed

    def _cached_sha(self, url: str) -> str | None:
        if self._dir is None:
            return None
        try:
            sha = (self._dir / "urls" / _sha(url)).read_text().strip()
        except OSError:
            return None
        return sha if (self._dir / "objects" / sha[:2] / sha).is_file() else None

    def _cached(self, url: str) -> bytes | None:
        sha = self._cached_sha(url)
        if sha is None or self._dir is None:
            return None
        try:
            data = (self._dir / "objects" / sha[:2] / sha).read_bytes()
        except OSError:
            return None
        return data if hashlib.sha256(data).hexdigest() == sha else None  # a damaged file: fetch again

    def _host(self, url: str) -> threading.BoundedSemaphore:
        host = (urllib.parse.urlsplit(url).hostname or "").lower()
        with self._lock:
            return self._hosts.setdefault(host, threading.BoundedSemaphore(self._per_host))

    def _download(self, url: str) -> bytes:
        last = ""
        for attempt in range(self._tries):
            if attempt:
                delay_s = self._backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
                if self._quit.wait(delay_s):
                    break
            try:
                with self._host(url):
                    data = self._get(url)
                self.downloaded += 1
                return data
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code} {exc.reason}"
                if exc.code in _PERMANENT:
                    break
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", exc)
                last = f"cannot fetch: {reason}"
            except _TooLarge as exc:
                last = str(exc)
                break
            _LOGGER.debug("try %d of %s failed: %s", attempt + 1, _redact(url), last)
        raise FetchError(f"{last} (after {attempt + 1} tries)" if attempt else last)

    def _get(self, url: str) -> bytes:
        with urllib.request.urlopen(url, timeout=self._timeout_s) as resp:
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > self._max_bytes:
                raise _TooLarge(f"larger than {self._max_bytes} bytes (Content-Length {length})")
            data = bytes(resp.read(self._max_bytes + 1))
        if len(data) > self._max_bytes:
            raise _TooLarge(f"larger than {self._max_bytes} bytes")
        return data


class _TooLarge(Exception):
    pass


def _redact(url: str) -> str:
    """A URL without its query (presigned URLs carry credentials there)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def http_sources(sources: Iterable[str]) -> list[str]:
    """The http(s) URLs among image sources."""
    return [s for s in sources if urllib.parse.urlsplit(s).scheme.lower() in ("http", "https")]

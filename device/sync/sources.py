"""The kiosk's allow-list of download sources: the only places an announcement or a release may point to.

A source is a URL prefix (``file:///srv/storelens/snapshots/``, ``https://cdn.example.com/store-1/``,
``s3://bucket/prefix/``). A URL is allowed when, after normalising, its scheme, host and port equal a
source's and its path starts with the source's path on a segment boundary (``/store-1`` never admits
``/store-10``). Anything that could make the comparison lie is refused outright: user info, ``.``/``..``
or empty segments (encoded or not), encoded slashes, backslashes, control characters, a host on a
``file://`` URL. The check runs before anything connects (redirects are checked again, hop by hop).
An empty list allows nothing: the kiosk then serves only what it holds (``[snapshots] initial``).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

SOURCE_NOT_ALLOWED = "source_not_allowed"  # the reason kiosks report (alert detail, update progress)
SCHEMES = ("file", "http", "https", "s3")
_DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_URL_CHARS = 4096


class SourceError(ValueError):
    """A URL (or a configured source) that cannot be compared safely, or one outside the allow-list."""

    reason = SOURCE_NOT_ALLOWED


@dataclass(frozen=True, slots=True)
class _Place:
    scheme: str
    host: str
    port: int | None
    segments: tuple[str, ...]


def _normalise(url: str, *, prefix: bool = False) -> _Place:
    """(scheme, host, port, decoded path segments) of ``url``; SourceError when it is ambiguous."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS:
        raise SourceError("not a URL of 1-4096 characters")
    if any(c <= " " or c in "\x7f\\" for c in url):
        raise SourceError("URL has whitespace, control characters or backslashes")
    try:
        p = urllib.parse.urlsplit(url)
        port = p.port
    except ValueError as exc:
        raise SourceError(f"unparsable URL: {exc}") from exc
    scheme = p.scheme.lower()
    if scheme not in SCHEMES:
        raise SourceError(f"scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
    if "@" in p.netloc:
        raise SourceError("URL carries user info")
    host = (p.hostname or "").lower()
    if scheme == "file":
        if host not in ("", "localhost") or port is not None:
            raise SourceError("file:// URL names a host")
        host = ""
    elif not host:
        raise SourceError(f"{scheme}:// URL has no host")
    if scheme == "s3" and port is not None:
        raise SourceError("s3:// URL has a port")
    if prefix and (p.query or p.fragment):
        raise SourceError("a source has no query or fragment")
    path = p.path
    if not path.startswith("/") and (path or not prefix):
        raise SourceError("URL path is not absolute")
    raw = path.strip("/").split("/") if path.strip("/") else []
    segments = []
    for seg in raw:
        text = urllib.parse.unquote(seg)
        if text in ("", ".", "..") or "/" in text or "\\" in text or "\x00" in text or "%" in text:
            raise SourceError("URL path has empty, '.', '..' or encoded-separator segments")
        segments.append(text)
    if not prefix and path.endswith("/"):
        raise SourceError("URL names a folder, not a file")
    return _Place(scheme, host, port if port is not None else _DEFAULT_PORTS.get(scheme), tuple(segments))


class Sources:
    """An allow-list of URL prefixes; ``check(url)`` raises SourceError for anything outside it."""

    def __init__(self, prefixes: Sequence[str]) -> None:
        places = []
        for text in prefixes:
            try:
                places.append(_normalise(text, prefix=True))
            except SourceError as exc:
                raise ValueError(f"source {text!r}: {exc}") from exc
        self._places = tuple(places)
        self.prefixes = tuple(prefixes)

    def __bool__(self) -> bool:
        return bool(self._places)

    def check(self, url: str) -> None:
        """Raise SourceError unless ``url`` lies under one of the sources (nothing is contacted)."""
        shown = _redact(url)
        try:
            place = _normalise(url)
        except SourceError as exc:
            raise SourceError(f"{shown}: {exc}") from exc
        for src in self._places:
            if (src.scheme, src.host, src.port) == (place.scheme, place.host, place.port) and (
                place.segments[: len(src.segments)] == src.segments
                and len(place.segments) > len(src.segments)
            ):
                return
        if not self._places:
            raise SourceError(f"{shown}: no download sources are configured ([sync] sources)")
        raise SourceError(f"{shown} is outside the configured sources ([sync] sources)")

    def allows(self, url: str) -> bool:
        """True when ``check(url)`` would pass."""
        try:
            self.check(url)
        except SourceError:
            return False
        return True


def _redact(url: object) -> str:
    """A URL shown in a refusal: no query (presigned credentials), no user info, bounded."""
    if not isinstance(url, str):
        return repr(type(url).__name__)
    try:
        p = urllib.parse.urlsplit(url)
        host = p.hostname or ""
        if p.port:
            host = f"{host}:{p.port}"
        shown = urllib.parse.urlunsplit((p.scheme, host, p.path, "", ""))
    except ValueError:
        shown = url.split("?", 1)[0].rsplit("@", 1)[-1]
    return repr(shown[:200])

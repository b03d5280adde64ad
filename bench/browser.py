"""Debian's Chromium under Playwright, headless, as the browser tests and ``bench/paint.py`` launch it
(never a browser Playwright downloads: the one a kiosk image ships)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from playwright.sync_api import ViewportSize

CHROMIUM: Final = Path("/usr/bin/chromium")
CHROMIUM_ARGS: Final = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
VIEWPORT: Final[ViewportSize] = {"width": 1280, "height": 800}  # back-office screen and kiosk panel


class BrowserMissing(RuntimeError):
    """Chromium or Python Playwright is not installed (`make setup` installs both)."""


@contextlib.contextmanager
def chromium_context(profile: Path, **context_args: Any) -> Iterator[Any]:
    """A Playwright persistent context in Debian's Chromium with a fresh profile at ``profile``;
    ``context_args`` go to the context (e.g. ``http_credentials``). BrowserMissing when absent."""
    if not CHROMIUM.exists():
        raise BrowserMissing(f"Debian chromium is not installed ({CHROMIUM}); `make setup` installs it")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise BrowserMissing("python playwright missing (dev extra)") from exc
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport=VIEWPORT, **context_args,
        )
        try:
            yield context
        finally:
            context.close()

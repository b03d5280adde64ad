"""Catalog feeds as shops export them, read as they are: detected from the file's header or first element.

``read_feed`` yields ``(row, raw)`` pairs: ``raw`` is a dict in our column names (``sku``, ``title``,
``price``, ``location``, ``stores``, ``images``) or a string saying why that row was skipped. Formats:
our own CSV / JSON Lines, Shopify's product CSV, Google Merchant Center feeds (TSV/CSV and XML/RSS/Atom)
and WooCommerce's product CSV (``cloud.feeds.text``, ``cloud.feeds.xml``). ``cloud.feeds.merge`` turns the
rows into items, merging rows that repeat a SKU; ``cloud.feeds.download`` fetches http(s) photos.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RawRow = tuple[int, dict[str, Any] | str]


@dataclass(slots=True)
class Feed:
    """A feed's detected format and its rows (read lazily)."""

    format: str  # "csv", "jsonl", "shopify", "google-merchant", "google-merchant-xml", "woocommerce"
    rows: Iterator[RawRow]


def read_feed(path: Path, *, location_column: str | None = None) -> Feed:
    """Open a catalog feed, detect its format; CatalogError when the file as a whole cannot be read."""
    from cloud.feeds import text, xml

    data = text.read_bytes(path)
    if xml.looks_like_xml(path, data):
        return xml.read_xml(path, data, location_column=location_column)
    return text.read_text_feed(path, data, location_column=location_column)

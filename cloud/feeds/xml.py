"""Google Merchant Center XML feeds (RSS 2.0 ``<item>`` or Atom ``<entry>``, fields in the ``g:`` namespace).

Parsed with defusedxml: a feed that declares entities (an entity-expansion "billion laughs" bomb, or an
external entity reading local files) is refused whole with one message; real product feeds declare none.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element, ParseError

import defusedxml
import defusedxml.ElementTree

from cloud.catalog import CatalogError
from cloud.feeds import Feed, RawRow

_ATOM = "{http://www.w3.org/2005/Atom}"


def looks_like_xml(path: Path, data: bytes) -> bool:
    """An .xml/.rss/.atom file, or one whose first non-blank character opens a tag."""
    return path.suffix.lower() in (".xml", ".rss", ".atom") or data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"<"


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1].lower()


def read_xml(path: Path, data: bytes, *, location_column: str | None) -> Feed:
    """A Google Merchant XML feed; CatalogError for a malformed file or one declaring entities."""
    try:
        root = defusedxml.ElementTree.fromstring(data)
    except defusedxml.DefusedXmlException as exc:
        raise CatalogError(
            f"{path} declares XML entities or a DTD ({type(exc).__name__}): refused, as an entity-expansion "
            "bomb or an external entity would be; product feeds declare none"
        ) from exc
    except ParseError as exc:
        line, col = exc.position
        raise CatalogError(f"{path} is not well-formed XML: line {line}, column {col}") from exc
    items = [e for e in root.iter() if e.tag in ("item", f"{_ATOM}entry")]
    if not items:
        raise CatalogError(f"{path}: no <item> or <entry> elements: not a Google Merchant product feed")
    loc = location_column.lower().removeprefix("g:") if location_column else None
    if loc is not None and not any(_local(c.tag) == loc for e in items for c in e):
        raise CatalogError(f"{path}: no element named {location_column!r} for --location-column")
    return Feed("google-merchant-xml", _rows(items, loc))


def _rows(items: list[Element], loc: str | None) -> Iterator[RawRow]:
    for n, item in enumerate(items, start=1):
        fields: dict[str, list[str]] = {}
        for child in item:
            fields.setdefault(_local(child.tag), []).append((child.text or "").strip())

        def first(name: str, fields: dict[str, list[str]] = fields) -> str | None:
            return next((v for v in fields.get(name, []) if v), None)

        images = [v for v in fields.get("image_link", [])[:1] + fields.get("additional_image_link", []) if v]
        raw: dict[str, Any] = {"sku": first("id"), "title": first("title"), "price": first("price"),
                               "images": images, "location": first(loc) if loc else None}  # fmt: skip
        yield n, raw

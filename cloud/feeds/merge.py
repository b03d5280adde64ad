"""Feed rows -> catalog items, merging rows that repeat a SKU (how shop systems list extra photos).

A repeated SKU's images are appended in file order, each source once; its other fields come from the
first row that has them. Two different titles, prices (with their currency) or locations for one SKU are
conflicts: the first is kept and the SKU is listed under that kind (``Catalog.conflicts``). A row that
cannot be read (no or bad SKU, bad price) is skipped and reported; an item is checked once merged (a
title, 1 to ``MAX_IMAGES_PER_ITEM`` images).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cloud.catalog import _SKU, MAX_IMAGES_PER_ITEM, Catalog, Conflict, Item, RowError, _as_list, _price
from cloud.feeds import RawRow

# An ISO 4217 code before or after the amount ("15.00 USD", "EUR 3,50"); symbols that name one currency.
_ISO = re.compile(r"^([A-Za-z]{3})\s*(?=[\d.,])|(?<=[\d\-])\s*([A-Za-z]{3})$")
_SYMBOLS = {"€": "EUR", "£": "GBP", "¥": "JPY"}  # "$" and "kr" name several currencies: left unknown


def split_currency(value: Any) -> tuple[Any, str | None]:
    """(the price without an ISO code, the currency it names or None)."""
    if not isinstance(value, str):
        return value, None
    text = value.strip()
    m = _ISO.search(text)
    if m is not None:
        code = (m.group(1) or m.group(2)).upper()
        return (text[: m.start()] + text[m.end() :]).strip(), code
    return text, next((c for s, c in _SYMBOLS.items() if s in text), None)


@dataclass(slots=True)
class _Draft:
    sku: str
    row: int
    title: str | None = None
    price: tuple[str, str | None] | None = None
    location: str | None = None
    stores: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)


def _text(value: Any) -> str | None:
    return str(value).strip() or None if value is not None else None


def _row_fields(raw: dict[str, Any]) -> tuple[str, str | None, tuple[str, str | None] | None, str | None]:
    """(sku, title, (price, currency), location) of one row; ValueError names what is wrong."""
    sku = str(raw.get("sku") or "").strip()
    if not sku:
        raise ValueError("missing sku")
    if not _SKU.match(sku):
        raise ValueError(f"bad sku {sku!r} (1-64 printable characters, no '/')")
    amount, currency = split_currency(raw.get("price"))
    price = _price(amount)
    priced = (price, currency) if price is not None else None
    return sku, _text(raw.get("title")), priced, _text(raw.get("location"))


def merge_rows(rows: Iterable[RawRow], cat: Catalog) -> None:
    """Fill ``cat`` (items, errors, conflicts and counts) from a feed's rows."""
    drafts: dict[str, _Draft] = {}
    for n, raw in rows:
        cat.rows += 1
        if isinstance(raw, str):
            cat.errors.append(RowError(n, None, raw))
            continue
        try:
            sku, title, price, location = _row_fields(raw)
        except ValueError as exc:
            sku_given = raw.get("sku")
            cat.errors.append(RowError(n, str(sku_given) if sku_given else None, str(exc)))
            continue
        d = drafts.get(sku)
        if d is None:
            d = drafts[sku] = _Draft(sku, n)
        else:
            cat.merged_rows += 1
        d.title = _keep(cat, "title", d, d.title, title)
        d.price = _keep(cat, "price", d, d.price, price)
        d.location = _keep(cat, "location", d, d.location, location)
        d.stores += [s for s in _as_list(raw.get("stores")) if s not in d.stores]
        images = _as_list(raw.get("images", raw.get("image")))
        cat.images_listed += len(images)
        for src in images:
            if src in d.seen:
                cat.images_repeated += 1
                continue
            d.seen.add(src)
            d.images.append(src)
    for d in drafts.values():
        error = (
            "missing title" if not d.title
            else "no images" if not d.images
            else f"{len(d.images)} images, at most {MAX_IMAGES_PER_ITEM}"
            if len(d.images) > MAX_IMAGES_PER_ITEM else None
        )  # fmt: skip
        if error is not None:
            cat.errors.append(RowError(d.row, d.sku, error))
            continue
        assert d.title is not None
        cat.items.append(
            Item(
                sku=d.sku,
                title=d.title[:200],
                price=d.price[0] if d.price else None,
                location=d.location and d.location[:100],
                stores=tuple(d.stores),
                images=tuple(d.images),
                row=d.row,
                currency=d.price[1] if d.price else None,
            )
        )
    cat.errors.sort(key=lambda e: e.row)


def _keep(cat: Catalog, kind: str, d: _Draft, kept: Any, new: Any) -> Any:
    """The value kept for a field: the first given; a different later one is a conflict (once per SKU)."""
    if kept is None:
        return new
    if new is not None and new != kept:
        found = cat.conflicts.setdefault(kind, [])
        if not any(c.sku == d.sku for c in found):
            found.append(Conflict(d.sku, _show(kept), _show(new)))
    return kept


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(v for v in value if v)
    return str(value)

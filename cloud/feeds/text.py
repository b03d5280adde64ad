"""Text feeds: our CSV and JSON Lines, Shopify and WooCommerce product CSV, Google Merchant TSV/CSV.

The format and the field separator are taken from the header row: the first of ``,`` ``;`` tab that gives
a header some format recognises. CSV is parsed by the standard library; a record the parser runs away
with (an unclosed quote swallowing the lines after it) is reported as one bad row and reading resumes on
the next line, so one broken line costs that line, not the rest of the file.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cloud.catalog import MAX_CATALOG_BYTES, CatalogError, _columns
from cloud.feeds import Feed, RawRow

MAX_RECORD_LINES = 200  # a quoted field (Shopify's "Body (HTML)") spans a few dozen lines; more is a runaway
_SEPARATORS = (",", ";", "\t")
_COMMA_LIST = re.compile(r"\s*,\s*")


def read_bytes(path: Path) -> bytes:
    """The feed's bytes, size-capped."""
    if path.stat().st_size > MAX_CATALOG_BYTES:
        raise CatalogError(f"{path} is larger than {MAX_CATALOG_BYTES} bytes")
    return path.read_bytes()


def decode(path: Path, data: bytes) -> str:
    """UTF-8 text (a BOM dropped); a file that is not names the first line that is not."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        whole = "the file is" if _is_legacy(data) else "the file mixes encodings, or is"
        raise CatalogError(
            f"{path} is not UTF-8 text: line {line} has byte 0x{data[exc.start]:02x}; {whole} saved in "
            "a legacy encoding: save it as UTF-8 (in Excel: 'CSV UTF-8')"
        ) from exc


def _is_legacy(data: bytes) -> bool:
    """True when no line of the file is valid UTF-8 with non-ASCII text (one legacy encoding throughout)."""
    return not any(
        not line.isascii() and _utf8(line) for line in data.split(b"\n")
    )


def _utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _key(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).lower()


def _detect(keys: set[str]) -> str | None:
    if "handle" in keys and ({"variant sku", "image src"} & keys):
        return "shopify"
    if "id" in keys and "image link" in keys:
        return "google-merchant"
    if {"sku", "images", "regular price"} <= keys:
        return "woocommerce"
    if "sku" in keys:
        return "csv"
    return None


def read_text_feed(path: Path, data: bytes, *, location_column: str | None) -> Feed:
    """A CSV/TSV or JSON Lines feed, its format detected from the header."""
    text = decode(path, data)
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json") or text.lstrip().startswith("{"):
        return Feed("jsonl", _json_rows(text, location_column))
    lines = [line + "\n" for line in text.split("\n")]
    if lines and lines[-1] == "\n":
        lines.pop()
    first = lines[0] if lines else ""
    for sep in _SEPARATORS:
        header = [h.strip() for h in next(csv.reader([first], delimiter=sep), [])]
        fmt = _detect({_key(h) for h in header})
        if fmt is not None:
            break
    else:
        shown = ", ".join(repr(h) for h in header[:12]) or "nothing"
        raise CatalogError(
            f"{path}: no SKU-like column in the header (looked for 'sku', Shopify's 'Handle' + 'Variant SKU',"
            " "
            f"Google Merchant's 'id' + 'image_link', WooCommerce's 'SKU'); the first line has {shown}"
        )
    keys = [_key(h) for h in header]
    loc = _key(location_column) if location_column else None
    if loc is not None and loc not in keys:
        raise CatalogError(f"{path}: no column {location_column!r} for --location-column (got {header})")
    records = _dicts(_records(lines, sep), keys)
    if fmt == "shopify":
        rows = _shopify(records, loc)
    elif fmt == "google-merchant":
        rows = _google(records, loc)
    elif fmt == "woocommerce":
        rows = _woocommerce(records, loc)
    else:
        rows = _ours(records, header, loc)
    return Feed(fmt, rows)


class _Lines:
    """An iterator over lines from ``pos`` that refuses to run past ``limit`` (a runaway quoted field)."""

    def __init__(self, lines: list[str], pos: int) -> None:
        self.lines, self.pos, self.limit = lines, pos, pos + MAX_RECORD_LINES

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if self.pos >= len(self.lines):
            raise StopIteration
        if self.pos >= self.limit:
            raise _Runaway
        self.pos += 1
        return self.lines[self.pos - 1]


class _Runaway(Exception):
    pass


def _records(lines: list[str], sep: str) -> Iterator[tuple[int, list[str] | str]]:
    """(1-based line where a record starts, its fields or why it was skipped), the header excluded."""
    src = _Lines(lines, 1)
    reader = csv.reader(src, delimiter=sep)
    while True:
        start = src.pos
        src.limit = start + MAX_RECORD_LINES
        try:
            fields = next(reader)
        except StopIteration:
            return
        except (csv.Error, _Runaway) as exc:
            why = f"over {MAX_RECORD_LINES} lines" if isinstance(exc, _Runaway) else str(exc)
            yield start + 1, f"line {start + 1}: broken CSV record ({why}): an unclosed quote?"
            src = _Lines(lines, start + 1)
            reader = csv.reader(src, delimiter=sep)
            continue
        span = lines[start : src.pos]
        if len(span) > 1 and sum(s.count('"') for s in span) % 2:
            yield start + 1, f"line {start + 1}: broken CSV record (an unclosed quote runs over lines)"
            src = _Lines(lines, start + 1)
            reader = csv.reader(src, delimiter=sep)
            continue
        if fields:
            yield start + 1, fields


def _dicts(
    records: Iterator[tuple[int, list[str] | str]], keys: list[str]
) -> Iterator[tuple[int, dict[str, str] | str]]:
    """Records as dicts keyed by normalised header names; numbered as data rows (1 = the first)."""
    for n, (_line, rec) in enumerate(records, start=1):
        if isinstance(rec, str):
            yield n, rec
            continue
        extra = rec[len(keys) :]
        if any(e.strip() for e in extra):
            yield n, "more fields than the header"
            continue
        yield n, {k: v.strip() for k, v in zip(keys, rec, strict=False)}


def _json_rows(text: str, loc: str | None) -> Iterator[RawRow]:
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            yield n, f"not JSON: {exc.msg}"
            continue
        if not isinstance(obj, dict):
            yield n, "not a JSON object"
        elif loc is not None:
            yield n, {**obj, "location": next((v for k, v in obj.items() if _key(k) == loc), None)}
        else:
            yield n, obj


def _ours(
    records: Iterator[tuple[int, dict[str, str] | str]], header: list[str], loc: str | None
) -> Iterator[RawRow]:
    names = {_key(h): v for h, v in _columns(header).items()}
    for n, rec in records:
        if isinstance(rec, str):
            yield n, rec
            continue
        raw: dict[str, Any] = {names[k]: v for k, v in rec.items()}
        if loc is not None:
            raw["location"] = rec.get(loc)
        yield n, raw


def _google(records: Iterator[tuple[int, dict[str, str] | str]], loc: str | None) -> Iterator[RawRow]:
    for n, rec in records:
        if isinstance(rec, str):
            yield n, rec
            continue
        # Google's text feeds separate additional image links with commas.
        images = [rec.get("image link", ""), *_COMMA_LIST.split(rec.get("additional image link", ""))]
        yield n, {"sku": rec.get("id"), "title": rec.get("title"), "price": rec.get("price"),
                  "images": [i for i in images if i], "location": rec.get(loc) if loc else None}  # fmt: skip


def _woocommerce(records: Iterator[tuple[int, dict[str, str] | str]], loc: str | None) -> Iterator[RawRow]:
    """One item per SKU; a variation without images takes its parent's; a variable product whose
    variations are listed is not an item itself (its variations are)."""
    rows = list(records)
    parents = {r.get("parent", "") for _, r in rows if isinstance(r, dict)} - {""}
    images_of: dict[str, list[str]] = {}
    for n, rec in rows:
        if isinstance(rec, str):
            yield n, rec
            continue
        images = [i for i in _COMMA_LIST.split(rec.get("images", "")) if i]
        own = {f"id:{rec.get('id', '')}", rec.get("sku", "")} - {"id:", ""}
        for ref in own:
            images_of[ref] = images
        if not images and rec.get("parent"):
            images = images_of.get(rec["parent"], [])
        if rec.get("type", "").lower() == "variable" and own & parents:
            continue
        price = rec.get("regular price") or rec.get("sale price")
        yield n, {"sku": rec.get("sku"), "title": rec.get("name"), "price": price, "images": images,
                  "location": rec.get(loc) if loc else None}  # fmt: skip


def _shopify(records: Iterator[tuple[int, dict[str, str] | str]], loc: str | None) -> Iterator[RawRow]:
    """Shopify lists a product over several rows sharing its Handle: the first has the title, each variant
    row a Variant SKU and price, and extra rows only an Image Src (ordered by Image Position). One item
    per variant SKU (the Handle when a product has none), with the product's photos, its own first."""
    products: dict[str, list[tuple[int, dict[str, str]]]] = {}
    for n, rec in records:
        if isinstance(rec, str):
            yield n, rec
            continue
        handle = rec.get("handle", "")
        if not handle:
            yield n, "no Handle"
            continue
        products.setdefault(handle, []).append((n, rec))
    for handle, rows in products.items():
        title = next((r["title"] for _, r in rows if r.get("title")), "")
        location = next((r[loc] for _, r in rows if loc and r.get(loc)), None)
        pictures = sorted(
            ((_position(r.get("image position", "")), i, r["image src"]) for i, (_, r) in enumerate(rows)
             if r.get("image src")),
        )  # fmt: skip
        images = [src for _, _, src in pictures]
        variants = [(n, r) for n, r in rows if r.get("variant sku") or r.get("variant price")]
        if not variants:
            variants = rows[:1]
        named = len(variants) > 1
        for n, r in variants:
            options = [r.get(f"option{i} value", "") for i in (1, 2, 3)]
            options = [o for o in options if o and o != "Default Title"]
            name = f"{title} ({' / '.join(options)})" if named and options else title
            own = [r["variant image"]] if r.get("variant image") else []
            place = r.get(loc) if loc and r.get(loc) else location
            yield n, {"sku": r.get("variant sku") or handle, "title": name, "price": r.get("variant price"),
                      "images": own + images, "location": place}  # fmt: skip


def _position(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 1 << 30  # no position: after the numbered photos, in file order

"""Catalog input: feed rows -> validated items, plus bounded fetching of untrusted images.

A row is ``sku, title, price?, location?, stores?, images`` (CSV with a header, fields separated by ``,``,
``;`` or tabs: ``stores`` and ``images`` separated by ``;`` or ``|``; JSON Lines: lists); shop exports
(Shopify, Google Merchant, WooCommerce) are read as they are (``cloud.feeds``). Rows repeating a SKU are
merged (``cloud.feeds.merge``). Prices are read as spreadsheets write them ("12,90", "1 299,00 kr", "$3").
Bad rows are reported with their row number, never fatal.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

_SKU = re.compile(r"^[^\x00-\x1f/\\]{1,64}$")
_SPLIT = re.compile(r"[;|]")
MAX_IMAGES_PER_ITEM = 256  # bounds one row's share of the index; real catalogs use 1-20
MAX_IMAGE_BYTES = 20 << 20  # 20 MiB: far above any product photo, small enough to hold in memory
FETCH_TIMEOUT_S = 15.0  # per URL; a stuck server costs one image, not the build
MAX_CATALOG_BYTES = 256 << 20


class CatalogError(Exception):
    """The catalog file as a whole cannot be read (missing, not CSV/JSONL, no sku column)."""


class FetchError(Exception):
    """One image could not be fetched (missing, too large, network failure)."""


@dataclass(frozen=True, slots=True)
class Item:
    """One validated catalog row."""

    sku: str
    title: str
    price: str | None
    location: str | None
    stores: tuple[str, ...]
    images: tuple[str, ...]
    row: int
    currency: str | None = None  # ISO 4217 when the feed names it ("15.00 USD", "3,50 €")

    def carried_by(self, store: str) -> bool:
        """True if ``store`` sells this item (an empty store list means every store)."""
        return not self.stores or store in self.stores

    def metadata(self) -> dict[str, Any]:
        """The fields a kiosk shows (the snapshot's items.jsonl row, minus the thumbnail)."""
        meta = {"sku": self.sku, "title": self.title, "price": self.price, "location": self.location}
        return {**meta, "currency": self.currency} if self.currency else meta


@dataclass(frozen=True, slots=True)
class RowError:
    row: int  # 1-based data row (header excluded)
    sku: str | None
    error: str


@dataclass(frozen=True, slots=True)
class Conflict:
    sku: str
    kept: str  # the first row's value, which the item keeps
    other: str  # the first different value a later row gave


@dataclass(slots=True)
class Catalog:
    items: list[Item] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)
    base_dir: Path = Path(".")
    format: str = "csv"  # as detected (cloud.feeds.Feed.format)
    rows: int = 0  # data rows read (records of an XML feed)
    merged_rows: int = 0  # rows that added to a SKU listed on an earlier row
    images_listed: int = 0
    images_repeated: int = 0  # listed again for the same SKU: kept once
    conflicts: dict[str, list[Conflict]] = field(default_factory=dict)  # "title"/"price"/"location"

    def for_store(self, store: str) -> list[Item]:
        """Items this store carries, in catalog order."""
        return [it for it in self.items if it.carried_by(store)]


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    return [s.strip() for s in _SPLIT.split(str(value)) if s.strip()]


# Currency marks a price may carry at either end, as shop systems and spreadsheets export them.
_MARK = r"(?:[$€£¥]|(?:kr|sek|nok|dkk|eur|usd|gbp|chf|pln)\.?)"
_CURRENCY = re.compile(rf"^{_MARK}\s*|\s*(?:{_MARK}|[:,.]-)$", re.IGNORECASE)
_WHOLE = re.compile(rf"[:,.]-\s*{_MARK}?\s*$", re.IGNORECASE)  # a whole amount: "12:-", "1.299,- kr"
# A space, no-break or thin space or apostrophe between digits, before a group of exactly three: thousands.
_GROUPING = re.compile(r"(?<=\d)[\s\u00a0\u202f'](?=\d{3}(?!\d))")


def _price(value: Any) -> str | None:
    """A price as "12.90" (three decimals kept when given: "1.999"). Accepts decimal commas and colons
    ("12,90", "12:90"), whole amounts ("12:-", "1.299,-"), grouping ("1 299,00", "1.299,00", "1,299.00")
    and a currency mark at either end ("kr", "€", "SEK"); refuses negatives, non-numbers, malformed
    grouping and the ambiguous "1,299" / "1.299" (a thousand, or about one?). JSON numbers are taken as
    they are."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ValueError(f"bad price {value!r}")
    text = str(value).strip()
    if not isinstance(value, int | float):
        text = _text_price(text, value)
    try:
        d = Decimal(text)
    except InvalidOperation as exc:
        raise ValueError(f"bad price {value!r}") from exc
    if not d.is_finite() or d < 0 or d > 1_000_000:
        raise ValueError(f"bad price {value!r}")
    places = Decimal("0.001") if d != d.quantize(Decimal("0.01")) else Decimal("0.01")
    return f"{d.quantize(places)}"


def _text_price(text: str, value: Any) -> str:
    """A spreadsheet's price text as a plain decimal string (ValueError when ambiguous or malformed)."""
    whole = _WHOLE.search(text) is not None  # "1.299,-": no cents
    for _ in range(2):  # a mark at each end: "SEK 12:-"
        text = _CURRENCY.sub("", text).strip()
    text = _GROUPING.sub("", text).replace(":", ",")
    if whole:  # what is left can only be grouping: "1.299" / "1,299" here is a thousand
        if not re.fullmatch(r"\d+|\d{1,3}(?:[.,]\d{3})+", text):
            raise ValueError(f"bad price {value!r}")
        return text.replace(".", "").replace(",", "")
    if "," in text and "." in text:  # the later one is the decimal separator, the other groups thousands
        dec, group = (",", ".") if text.rfind(",") > text.rfind(".") else (".", ",")
        if not re.fullmatch(rf"\d{{1,3}}(?:{re.escape(group)}\d{{3}})+{re.escape(dec)}\d{{1,3}}", text):
            raise ValueError(f"bad price {value!r}")
        return text.replace(group, "").replace(dec, ".")
    if re.fullmatch(r"[1-9]\d{0,2}[.,]\d{3}", text):  # 1,299 / 1.299: a thousand or about one?
        raise ValueError(f"ambiguous price {value!r}: a thousands separator or three decimals? "
                         "Write it with two decimals and no grouping, e.g. 1299.00")
    return text.replace(",", ".") if text.count(",") == 1 else text


# Other names shop exports give our columns (matched case-insensitively, spaces or underscores alike);
# used only when the file lacks the column itself.
_ALIASES = {
    "name": "title", "product": "title", "product name": "title", "image": "images", "image url": "images",
    "image urls": "images", "photo": "images", "photos": "images", "picture": "images", "pictures": "images",
    "aisle": "location", "shelf": "location",
}  # fmt: skip


def _columns(header: Sequence[str]) -> dict[str, str]:
    """Header name -> the column it fills: our own names first, then the first alias of each."""
    keys = {h: " ".join(h.replace("_", " ").split()).lower() for h in header}
    names = {h: k.replace(" ", "_") for h, k in keys.items()}
    taken = set(names.values())
    for h, k in keys.items():
        target = _ALIASES.get(k)
        if target is not None and target not in taken:
            names[h] = target
            taken.add(target)
    return names


def load_catalog(path: Path, *, location_column: str | None = None, progress: bool = False) -> Catalog:
    """Parse and validate a catalog file; bad rows land in ``errors`` with their row number."""
    path = Path(path)
    if path.is_dir():
        raise CatalogError(f"catalog {path} is a folder: give the catalog file in it (.csv or .jsonl)")
    if not path.is_file():
        raise CatalogError(f"catalog {path} does not exist")
    cat = Catalog(base_dir=path.resolve().parent)
    _read_into(cat, path, location_column, progress)
    return cat


def _read_into(cat: Catalog, path: Path, location_column: str | None, progress: bool) -> None:
    from cloud.feeds import read_feed
    from cloud.feeds.merge import merge_rows

    feed = read_feed(path, location_column=location_column)
    cat.format = feed.format
    if not progress:
        merge_rows(feed.rows, cat)
        return
    from tqdm import tqdm

    with tqdm(feed.rows, desc=f"reading {feed.format}", unit="row") as rows:
        merge_rows(rows, cat)


def write_catalog(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as JSON Lines (the format the grocery helper and tests produce)."""
    Path(path).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")


# ---- image sources: local path, http(s)://, s3:// ----


def fetch_image_bytes(
    source: str,
    base_dir: Path,
    *,
    s3_client: Any = None,
    max_bytes: int = MAX_IMAGE_BYTES,
    downloader: Any = None,
) -> bytes:
    """Read one catalog image's bytes with a size cap and timeout; raise FetchError on any failure.

    http(s) URLs go through ``downloader`` (a ``cloud.feeds.download.Downloader``: cache, retries,
    per-host limit) when one is given."""
    if re.match(r"^[A-Za-z]:[\\/]", source):
        raise FetchError(f"{source!r} is a Windows path: give image paths relative to the catalog file")
    scheme = urllib.parse.urlsplit(source).scheme.lower()
    try:
        if scheme in ("http", "https") and downloader is not None:
            data = bytes(downloader.fetch(source))
        elif scheme in ("http", "https"):
            with urllib.request.urlopen(source, timeout=FETCH_TIMEOUT_S) as resp:
                data = bytes(resp.read(max_bytes + 1))
        elif scheme == "s3":
            data = _fetch_s3(source, s3_client, max_bytes)
        elif scheme in ("", "file"):
            url_path = urllib.parse.urlsplit(source).path
            p = Path(urllib.request.url2pathname(url_path) if scheme == "file" else source)
            p = p if p.is_absolute() else base_dir / p
            if not p.is_file() and scheme == "" and "\\" in source:  # folders as written on Windows
                p = base_dir / source.replace("\\", "/")
            if not p.is_file():
                raise FetchError(f"no such file {p}")
            with open(p, "rb") as fh:
                # read(n) allocates n bytes up front: sized by fstat, a 348 px photo reads in ~25 us
                # instead of 53-80 us; a file that grew since fstat is still capped.
                size = os.fstat(fh.fileno()).st_size
                data = fh.read(min(size, max_bytes) + 1)
        else:
            raise FetchError(f"unsupported image source scheme {scheme!r}")
    except (OSError, urllib.error.URLError, ValueError) as exc:
        raise FetchError(f"cannot fetch: {exc}") from exc
    if len(data) > max_bytes:
        raise FetchError(f"larger than {max_bytes} bytes")
    if not data:
        raise FetchError("zero-size file")
    return data


def _fetch_s3(source: str, s3_client: Any, max_bytes: int) -> bytes:
    parts = urllib.parse.urlsplit(source)
    if s3_client is None:
        import boto3

        s3_client = boto3.client("s3")
    try:
        obj = s3_client.get_object(Bucket=parts.netloc, Key=parts.path.lstrip("/"))
        if int(obj.get("ContentLength", 0)) > max_bytes:
            raise FetchError(f"larger than {max_bytes} bytes")
        body: bytes = obj["Body"].read(max_bytes + 1)
        return body
    except FetchError:
        raise
    except Exception as exc:  # botocore raises many unrelated types; one image must not stop a build
        raise FetchError(f"cannot fetch from S3: {exc}") from exc

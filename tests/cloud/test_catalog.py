"""Catalog files as retailers' spreadsheets and shop systems export them: separators, prices, encodings."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from cloud.catalog import CatalogError, FetchError, _price, fetch_image_bytes, load_catalog


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("12.90", "12.90"), ("12,90", "12.90"), ("12:90", "12.90"), ("12:-", "12.00"), ("12,-", "12.00"),
        ("1 299,00", "1299.00"), ("1\u00a0299,5", "1299.50"), ("1.299,00", "1299.00"),
        ("1,299.00", "1299.00"),
        ("kr 12", "12.00"), ("12 kr", "12.00"), ("SEK 12:-", "12.00"), ("€1.20", "1.20"), ("$3", "3.00"),
        ("EUR12,5", "12.50"), ("12.-", "12.00"), ("1.299,-", "1299.00"), ("1 299:- kr", "1299.00"),
        ("0", "0.00"), ("0,999", "0.999"), (3, "3.00"),
        (2.5, "2.50"), (1.299, "1.299"), ("", None), (None, None),
    ],
)  # fmt: skip
def test_prices_are_read_as_spreadsheets_write_them(raw: object, want: str | None) -> None:
    """Decimal commas and colons, grouping spaces, both separators and currency marks give one format."""
    assert _price(raw) == want


@pytest.mark.parametrize("raw", ["1,299", "1.299", "cheap", "-3", "12,90,1", True, "1e9", "12 90", "1,2,3.4",
                                 "12.90,5"])  # fmt: skip
def test_ambiguous_or_bad_prices_are_refused_by_name(raw: object) -> None:
    """A price that could mean a thousand or about one is refused, not guessed; so are garbage and
    malformed grouping (a space is a thousands separator only before three digits)."""
    with pytest.raises(ValueError, match=r"(ambiguous|bad) price"):
        _price(raw)


@pytest.mark.parametrize("sep", [",", ";", "\t"])
def test_csv_separator_is_detected_from_the_header(tmp_path: Path, sep: str) -> None:
    """European spreadsheets save "CSV" with semicolons; some exports use tabs. All load the same items."""
    rows = [["sku", "title", "price", "location", "images"],
            ["A1", "Äpple", "12,90", "Gång 3", "a.jpg;b.jpg"], ["B2", "Päron", "9:-", "", "c.jpg"]]
    p = tmp_path / "c.csv"
    with p.open("w", newline="", encoding="utf-8-sig") as fh:  # quotes fields holding the separator, as Excel
        csv.writer(fh, delimiter=sep).writerows(rows)
    cat = load_catalog(p)
    assert not cat.errors
    assert [(i.sku, i.title, i.price, i.location, i.images) for i in cat.items] == [
        ("A1", "Äpple", "12.90", "Gång 3", ("a.jpg", "b.jpg")),
        ("B2", "Päron", "9.00", None, ("c.jpg",)),
    ]


def test_a_non_utf8_catalog_names_the_fix(tmp_path: Path) -> None:
    """Excel's plain "CSV" is Windows-1252: refuse it whole with what to do, not a codec traceback."""
    p = tmp_path / "c.csv"
    p.write_bytes("sku,title,images\nA1,Äpple,a.jpg\n".encode("cp1252"))
    with pytest.raises(CatalogError, match=r"not UTF-8.*CSV UTF-8"):
        load_catalog(p)


def test_windows_style_image_paths(tmp_path: Path) -> None:
    """Folders separated by backslashes (a catalog made on Windows) resolve; a drive path is named."""
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"jpeg bytes")
    assert fetch_image_bytes("photos\\a.jpg", tmp_path) == b"jpeg bytes"
    with pytest.raises(FetchError, match="Windows path"):
        fetch_image_bytes("C:\\Users\\shop\\a.jpg", tmp_path)
    with pytest.raises(FetchError, match="no such file"):
        fetch_image_bytes("photos\\b.jpg", tmp_path)


def test_column_names_shops_use(tmp_path: Path) -> None:
    """"Name", "Aisle", "Image URL" fill title, location, images; a file with its own title keeps it."""
    p = tmp_path / "c.csv"
    p.write_text("SKU,Product Name,Price,Aisle,Image_URL\nA1,Apple,1.00,Aisle 3,a.jpg\n", encoding="utf-8")
    [item] = load_catalog(p).items
    assert (item.title, item.location, item.images) == ("Apple", "Aisle 3", ("a.jpg",))
    p.write_text("sku,name,title,images\nA1,internal-42,Apple,a.jpg\n", encoding="utf-8")
    assert load_catalog(p).items[0].title == "Apple"


def test_a_folder_given_as_the_catalog_is_named_a_folder(tmp_path: Path) -> None:
    """A folder was reported as 'does not exist', which sends the user looking for a typo."""
    with pytest.raises(CatalogError, match=r"is a folder: give the catalog file in it"):
        load_catalog(tmp_path)
    with pytest.raises(CatalogError, match="does not exist"):
        load_catalog(tmp_path / "missing.csv")

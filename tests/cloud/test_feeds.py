"""Feeds as shops export them: repeated SKUs merged; Shopify, Google Merchant, WooCommerce read as is."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from cloud.build import BuildSpec, build_snapshot
from cloud.catalog import load_catalog
from cloud.check import check_catalog
from cloud.cli import catalog_app
from cloud.feeds.summary import summary_lines
from tests.cloud.conftest import CountingEmbedder, item_image, write_jpeg
from tests.support.photo_server import PhotoServer

runner = CliRunner()


def _photos(root: Path, item: int, n: int) -> list[str]:
    return [write_jpeg(root / f"p{item}_{v}.jpg", item_image(item, v)).name for v in range(n)]


def _write_csv(path: Path, header: list[str], rows: list[dict[str, str]], sep: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, header, delimiter=sep, restval="")
        w.writeheader()
        w.writerows(rows)
    return path


def _cli(*args: str) -> tuple[int, str]:
    app = typer.Typer()
    app.add_typer(catalog_app, name="catalog")
    r = runner.invoke(app, ["catalog", *args])
    return r.exit_code, r.output


def test_one_row_per_image_merges_into_one_item(tmp_path: Path) -> None:
    """Rows repeating a SKU must add their photos (order kept, repeats dropped), not be dropped."""
    p = tmp_path / "c.csv"
    p.write_text(
        "sku,title,price,location,images\n"
        "A,Apple,1.20,,a1.jpg\n"
        "B,Banana,2.00,Aisle 2,b1.jpg\n"
        "A,,,Aisle 1,a2.jpg\n"
        "A,,,,a1.jpg;a3.jpg\n"
    )
    cat = load_catalog(p)
    assert [(it.sku, it.images, it.location) for it in cat.items] == [
        ("A", ("a1.jpg", "a2.jpg", "a3.jpg"), "Aisle 1"),
        ("B", ("b1.jpg",), "Aisle 2"),
    ]
    assert not cat.errors and not cat.conflicts
    assert (cat.rows, cat.merged_rows, cat.images_listed, cat.images_repeated) == (4, 2, 5, 1)


def test_conflicts_are_one_line_per_kind_and_check_lists_them(tmp_path: Path) -> None:
    """Two prices or titles for one SKU must keep the first, be summed up per kind, and be listed by check."""
    rows = [f"S{i},Item {i},{i}.00,x.jpg\nS{i},Item {i},{i}.50,y.jpg\n" for i in range(30)]
    p = tmp_path / "c.csv"
    p.write_text("sku,title,price,images\n" + "".join(rows) + "S0,Other name,,z.jpg\n")
    cat = load_catalog(p)
    assert cat.items[3].price == "3.00" and cat.items[0].title == "Item 0"
    lines = summary_lines(_fields(p), images_ok=0)
    price_lines = [line for line in lines if "different prices" in line]
    assert len(price_lines) == 1 and "30 SKUs" in price_lines[0]
    assert "S0, S1, S2, S3, S4, ... 25 more" in price_lines[0]
    assert sum("different titles" in line for line in lines) == 1
    _, out = _cli("check", "--catalog", str(p))
    assert out.count("conflict: S") == 31 and "conflict: S0 has title 'Item 0' (kept) and 'Other name'" in out


def _fields(p: Path) -> dict[str, object]:
    from dataclasses import asdict

    return asdict(check_catalog(p))


def _build_and_check(feed: Path, tmp_path: Path, key: Ed25519PrivateKey, **kw: str) -> dict[str, object]:
    """Build the feed (fake model) and run `catalog check` on it; both must succeed."""
    res = build_snapshot(BuildSpec(
        catalog=feed, store="s1", out_dir=tmp_path / "snap", private_key=key, embedder=CountingEmbedder(),
        progress=False, **kw
    ))
    args = ["check", "--catalog", str(feed)] + [
        a for k, v in kw.items() for a in (f"--{k.replace('_', '-')}", v)
    ]
    code, out = _cli(*args)
    assert code == 0 and out.rstrip().splitlines()[-1].startswith("OK"), out
    assert "Traceback" not in out
    return res.report


SHOPIFY = [
    "Handle",
    "Title",
    "Body (HTML)",
    "Vendor",
    "Option1 Name",
    "Option1 Value",
    "Variant SKU",
    "Variant Price",
    "Image Src",
    "Image Position",
    "Image Alt Text",
    "Variant Image",
    "Status",
]


def test_shopify_export_builds_and_checks(tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    """A Shopify product export (extra photos on rows with only Handle + Image Src, variants on their own
    rows, ordered by Image Position) must give one item per variant SKU with every photo."""
    a, b, c = _photos(tmp_path, 1, 3), _photos(tmp_path, 2, 2), _photos(tmp_path, 3, 2)
    rows = [
        {
            "Handle": "oat-milk",
            "Title": "Oat milk 1 l",
            "Body (HTML)": "<p>Creamy.\nVegan.</p>",
            "Option1 Name": "Size",
            "Option1 Value": "1 l",
            "Variant SKU": "OAT-1",
            "Variant Price": "2.49",
            "Image Src": a[1],
            "Image Position": "2",
            "Status": "active",
        },
        {
            "Handle": "oat-milk",
            "Option1 Value": "6 x 1 l",
            "Variant SKU": "OAT-6",
            "Variant Price": "13.90",
            "Image Src": a[0],
            "Image Position": "1",
        },
        {"Handle": "oat-milk", "Image Src": a[2], "Image Position": "3"},
        {
            "Handle": "rye-bread",
            "Title": "Rye bread",
            "Option1 Name": "Title",
            "Option1 Value": "Default Title",
            "Variant SKU": "RYE",
            "Variant Price": "3.10",
            "Image Src": b[0],
            "Image Position": "1",
        },
        {"Handle": "rye-bread", "Image Src": "missing.jpg", "Image Position": "2"},
        {"Handle": "rye-bread", "Image Src": b[1], "Image Position": "3"},
        {
            "Handle": "jam",
            "Title": "Jam",
            "Option1 Value": "Default Title",
            "Variant SKU": "RYE",
            "Variant Price": "4.00",
            "Image Src": c[0],
            "Image Position": "1",
        },  # same SKU as rye-bread: a conflict
    ]
    feed = _write_csv(tmp_path / "products_export_1.csv", SHOPIFY, rows)
    cat = load_catalog(feed)
    assert cat.format == "shopify" and not cat.errors
    oat = {it.sku: it for it in cat.items}
    assert oat["OAT-1"].images == (a[0], a[1], a[2]) and oat["OAT-6"].price == "13.90"
    assert oat["OAT-1"].title == "Oat milk 1 l (1 l)" and oat["RYE"].title == "Rye bread"
    assert oat["RYE"].images == (b[0], "missing.jpg", b[1], c[0]) and oat["RYE"].price == "3.10"
    assert [x.sku for x in cat.conflicts["price"]] == ["RYE"]
    r = _build_and_check(feed, tmp_path, signing_key)
    assert r["items"] == 3 and [e["source"] for e in r["bad_images"]] == ["missing.jpg"]  # type: ignore[index]


def test_google_merchant_tsv_and_xml_give_the_same_items(
    tmp_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    """Google Merchant feeds (TSV and RSS with g: fields; photos over http) must read with prices in their
    currency, additional images appended and a dead link failing only its photo."""
    with PhotoServer() as srv:
        for i in range(3):
            for v in range(2):
                srv.files[f"/img/{i}_{v}.jpg"] = write_jpeg(
                    tmp_path / f"g{i}{v}.jpg", item_image(i, v)
                ).read_bytes()
        u = srv.url
        items = [
            ("G-1", "Coffee 500 g", "5.99 USD", u("/img/0_0.jpg"), [u("/img/0_1.jpg")], "A3"),
            (
                "G-2",
                "Tea 20 bags",
                "3,50 EUR",
                u("/img/1_0.jpg"),
                [u("/img/1_1.jpg"), u("/img/dead.jpg")],
                "A4",
            ),
            ("G-3", "Cocoa", "4.20 USD", u("/img/2_0.jpg"), [u("/img/2_1.jpg")], "A5"),
        ]
        tsv = _write_csv(
            tmp_path / "feed.txt",
            [
                "id",
                "title",
                "description",
                "link",
                "price",
                "availability",
                "image_link",
                "additional_image_link",
                "custom_label_0",
            ],
            [
                {
                    "id": i,
                    "title": t,
                    "price": p,
                    "availability": "in_stock",
                    "image_link": im,
                    "additional_image_link": ",".join(more),
                    "custom_label_0": loc,
                }
                for i, t, p, im, more, loc in items
            ],
            sep="\t",
        )
        entries = "".join(
            f"<item><g:id>{i}</g:id><title>{t}</title><g:price>{p}</g:price><g:image_link>{im}</g:image_link>"
            + "".join(f"<g:additional_image_link>{m}</g:additional_image_link>" for m in more)
            + f"<g:availability>in_stock</g:availability><g:custom_label_0>{loc}</g:custom_label_0></item>"
            for i, t, p, im, more, loc in items
        )
        xml = tmp_path / "feed.xml"
        xml.write_text(
            f'<?xml version="1.0"?><rss version="2.0" xmlns:g="http://base.google.com/ns/1.0">'
            f"<channel><title>Shop</title>{entries}</channel></rss>"
        )
        from_tsv = load_catalog(tsv, location_column="custom_label_0")
        from_xml = load_catalog(xml, location_column="g:custom_label_0")
        assert (from_tsv.format, from_xml.format) == ("google-merchant", "google-merchant-xml")
        assert from_tsv.items == from_xml.items
        tea = from_xml.items[1]
        assert (tea.price, tea.currency, tea.location, len(tea.images)) == ("3.50", "EUR", "A4", 3)
        assert tea.metadata()["currency"] == "EUR"
        r = _build_and_check(xml, tmp_path, signing_key, location_column="g:custom_label_0")
    assert r["items"] == 3 and r["vectors"] == 6
    assert [e["source"] for e in r["bad_images"]] == [u("/img/dead.jpg")]  # type: ignore[index]


WOO = [
    "ID",
    "Type",
    "SKU",
    "Name",
    "Published",
    "Regular price",
    "Sale price",
    "Categories",
    "Images",
    "Parent",
]


def test_woocommerce_export_builds_and_checks(tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    """A WooCommerce export (Images comma-separated; variations under a variable product) must give one
    item per sellable SKU, variations without photos taking their parent's."""
    a, b = _photos(tmp_path, 1, 3), _photos(tmp_path, 2, 2)
    rows = [
        {
            "ID": "10",
            "Type": "simple",
            "SKU": "HONEY",
            "Name": "Honey 350 g",
            "Regular price": "6.50",
            "Images": f"{a[0]}, {a[1]}, {a[2]}",
        },
        {"ID": "11", "Type": "variable", "SKU": "SOCKS", "Name": "Socks", "Images": f"{b[0]}, {b[1]}"},
        {
            "ID": "12",
            "Type": "variation",
            "SKU": "SOCKS-S",
            "Name": "Socks - S",
            "Regular price": "4.00",
            "Parent": "SOCKS",
        },
        {
            "ID": "13",
            "Type": "variation",
            "SKU": "SOCKS-L",
            "Name": "Socks - L",
            "Regular price": "4.50",
            "Images": b[1],
            "Parent": "id:11",
        },
        {
            "ID": "14",
            "Type": "simple",
            "SKU": "GHOST",
            "Name": "Ghost",
            "Regular price": "1",
            "Images": "none.jpg",
        },
    ]
    feed = _write_csv(tmp_path / "wc-product-export.csv", WOO, rows)
    cat = load_catalog(feed)
    assert cat.format == "woocommerce"
    got = {it.sku: it.images for it in cat.items}
    assert got == {"HONEY": tuple(a), "SOCKS-S": tuple(b), "SOCKS-L": (b[1],), "GHOST": ("none.jpg",)}
    r = _build_and_check(feed, tmp_path, signing_key)
    assert r["items"] == 3 and r["items_without_images"] == ["GHOST"]


def test_bad_feeds_get_one_clear_message_and_keep_the_last_snapshot(
    tmp_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    """No SKU-like column, mixed encodings, an XML entity bomb: one line naming the problem, exit 2, no
    traceback, and the snapshot already built stays as it was."""
    good = tmp_path / "good.csv"
    good.write_text("sku,title,images\nA,Apple," + ";".join(_photos(tmp_path, 1, 2)) + "\n")
    snap = tmp_path / "snap"
    build_snapshot(BuildSpec(catalog=good, store="s1", out_dir=snap, private_key=signing_key,
                             embedder=CountingEmbedder(), progress=False))
    before = {p.name: p.read_bytes() for p in snap.iterdir() if p.is_file()}
    no_sku = tmp_path / "no_sku.csv"
    no_sku.write_text("product,colour,picture\nApple,red,a.jpg\n")
    mixed = tmp_path / "mixed.csv"
    mixed.write_bytes("sku,title,images\nA,Äpple,a.jpg\n".encode() + "B,Päron,b.jpg\n".encode("cp1252"))
    bomb = tmp_path / "bomb.xml"
    bomb.write_text(
        '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        + "".join(
            f'<!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10 if i else "&lol;" * 10}">' for i in range(10)
        )
        + ']><rss xmlns:g="http://base.google.com/ns/1.0"><channel><item><g:id>&lol9;</g:id>'
        "</item></channel></rss>"
    )
    expect = {no_sku: "no SKU-like column", mixed: "line 3 has byte 0xe4", bomb: "declares XML entities"}
    key = tmp_path / "k"
    assert _cli_keys(key) == 0
    for feed, words in expect.items():
        for cmd in (
            ["check", "--catalog", str(feed)],
            [
                "build",
                "--catalog",
                str(feed),
                "--bundle",
                str(tmp_path),
                "--store",
                "s1",
                "--out",
                str(snap),
                "--key",
                str(key / "private.pem"),
            ],
        ):
            code, out = _cli(*cmd)
            assert code == 2 and words in out and "Traceback" not in out, out
            assert len(out.strip().splitlines()) == 1, out
    assert {p.name: p.read_bytes() for p in snap.iterdir() if p.is_file()} == before


def _cli_keys(out: Path) -> int:
    from cloud.cli import keys_app

    app = typer.Typer()
    app.add_typer(keys_app, name="keys")
    return runner.invoke(app, ["keys", "generate", "--out", str(out)]).exit_code


def test_a_100k_row_feed_with_one_broken_line_loses_only_that_line(tmp_path: Path) -> None:
    """An unclosed quote on one line of a 100,000-row feed must skip that row with its line number, not
    swallow the rest of the file (or fail it whole)."""
    lines = [f"S{i},Item {i},{i % 50}.90,p{i}.jpg\n" for i in range(100_000)]
    lines[50_000] = 'S50000,"Broken title,1.00,p.jpg\n'
    p = tmp_path / "big.csv"
    p.write_text("sku,title,price,images\n" + "".join(lines))
    cat = load_catalog(p)
    assert len(cat.items) == 99_999 and cat.rows == 100_000
    assert [(e.row, e.error) for e in cat.errors] == [
        (50_001, "line 50002: broken CSV record (over 200 lines): an unclosed quote?")
    ]


def test_location_column_and_json_lines(tmp_path: Path) -> None:
    """--location-column must fill the location from the named column; a missing column is named."""
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"sku": "A", "title": "Apple", "images": ["a.jpg"], "Shelf Code": "B12"}) + "\n")
    assert load_catalog(p, location_column="shelf code").items[0].location == "B12"
    q = tmp_path / "c.csv"
    q.write_text("sku,title,images,Shelf Code\nA,Apple,a.jpg,B12\n")
    assert load_catalog(q, location_column="Shelf Code").items[0].location == "B12"
    code, out = _cli("check", "--catalog", str(q), "--location-column", "Aisle")
    assert code == 2 and "no column 'Aisle' for --location-column" in out


def test_grocery_one_row_per_image_builds_the_same_snapshot(
    tmp_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    """The grocery catalog written one row per image (title, price, aisle on the first row only) must build
    the snapshot of one row per item with ';'-joined images: same items, same vectors, same index."""
    from cloud.research.grocery import write_grocery_catalog
    from tests.conftest import shared_path

    root = shared_path("data", "grocery")
    full = tmp_path / "full.jsonl"
    write_grocery_catalog(root, full, per_class=5)
    rows = [json.loads(line) for line in full.read_text().splitlines()][:12]
    joined = _write_csv(
        tmp_path / "joined.csv",
        ["sku", "title", "price", "location", "images"],
        [{**r, "images": ";".join(r["images"])} for r in rows],
    )
    per_image = [
        {**r, "images": img} if i == 0 else {"sku": r["sku"], "images": img}
        for r in rows
        for i, img in enumerate(r["images"])
    ]
    split = _write_csv(tmp_path / "per_image.csv", ["sku", "title", "price", "location", "images"], per_image)
    snaps = []
    for feed in (joined, split):
        out = tmp_path / feed.stem
        build_snapshot(BuildSpec(catalog=feed, store="s1", out_dir=out, private_key=signing_key,
                                 embedder=CountingEmbedder(), progress=False))
        files = [p for p in out.iterdir() if p.is_file() and not p.name.startswith("manifest")]
        snaps.append({p.name: p.read_bytes() for p in files})
    assert sum(len(r["images"]) for r in rows) == 60 and len(split.read_text().splitlines()) == 61
    assert snaps[0] == snaps[1] and {"items.jsonl", "vectors.jsonl", "index.bin"} <= set(snaps[0])

"""The catalog CLI: keys, build, verify (OK or a named reason, exit 2), publish; bad input is one line."""

from __future__ import annotations

from pathlib import Path

import typer
from typer.testing import CliRunner

from cloud.cli import catalog_app, keys_app
from tests.cloud.conftest import CatalogFiles, CountingEmbedder

runner = CliRunner()


def _app() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(catalog_app, name="catalog")
    app.add_typer(keys_app, name="keys")
    return app


def test_keys_generate_makes_private_0600(tmp_path: Path) -> None:
    """The private key must not be world-readable; a second generate must not overwrite it."""
    r = runner.invoke(_app(), ["keys", "generate", "--out", str(tmp_path / "k")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "k" / "private.pem").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "k" / "public.pem").is_file()
    r = runner.invoke(_app(), ["keys", "generate", "--out", str(tmp_path / "k")])
    assert r.exit_code == 2 and "refusing to overwrite" in r.output and "Traceback" not in r.output
    r = runner.invoke(_app(), ["keys", "generate", "--out", str(tmp_path / "k" / "public.pem")])  # a file
    assert r.exit_code == 2 and r.output.startswith("error: ") and r.output.count("\n") == 1, r.output


def test_verify_reports_ok_or_the_reason(catalog: CatalogFiles, tmp_path: Path) -> None:
    """verify prints OK with a summary, or REJECTED <reason> and exit 2 (directory and archive)."""
    from cloud.build import BuildSpec, build_snapshot
    from storelens import signing
    from storelens.archive import pack
    from tests.cloud.conftest import CountingEmbedder

    runner.invoke(_app(), ["keys", "generate", "--out", str(tmp_path / "k")])
    key = signing.load_private_key(tmp_path / "k" / "private.pem")
    snap = build_snapshot(BuildSpec(
        catalog=catalog.path, store="s1", out_dir=tmp_path / "snap", private_key=key,
        embedder=CountingEmbedder(), progress=False
    )).out_dir
    pack(snap, tmp_path / "snap.tar")
    pub = str(tmp_path / "k" / "public.pem")
    for target in (snap, tmp_path / "snap.tar"):
        r = runner.invoke(_app(), ["catalog", "verify", str(target), "--public-key", pub])
        assert r.exit_code == 0 and r.output.startswith("OK full snapshot v1 of s1: 12 items, 36 vectors"), (
            r.output
        )
    data = bytearray((snap / "index.bin").read_bytes())
    data[-3] ^= 0xFF
    (snap / "index.bin").write_bytes(bytes(data))
    r = runner.invoke(_app(), ["catalog", "verify", str(snap), "--public-key", pub])
    assert r.exit_code == 2 and "REJECTED hash_mismatch" in r.output
    r = runner.invoke(_app(), ["catalog", "verify", str(tmp_path / "nope"), "--public-key", pub])
    assert r.exit_code == 2 and "does not exist" in r.output and r.output.count("\n") == 1


def test_verify_refuses_unlisted_nested_files_and_symlinks(catalog: CatalogFiles, tmp_path: Path) -> None:
    """Guards: `catalog verify` saying OK for a snapshot carrying an extra ``thumbs/manifest.json`` (1 MB
    of random bytes; files named like the manifest were skipped at any depth) or a symlinked folder."""
    import os

    from cloud.build import BuildSpec, build_snapshot
    from storelens import signing
    from storelens.archive import pack

    runner.invoke(_app(), ["keys", "generate", "--out", str(tmp_path / "k")])
    key = signing.load_private_key(tmp_path / "k" / "private.pem")
    snap = build_snapshot(BuildSpec(
        catalog=catalog.path, store="s1", out_dir=tmp_path / "snap", private_key=key,
        embedder=CountingEmbedder(), progress=False
    )).out_dir
    pub = str(tmp_path / "k" / "public.pem")
    (snap / "thumbs" / "manifest.json").write_bytes(os.urandom(1 << 20))
    pack(snap, tmp_path / "snap.tar")
    for target in (snap, tmp_path / "snap.tar"):
        r = runner.invoke(_app(), ["catalog", "verify", str(target), "--public-key", pub])
        assert r.exit_code == 2 and "REJECTED unexpected_file" in r.output, (target, r.output)
        assert "thumbs/manifest.json" in r.output
    (snap / "thumbs" / "manifest.json").unlink()
    (snap / "pics").symlink_to(snap / "thumbs", target_is_directory=True)
    r = runner.invoke(_app(), ["catalog", "verify", str(snap), "--public-key", pub])
    assert r.exit_code == 2 and "REJECTED symlink" in r.output and r.output.count("\n") == 1, r.output


def test_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    """Missing catalog, bad key, bad store id: one error line, exit 2, no traceback."""
    (tmp_path / "k.pem").write_text("not a key")
    (tmp_path / "c.jsonl").write_text("")
    cases = [
        ["--catalog", str(tmp_path / "none.csv"), "--key", str(tmp_path / "k.pem"), "--store", "s1"],
        ["--catalog", str(tmp_path / "c.jsonl"), "--key", str(tmp_path / "k.pem"), "--store", "s1"],
        ["--catalog", str(tmp_path / "c.jsonl"), "--key", str(tmp_path / "k.pem"), "--store", "a/b"],
    ]
    for args in cases:
        r = runner.invoke(
            _app(), ["catalog", "build", "--bundle", str(tmp_path), "--out", str(tmp_path / "o"), *args]
        )
        assert r.exit_code == 2, r.output
        assert r.output.count("\n") == 1 and r.output.startswith("error: ") and "Traceback" not in r.output


def test_check_reports_what_a_build_would_skip_without_a_model(tmp_path: Path) -> None:
    """check: bad rows, unreadable images, items left with none, and the "no match" readiness; exit 2
    when nothing is buildable."""
    from tests.cloud.conftest import item_image, write_jpeg

    write_jpeg(tmp_path / "a1.jpg", item_image(1, 0))
    write_jpeg(tmp_path / "a2.jpg", item_image(1, 1))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    cat = tmp_path / "c.csv"
    rows = ["sku;title;price;images", "A;Apple;12,90;a1.jpg|a2.jpg", "B;Pear;cheap;a1.jpg",
            "C;Plum;1;broken.jpg|missing.jpg", "D;Apple, organic;2;a2.jpg"]  # fmt: skip
    cat.write_text("\n".join(rows) + "\n", encoding="utf-8")
    r = runner.invoke(_app(), ["catalog", "check", "--catalog", str(cat)])
    assert r.exit_code == 0, r.output
    assert "bad row 2 (B): bad price 'cheap'" in r.output
    assert "broken.jpg" in r.output and "missing.jpg" in r.output
    assert "item C: no usable image" in r.output
    assert 'never answer "no match"' in r.output  # one item with two photos
    assert "OK: 4 rows, 3 items (1 bad rows), 3 usable images (2 bad), 1 items with two or more" in r.output
    assert "items A, D share an identical photo" in r.output  # the kiosk could never tell them apart
    cat.write_text("sku,title,images\nC,Plum,broken.jpg\n", encoding="utf-8")
    r = runner.invoke(_app(), ["catalog", "check", "--catalog", str(cat), "--json"])
    assert r.exit_code == 2 and '"buildable": false' in r.output and "Traceback" not in r.output


def test_missing_or_unsigned_snapshots_are_named_before_any_work(tmp_path: Path) -> None:
    """verify/publish/eval of a path that is not a snapshot said "FileNotFoundError: ... manifest.sig" (or
    compiled the model first): name the snapshot and what it lacks, exit 2, nothing uploaded."""
    (tmp_path / "pub.pem").write_text("unused")
    unsigned = tmp_path / "unsigned"
    unsigned.mkdir()
    (unsigned / "manifest.json").write_text("{}")
    cases = {
        "snapshot {none} does not exist": ["verify", "{none}", "--public-key", "{pub}"],
        "snapshot {none} does not exist ": ["publish", "{none}", "--to", "file://{out}"],
        "{unsigned} is not a signed snapshot (no manifest.sig)": ["publish", "{unsigned}", "--to", "file://{out}"],
        "{none} is not a snapshot directory (no manifest.json)": [
            "eval", "--snapshot", "{none}", "--queries", "{pub}", "--bundle", "{out}"],
    }
    names = {"none": tmp_path / "none", "pub": tmp_path / "pub.pem", "out": tmp_path / "out",
             "unsigned": unsigned}
    for expected, args in cases.items():
        r = runner.invoke(_app(), ["catalog", *[a.format(**names) for a in args]])
        assert r.exit_code == 2, (args, r.output)
        assert r.output == f"error: {expected.strip().format(**names)}" + (
            "; `catalog build` signs what it builds with --key\n" if "signed" in expected else "\n")
    assert not (tmp_path / "out").exists()

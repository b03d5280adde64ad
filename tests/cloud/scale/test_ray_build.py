"""The Ray engine against the single-process path, on a real local Ray (2 CPUs, loopback)."""

from __future__ import annotations

import base64
import os
import signal
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.build import BuildSpec, build_snapshot
from cloud.scale.engine import ScaleSummary, build_stores
from tests.cloud.conftest import CatalogFiles, CountingEmbedder, item_image, make_catalog, write_jpeg
from tests.cloud.scale.support import FakeEmbedders

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local"), pytest.mark.timeout(180)]

WHEN = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
STORES = ("north", "south", "west")
DIM = 256


def _three_store_catalog(root: Path) -> CatalogFiles:
    """12 items over three stores (some in all), a missing photo, a corrupt one, a bad first photo."""
    cat = make_catalog(root, n_items=12, per_item=3)
    for i, row in enumerate(cat.rows):
        row["stores"] = [] if i % 4 == 0 else [STORES[i % 3], STORES[(i + 1) % 3]]
    whole = write_jpeg(root / "x.jpg", item_image(50, 0)).read_bytes()
    (root / "img" / "corrupt.jpg").write_bytes(whole[:300])
    cat.rows[1]["images"].append("img/nowhere.jpg")
    cat.rows[2]["images"].insert(0, "img/corrupt.jpg")  # its thumbnail must come from its next photo
    cat.write()
    return cat


def _files(snapshot: Path) -> dict[str, bytes]:
    out = {str(p.relative_to(snapshot)): p.read_bytes() for p in sorted(snapshot.rglob("*")) if p.is_file()}
    out["<archive>"] = snapshot.with_name(snapshot.name + ".tar").read_bytes()
    return out


def _shard_rows(cache: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(p).num_rows for p in (cache / "emb").rglob("part-*.parquet"))


def test_ray_builds_every_store_byte_for_byte_as_the_single_process_path(tmp_path: Path) -> None:
    """N stores on Ray must sign exactly the snapshots the single-process build writes, bad photos and all;
    a rerun must embed nothing (the shared cache) and still write the same snapshots. Dim 256: wide
    enough that OpenBLAS on 2 threads (this process) and 1 (Ray's tasks) fit different adapters unless
    the build pins BLAS to one thread."""
    cat = _three_store_catalog(tmp_path / "cat")
    key = Ed25519PrivateKey.generate()
    for store in STORES:
        build_snapshot(BuildSpec(catalog=cat.path, store=store, out_dir=tmp_path / "single" / store,
                                 private_key=key, embedder=CountingEmbedder(dim=DIM),
                                 created_at=WHEN, progress=False, archive=True))  # fmt: skip
    cache = tmp_path / "cache"
    summary = build_stores(cat.path, ["all"], tmp_path / "ray", key, FakeEmbedders(dim=DIM),
                           cache_uri=str(cache), created_at=WHEN, batch_size=4, progress=False,
                           archive=True)  # fmt: skip
    assert summary.stores == {s: str(tmp_path / "ray" / s) for s in STORES}
    for store in STORES:
        assert _files(tmp_path / "ray" / store) == _files(tmp_path / "single" / store), store
    assert (summary.photos, summary.embedded, summary.cache_hits) == (38, 36, 0)
    assert summary.failures == {"missing": 1, "corrupt": 1}
    assert _shard_rows(cache) == 36  # every embedded photo once in the shared cache

    again = build_stores(cat.path, list(STORES), tmp_path / "ray2", key, FakeEmbedders(dim=DIM),
                         cache_uri=str(cache), created_at=WHEN, batch_size=4, progress=False,
                         archive=True)  # fmt: skip
    assert (again.embedded, again.cache_hits, again.failures) == (0, 36, summary.failures)
    assert _shard_rows(cache) == 36  # nothing written twice
    for store in STORES:  # only the manifest's build counts (embedded vs cache hits) may differ
        a, b = _files(tmp_path / "ray2" / store), _files(tmp_path / "ray" / store)
        assert {k for k in a if a[k] != b[k]} <= {"manifest.json", "manifest.sig", "<archive>"}


def test_a_store_without_items_fails_alone(tmp_path: Path) -> None:
    """One store the catalog does not stock must be reported as that store's failure, not fail the job."""
    cat = make_catalog(tmp_path / "cat", n_items=6, per_item=2)
    for row in cat.rows:
        row["stores"] = ["north"]
    cat.write()
    key = Ed25519PrivateKey.generate()
    summary = build_stores(cat.path, ["north", "nowhere"], tmp_path / "out", key, FakeEmbedders(),
                           created_at=WHEN, progress=False)  # fmt: skip
    assert summary.stores["north"] == str(tmp_path / "out" / "north")
    assert summary.stores["nowhere"].startswith("error: catalog has no valid items for store 'nowhere'")
    assert not (tmp_path / "out" / "nowhere").exists()
    assert any("error:" in line for line in summary.lines())


def test_a_killed_worker_loses_no_finished_work(tmp_path: Path) -> None:
    """SIGKILL of an embedding worker mid-batch: the job completes, identical to the single-process path,
    and no finished batch is embedded again (each photo is in the cache exactly once)."""
    cat = make_catalog(tmp_path / "cat", n_items=10, per_item=3)
    key = Ed25519PrivateKey.generate()
    build_snapshot(BuildSpec(catalog=cat.path, store="s1", out_dir=tmp_path / "single", private_key=key,
                             embedder=CountingEmbedder(), created_at=WHEN,
                             progress=False, archive=True))  # fmt: skip
    fifo, marker = tmp_path / "pid.fifo", tmp_path / "killed"
    os.mkfifo(fifo)
    # The 6th photo an actor embeds is in its second batch of 4: its first batch is already in the cache.
    factory = FakeEmbedders(kill_at=6, marker=str(marker), fifo=str(fifo))
    cache = tmp_path / "cache"
    result: list[ScaleSummary | BaseException] = []

    def run() -> None:
        try:
            result.append(build_stores(cat.path, ["s1"], {"s1": tmp_path / "ray"}, key, factory,
                                       cache_uri=str(cache), created_at=WHEN, batch_size=4,
                                       progress=False, archive=True))  # fmt: skip
        except BaseException as exc:
            result.append(exc)

    job = threading.Thread(target=run, name="ray-build")
    job.start()
    try:
        with open(fifo) as f:  # returns once a worker has written its pid: it waits to be killed
            pid = int(f.read())
        shards_before = sorted(p.name for p in (cache / "emb").rglob("part-*.parquet"))
        os.kill(pid, signal.SIGKILL)
    finally:
        job.join(timeout=150)
    assert not job.is_alive() and marker.exists()
    summary = result[0]
    assert isinstance(summary, ScaleSummary), summary
    assert summary.stores == {"s1": str(tmp_path / "ray")} and summary.failures == {}
    assert _files(tmp_path / "ray") == _files(tmp_path / "single")
    assert shards_before and set(shards_before) <= {p.name for p in (cache / "emb").rglob("part-*.parquet")}
    assert _shard_rows(cache) == 30


def test_photos_by_url_survive_a_flaky_cdn_and_a_rebuild_downloads_none(tmp_path: Path) -> None:
    """Guards: a CDN's one-off 503 dropping a product's photo from a Ray build (the single path retries),
    and every Ray rebuild fetching every photo again (its cache is keyed by the photo's bytes)."""
    from tests.support.photo_server import PhotoServer

    cat = make_catalog(tmp_path / "cat", n_items=6, per_item=2)
    key = Ed25519PrivateKey.generate()
    with PhotoServer() as srv:
        for row in cat.rows:
            paths = [f"/{src}" for src in row["images"]]
            for path, src in zip(paths, row["images"], strict=True):
                srv.files[path] = (cat.dir / src).read_bytes()
            row["images"] = [srv.url(path) for path in paths]
        flaky = ["/img/item0_0.jpg", "/img/item3_1.jpg", "/img/item5_0.jpg"]
        srv.fail_first.update(dict.fromkeys(flaky, 1))
        cat.write()
        photos, cache = tmp_path / "photos", tmp_path / "cache"
        first = build_stores(cat.path, ["s1"], {"s1": tmp_path / "ray"}, key, FakeEmbedders(),
                             cache_uri=str(cache), download_dir=photos, created_at=WHEN, batch_size=4,
                             progress=False)  # fmt: skip
        assert first.failures == {} and (first.photos, first.embedded) == (12, 12)
        assert {p: n for p, n in srv.requests.items() if n != 1} == dict.fromkeys(flaky, 2)
        before = dict(srv.requests)
        again = build_stores(cat.path, ["s1"], {"s1": tmp_path / "ray2"}, key, FakeEmbedders(),
                             cache_uri=str(cache), download_dir=photos, created_at=WHEN, batch_size=4,
                             progress=False)  # fmt: skip
        assert (again.failures, again.embedded, again.cache_hits) == ({}, 0, 12)
        assert srv.requests == before  # nothing downloaded again


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seeded tiny model (dim 64): a real OpenVINO bundle in the actors."""
    from models.export import export_model

    out = tmp_path_factory.mktemp("tiny") / "bundle"
    export_model("tiny", out, precision="fp16")
    return out


def test_cli_ray_engine_with_a_real_model_matches_the_single_process_build(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """`catalog build --engine ray --store all` with an OpenVINO bundle on 1-CPU actors must index the same
    vectors the default engine computes with 2 streams; bad input stays one line, exit 2."""
    from typer.testing import CliRunner

    from cloud.cli import catalog_app
    from storelens import signing
    from storelens.snapshot import read_manifest_unverified

    cat = _three_store_catalog(tmp_path / "cat")
    signing.generate_keypair(tmp_path / "k.pem", tmp_path / "pub.pem")
    common = ["catalog", "build", "--catalog", str(cat.path), "--bundle", str(tiny_bundle),
              "--key", str(tmp_path / "k.pem"), "--cache", str(tmp_path / "cache")]  # fmt: skip
    app = _cli_app(catalog_app)
    ray = CliRunner().invoke(app, [*common, "--engine", "ray", "--store", "all", "--out",
                                   str(tmp_path / "r")])  # fmt: skip
    assert ray.exit_code == 0, ray.output
    assert "photos 38: embedded 36, cache hits 0, failed 2 (corrupt 1, missing 1)" in ray.output
    assert "snapshots 3 of 3 stores" in ray.output and (tmp_path / "r.ray.json").is_file()
    # The default engine as `catalog build` runs it (2 streams), without its progress bar's thread.
    build_snapshot(BuildSpec(catalog=cat.path, store="north", out_dir=tmp_path / "s",
                             private_key=signing.load_private_key(tmp_path / "k.pem"),
                             bundle=tiny_bundle, progress=False))  # fmt: skip
    a, b = read_manifest_unverified(tmp_path / "r" / "north"), read_manifest_unverified(tmp_path / "s")
    assert (a.model_id, a.vector_count, a.item_count) == (b.model_id, b.vector_count, b.item_count)
    for ca, cb in zip(a.canary, b.canary, strict=True):  # catalog vectors as the model computed them
        va, vb = (np.frombuffer(base64.b64decode(c.embedding), "<f4") for c in (ca, cb))
        assert ca.sku == cb.sku and np.allclose(va, vb, atol=1e-5), float(np.abs(va - vb).max())

    bad = CliRunner().invoke(app, [*common, "--engine", "ray", "--store", "north,a/b", "--out",
                                   str(tmp_path / "x")])  # fmt: skip
    assert bad.exit_code == 2 and bad.output.startswith("error: ") and "Traceback" not in bad.output
    bad = CliRunner().invoke(app, [*common, "--engine", "ray", "--store", "north,south", "--base",
                                   str(tmp_path / "s"), "--out", str(tmp_path / "x")])  # fmt: skip
    assert bad.exit_code == 2 and "one store at a time" in bad.output


def _cli_app(catalog_app: Any) -> Any:
    import typer

    app = typer.Typer()
    app.add_typer(catalog_app, name="catalog")
    return app

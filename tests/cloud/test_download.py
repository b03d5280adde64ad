"""http(s) photos: cached by content, retried, capped, per-host limited; a dead link fails one photo."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.build import BuildSpec, build_snapshot
from cloud.catalog import FetchError
from cloud.feeds.download import Downloader
from cloud.feeds.summary import summary_lines
from tests.cloud.conftest import CountingEmbedder, item_image
from tests.support.photo_server import PhotoServer


def _jpeg(item: int, variant: int = 0) -> bytes:
    ok, buf = cv2.imencode(".jpg", item_image(item, variant))
    assert ok
    return bytes(buf.tobytes())


def test_a_flaky_server_is_retried_and_a_dead_link_is_not(tmp_path: Path) -> None:
    """A 503 must be retried (with backoff) until the photo comes; a 404 fails at once with its reason."""
    with PhotoServer() as srv:
        srv.files["/a.jpg"] = _jpeg(1)
        srv.fail_first["/a.jpg"] = 2
        dl = Downloader(tmp_path / "images", backoff_s=0.0)
        assert dl.fetch(srv.url("/a.jpg")) == srv.files["/a.jpg"]
        assert srv.requests["/a.jpg"] == 3
        with pytest.raises(FetchError, match="HTTP 404"):
            dl.fetch(srv.url("/gone.jpg"))
        assert srv.requests["/gone.jpg"] == 1


def test_without_a_cache_photos_are_still_retried_and_fetched_each_time() -> None:
    """A Ray build without a local cache folder: the retries stay, and each fetch goes to the server."""
    with PhotoServer() as srv:
        srv.files["/a.jpg"] = _jpeg(1)
        srv.fail_first["/a.jpg"] = 1
        dl = Downloader(None, backoff_s=0.0)
        assert dl.fetch(srv.url("/a.jpg")) == srv.files["/a.jpg"] == dl.fetch(srv.url("/a.jpg"))
        assert srv.requests["/a.jpg"] == 3 and dl.downloaded == 2
        assert dl.prefetch([srv.url("/a.jpg")]) == {} and srv.requests["/a.jpg"] == 4


def test_photos_over_the_size_cap_are_refused(tmp_path: Path) -> None:
    """A photo larger than the cap must fail that photo (not be read whole into memory), without retries."""
    with PhotoServer() as srv:
        srv.files["/big.jpg"] = b"\xff" * 5000
        dl = Downloader(tmp_path / "images", max_bytes=1000, backoff_s=0.0)
        with pytest.raises(FetchError, match="larger than 1000 bytes"):
            dl.fetch(srv.url("/big.jpg"))
        assert srv.requests["/big.jpg"] == 1


def test_downloads_run_concurrently_within_the_per_host_limit(tmp_path: Path) -> None:
    """Prefetch must overlap downloads but never run more than ``per_host`` against one host."""
    with PhotoServer(hold_s=0.05) as srv:
        urls = []
        for i in range(12):
            srv.files[f"/p{i}.jpg"] = _jpeg(i)
            urls.append(srv.url(f"/p{i}.jpg"))
        dl = Downloader(tmp_path / "images", per_host=3, workers=8, backoff_s=0.0)
        assert dl.prefetch(urls) == {}
        assert srv.max_in_flight == 3
        assert dl.downloaded == 12


def test_a_rebuild_reads_downloaded_photos_from_the_cache(tmp_path: Path) -> None:
    """Photos fetched once must come from the content-addressed cache: no request the second time."""
    with PhotoServer() as srv:
        srv.files["/a.jpg"] = _jpeg(1)
        Downloader(tmp_path / "images").fetch(srv.url("/a.jpg"))
        again = Downloader(tmp_path / "images")
        assert again.fetch(srv.url("/a.jpg")) == srv.files["/a.jpg"] and again.downloaded == 0
        assert srv.requests["/a.jpg"] == 1
    assert len(list((tmp_path / "images" / "objects").rglob("*"))) == 2  # one folder, one photo


def test_a_build_with_a_dead_link_fails_that_photo_only(
    tmp_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    """A dead link must cost its photo (reason in the summary), never the build; the rest is downloaded."""
    with PhotoServer() as srv:
        rows = []
        for i in range(6):
            srv.files[f"/{i}a.jpg"] = _jpeg(i)
            srv.files[f"/{i}b.jpg"] = _jpeg(i, 1)
            images = [srv.url(f"/{i}a.jpg"), srv.url(f"/{i}b.jpg")]
            rows.append({"sku": f"S{i}", "title": f"Item {i}", "images": images})
        rows[0]["images"].append(srv.url("/dead.jpg"))
        cat = tmp_path / "c.jsonl"
        cat.write_text("".join(json.dumps(r) + "\n" for r in rows))
        res = build_snapshot(BuildSpec(catalog=cat, store="s1", out_dir=tmp_path / "snap",
                                       private_key=signing_key, embedder=CountingEmbedder(),
                                       cache_dir=tmp_path / "cache", progress=False))  # fmt: skip
    r = res.report
    assert r["items"] == 6 and r["vectors"] == 12 and r["images_downloaded"] == 12
    assert [e["source"] for e in r["bad_images"]] == [srv.url("/dead.jpg")]
    lines = summary_lines(r, images_ok=r["vectors"])
    assert any("1 photos failed: HTTP 404 Not Found" in line for line in lines), lines

"""Grocery data set end to end: real MobileNetV2 bundle, build, verify, publish to S3 + mosquitto, eval."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.build import BuildSpec, build_snapshot
from cloud.publish import publish_snapshot
from cloud.research.evaluate import evaluate
from cloud.research.grocery import write_grocery_catalog, write_grocery_queries
from storelens import protocol
from storelens.snapshot import verify_snapshot
from tests.conftest import shared_path
from tests.support.mosquitto import Mosquitto
from tests.support.moto import moto_s3

pytestmark = [pytest.mark.shared, pytest.mark.slow, pytest.mark.integration]

# The issue asks for >= 0.60; raw pooled features gave 0.527, the catalog-fitted LDA adapter lifts it.
RECALL1_FLOOR = 0.60


@pytest.fixture(scope="module")
def mnv2_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.export import export_model

    src = shared_path("models", "coral", "tf2_mobilenet_v2_1.0_224_ptq.tflite")
    out = tmp_path_factory.mktemp("mnv2") / "bundle"
    export_model(str(src), out)
    return out


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    with moto_s3() as url:
        yield url


@pytest.mark.timeout(600)
def test_grocery_build_verify_publish_eval(
    mnv2_bundle: Path, broker: Mosquitto, s3_endpoint: str, tmp_path: Path
) -> None:
    """The real catalog builds, verifies, is announced retained (read by mosquitto_sub), finds items."""
    import boto3

    from models.embedder import Embedder

    root = shared_path("data", "grocery")
    catalog, queries = tmp_path / "catalog.jsonl", tmp_path / "val.csv"
    assert write_grocery_catalog(root, catalog) == 81 + 2640
    assert write_grocery_queries(root, queries) == 296
    key = Ed25519PrivateKey.generate()
    res = build_snapshot(BuildSpec(catalog=catalog, store="store042", out_dir=tmp_path / "snap",
                                   private_key=key, bundle=mnv2_bundle, progress=False))
    assert (
        res.report["bad_images"] == [] and res.manifest.vector_count == 2721 and res.manifest.item_count == 81
    )
    with Embedder(mnv2_bundle, mode="throughput") as emb:
        m = verify_snapshot(
            res.out_dir, [key.public_key()], model_id=emb.model_id, model_dim=emb.dim, store="store042"
        )
        report = evaluate(res.out_dir, queries, emb)
    print("grocery eval", report["recall@1"], report["recall@5"])
    assert report["recall@1"] >= RECALL1_FLOOR and report["recall@5"] > report["recall@1"]
    assert report["mean_sim_correct"] is not None and report["confused"]

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="storelens")
    pub = publish_snapshot(res.out_dir, "s3://storelens/snapshots", broker.url, s3_endpoint=s3_endpoint)
    sub = shutil.which("mosquitto_sub")
    if sub is None:
        pytest.skip("mosquitto_sub is not installed")
    out = subprocess.run(
        [
            sub,
            "-h",
            "127.0.0.1",
            "-p",
            str(broker.port),
            "-t",
            protocol.snapshot_topic("store042"),
            "-C",
            "1",
            "-W",
            "5",
        ],
        capture_output=True,
        timeout=15,
        check=True,
    ).stdout
    ann = protocol.decode(out.strip(), protocol.SnapshotAnnouncement)
    assert (
        ann.version == m.version and ann.sha256 == pub.announcement.sha256 and ann.url.startswith(s3_endpoint)
    )

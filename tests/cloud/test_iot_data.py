"""Announcements through AWS IoT Core (`--broker iot://`): moto's server in CI, real AWS when configured."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from cloud.build import BuildSpec, build_snapshot
from cloud.cli import catalog_app
from cloud.iot_data import IotDataError, IotPublisher
from storelens import protocol
from tests.cloud.conftest import CountingEmbedder, make_catalog

pytestmark = pytest.mark.integration
runner = CliRunner()
STORE = "s042"


@pytest.fixture
def moto_aws() -> Iterator[str]:
    """moto in server mode on a free port; boto3 reaches it through AWS_ENDPOINT_URL (its own variable)."""
    moto_server = pytest.importorskip("moto.server")
    mp = pytest.MonkeyPatch()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in {**env, "AWS_ENDPOINT_URL": url}.items():
        mp.setenv(k, v)
    try:
        yield url
    finally:
        mp.undo()
        server.stop()


def _published() -> list[tuple[str, bytes]]:
    from moto.iotdata.models import iotdata_backends

    return list(iotdata_backends["123456789012"]["us-east-1"].published_payloads)


def _snapshot(tmp_path: Path) -> Path:
    cat = make_catalog(tmp_path / "cat", n_items=4, per_item=2)
    return build_snapshot(BuildSpec(
        catalog=cat.path, store=STORE, out_dir=tmp_path / "snap", private_key=Ed25519PrivateKey.generate(),
        embedder=CountingEmbedder(), progress=False,
    )).out_dir


def test_catalog_publish_to_s3_announces_through_iot_core(moto_aws: str, tmp_path: Path) -> None:
    """Without a store broker the announcement must still reach kiosks: S3 upload, then an IoT Core
    publish on the store's snapshot topic, both through boto3's standard configuration."""
    import boto3

    boto3.client("s3").create_bucket(Bucket="snaps")
    app = typer.Typer()
    app.add_typer(catalog_app, name="catalog")
    r = runner.invoke(app, ["catalog", "publish", str(_snapshot(tmp_path)), "--to", "s3://snaps/stores",
                            "--broker", "iot://"])  # fmt: skip
    assert r.exit_code == 0 and "announced on iot://" in r.output, r.output
    topic = protocol.snapshot_topic(STORE)
    payloads = [p for t, p in _published() if t == topic]
    assert payloads, _published()
    ann = protocol.decode(payloads[-1], protocol.SnapshotAnnouncement)
    assert ann.store == STORE and ann.url.startswith("http")  # presigned S3 URL


def test_iot_core_refusals_are_one_line(moto_aws: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No credentials, or an oversize payload, must be an IotDataError naming the cause."""
    pub = IotPublisher.from_url("iot://")
    with pytest.raises(IotDataError, match="at most"):
        pub.publish("bc/storelens/s042/snapshot", b"x" * (128 * 1024 + 1))
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(IotDataError, match="no AWS credentials"):
        IotPublisher.from_url("iot://").publish("t/x", b"{}")


@pytest.mark.aws
def test_real_iot_core_publish_when_configured() -> None:
    """The same path against real AWS IoT Core (STORELENS_TEST_AWS=1 and the standard credential chain)."""
    if os.environ.get("STORELENS_TEST_AWS") != "1":
        pytest.skip("real AWS not configured: set STORELENS_TEST_AWS=1 with credentials and a region")
    topic = f"storelens-test/{uuid.uuid4().hex[:12]}"
    IotPublisher.from_url("iot://").publish(topic, json.dumps({"test": True}).encode(), retain=False)

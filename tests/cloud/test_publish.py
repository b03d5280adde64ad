"""Publishing: upload to file:// and S3 (moto), announce retained over a real mosquitto, idempotently."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.build import BuildSpec, build_snapshot
from cloud.publish import PublishError, publish_snapshot
from storelens import protocol
from storelens.fsutil import sha256_file
from storelens.snapshot import manifest_sha256
from tests.cloud.conftest import CatalogFiles, CountingEmbedder
from tests.support.mosquitto import Mosquitto
from tests.support.moto import moto_s3

pytestmark = pytest.mark.integration


def read_retained(broker: Mosquitto, topic: str, timeout_s: float = 5.0) -> bytes:
    """Subscribe with an independent paho client and return the retained payload on ``topic``."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    got: list[bytes] = []
    done = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-reader")
    c.on_connect = lambda cl, *a: cl.subscribe(topic, qos=1)
    c.on_message = lambda cl, u, msg: (got.append(msg.payload), done.set()) if msg.retain else None
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    try:
        assert done.wait(timeout_s), f"no retained message on {topic}"
    finally:
        c.disconnect()
        c.loop_stop()
    return got[0]


@pytest.fixture
def snapshot(catalog: CatalogFiles, signing_key: Ed25519PrivateKey, tmp_path: Path) -> Path:
    return build_snapshot(BuildSpec(
        catalog=catalog.path, store="store7", out_dir=tmp_path / "snap", private_key=signing_key,
        embedder=CountingEmbedder(), progress=False
    )).out_dir


def test_file_publish_announces_retained_and_is_idempotent(
    snapshot: Path, broker: Mosquitto, tmp_path: Path
) -> None:
    """The retained announcement names the uploaded archive; publishing again changes nothing but ts."""
    to = (tmp_path / "artifacts").as_uri()
    first = publish_snapshot(snapshot, to, broker.url)
    ann = protocol.decode(
        read_retained(broker, protocol.snapshot_topic("store7")), protocol.SnapshotAnnouncement
    )
    assert ann == first.announcement
    archive = tmp_path / "artifacts" / "store7" / "v1" / "snapshot.tar"
    assert (
        ann.url == archive.as_uri()
        and ann.sha256 == sha256_file(archive)
        and ann.size == archive.stat().st_size
    )
    assert ann.manifest_sha256 == manifest_sha256(snapshot) and ann.version == 1 and ann.kind == "full"
    again = publish_snapshot(snapshot, to, broker.url)
    assert not again.uploaded and first.uploaded
    ann2 = protocol.decode(
        read_retained(broker, protocol.snapshot_topic("store7")), protocol.SnapshotAnnouncement
    )
    assert ann2.model_dump(exclude={"ts"}) == ann.model_dump(exclude={"ts"})


def test_publishing_an_older_version_is_refused(
    catalog: CatalogFiles, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """Versions per store only go up: v1 after v2, or another v2, is refused before any upload."""
    to = (tmp_path / "artifacts").as_uri()
    snaps = {
        v: build_snapshot(BuildSpec(
            catalog=catalog.path,
            store="s",
            out_dir=tmp_path / f"v{v}",
            private_key=signing_key,
            embedder=CountingEmbedder(),
            version=v,
            progress=False,
        )).out_dir
        for v in (1, 2)
    }
    publish_snapshot(snaps[2], to, None)
    with pytest.raises(PublishError, match="<= published v2"):
        publish_snapshot(snaps[1], to, None)
    other2 = build_snapshot(BuildSpec(
        catalog=catalog.path,
        store="s",
        out_dir=tmp_path / "o2",
        private_key=signing_key,
        embedder=CountingEmbedder(),
        version=2,
        progress=False,
    )).out_dir
    with pytest.raises(PublishError):
        publish_snapshot(other2, to, None)
    assert not (tmp_path / "artifacts" / "s" / "v1").exists()


def test_unreachable_broker_is_a_publish_error(snapshot: Path, tmp_path: Path) -> None:
    """A broker that is not there fails with PublishError, not a hang or a traceback."""
    from tests.support.mosquitto import free_port

    with pytest.raises(PublishError, match="cannot reach broker"):
        publish_snapshot(snapshot, (tmp_path / "a").as_uri(), f"mqtt://127.0.0.1:{free_port()}")


@pytest.fixture
def s3_server() -> Iterator[str]:
    """A moto S3 server on a free loopback port, with fake credentials in the environment."""
    with moto_s3() as url:
        yield url


def test_s3_publish_presigned_url_downloads_the_archive(
    snapshot: Path, broker: Mosquitto, s3_server: str, tmp_path: Path
) -> None:
    """S3 upload via the configured endpoint; the announced presigned URL serves the exact archive."""
    import urllib.request

    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="snaps")
    first = publish_snapshot(snapshot, "s3://snaps/stores", broker.url, s3_endpoint=s3_server)
    ann = protocol.decode(
        read_retained(broker, protocol.snapshot_topic("store7")), protocol.SnapshotAnnouncement
    )
    assert "X-Amz-Expires=604800" in ann.url and ann.url.startswith(s3_server)
    with urllib.request.urlopen(ann.url, timeout=10) as resp:
        body = resp.read()
    import hashlib

    assert hashlib.sha256(body).hexdigest() == ann.sha256 and len(body) == ann.size
    again = publish_snapshot(snapshot, "s3://snaps/stores", broker.url, s3_endpoint=s3_server)
    assert first.uploaded and not again.uploaded
    assert again.announcement.model_dump(exclude={"ts"}) == first.announcement.model_dump(exclude={"ts"})


def test_delta_announcement_names_the_newest_full_snapshot(
    catalog: CatalogFiles, signing_key: Ed25519PrivateKey, broker: Mosquitto, tmp_path: Path
) -> None:
    """A kiosk that missed a delta's base needs somewhere to go: a delta's announcement carries the newest
    full snapshot (its archive's sha256 and a URL that serves it); a full one carries no such pointer."""
    to = (tmp_path / "artifacts").as_uri()
    v1 = build_snapshot(BuildSpec(catalog=catalog.path, store="store7", out_dir=tmp_path / "v1",
                                  private_key=signing_key, embedder=CountingEmbedder(),
                                  progress=False)).out_dir  # fmt: skip
    first = publish_snapshot(v1, to, broker.url)
    assert first.announcement.kind == "full" and first.announcement.full is None
    catalog.rows[0]["title"] = "renamed"
    catalog.write()
    v2 = build_snapshot(BuildSpec(catalog=catalog.path, store="store7", out_dir=tmp_path / "v2",
                                  private_key=signing_key, embedder=CountingEmbedder(),
                                  base=v1, progress=False)).out_dir  # fmt: skip
    second = publish_snapshot(v2, to, broker.url)
    ann = protocol.decode(
        read_retained(broker, protocol.snapshot_topic("store7")), protocol.SnapshotAnnouncement
    )
    assert ann.kind == "delta" and ann.base_version == 1 and ann == second.announcement
    assert ann.full is not None
    assert (ann.full.version, ann.full.sha256, ann.full.manifest_sha256) == (
        1, first.announcement.sha256, manifest_sha256(v1))
    served = Path(ann.full.url.removeprefix("file://"))
    assert sha256_file(served) == ann.full.sha256

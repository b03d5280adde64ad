"""The feedback store under an S3 prefix (moto in server mode): the same records, decisions and crops as a
folder, read by the collector, the build and review alike; a missing bucket or a corrupt crop is named."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.dashboard.staff import StaffUsers, add_user
from cloud.feedback.collector import BrokerConfig, FeedbackCollector
from cloud.feedback.store import (
    CorruptCrop,
    FeedbackStore,
    FeedbackStoreError,
    open_feedback_store,
    record_id_of,
)
from cloud.feedback.verify import KnownSnapshots
from storelens.feedback import decode_vector, feedback_topic
from tests.cloud.conftest import CountingEmbedder, embedder, make_catalog, signing_key
from tests.deploy.mqtt_peer import Peer
from tests.feedback.conftest import STORE, feedback, jpeg
from tests.feedback.test_collector_cli import CollectorProcess
from tests.feedback.test_relearn import _build, _put, _store_rows
from tests.support.mosquitto import Mosquitto
from tests.support.moto import moto_s3

__all__ = ["embedder", "signing_key"]  # fixtures, imported for pytest

pytestmark = pytest.mark.integration

PREFIX = "stores/s1"


@dataclass(frozen=True)
class Bucket:
    client: Any  # boto3's S3 client on moto
    name: str

    @property
    def where(self) -> str:
        return f"s3://{self.name}/{PREFIX}"

    def keys(self, folder: str) -> list[str]:
        listed = self.client.list_objects_v2(Bucket=self.name, Prefix=f"{PREFIX}/{folder}/")
        return [o["Key"] for o in listed.get("Contents", [])]


@pytest.fixture
def s3() -> Iterator[Bucket]:
    """moto on loopback, reached through boto3's own AWS_ENDPOINT_URL_S3, with a bucket of this test's
    own (moto's objects outlive one server in the same process)."""
    with moto_s3(endpoint_env=True) as url:
        client = boto3.client("s3", endpoint_url=url)
        name = f"feedback-{uuid.uuid4().hex[:12]}"
        client.create_bucket(Bucket=name)
        yield Bucket(client, name)


@pytest.fixture(params=["folder", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same store as a folder and as an S3 prefix: every test here must pass on both."""
    if request.param == "folder":
        return str(tmp_path / "fb")
    bucket: Bucket = request.getfixturevalue("s3")
    return bucket.where


def test_records_decisions_and_crops_read_back_the_same(location: str, tmp_path: Path) -> None:
    """A stored message reads back whole (crop bytes, vector, ids), a replay is not stored twice, and the
    last decision wins and is reversible: from the store that wrote it and from a fresh one (what a
    dashboard or build on another machine opens), whose crop cache starts empty."""
    fs = open_feedback_store(location, create=True, cache_dir=tmp_path / "cache1")
    a, b = feedback("kA", 1), feedback("kB", 2, answer="not_here", chosen_sku=None)
    rid_a, new_a = fs.put(a)
    rid_b, _ = fs.put(b)
    assert new_a and fs.put(a) == (rid_a, False)
    fs.decide(rid_a, "approved", who="anna")
    fs.decide(rid_a, "reassigned", who="ben", sku="SKU-9")
    fs.decide(rid_b, "not_carried", who="anna")
    fs.decide(rid_b, "pending", who="ben")  # undone
    fresh = open_feedback_store(location, cache_dir=tmp_path / "cache2")
    for store in (fs, fresh):
        recs = {r.record_id: r for r in store.records(STORE)}
        assert set(recs) == {rid_a, rid_b}
        got = recs[rid_a]
        assert (got.status, got.label_sku, got.decided_by) == ("approved", "SKU-9", "ben")
        assert recs[rid_b].status == "pending" and recs[rid_b].answer == "not_here"
        assert [e.decision for e in store.history(rid_a)] == ["approved", "reassigned"]
        assert store.crop_path(rid_a).read_bytes() == jpeg(1)
        assert store.crop_path(rid_b).read_bytes() == jpeg(2)
        want = decode_vector(a.vector, a.dim)
        np.testing.assert_array_equal(store.vector(rid_a), want)
        assert [r.record_id for r in store.approved(STORE)] == [rid_a]


def test_the_collector_stores_into_s3_before_it_acknowledges(
    s3: Bucket, broker: Mosquitto, publisher: Peer, snapshots: Path, tmp_path: Path
) -> None:
    """`feedback collect --feedback-dir s3://...`: messages from kiosks land as objects in the bucket
    (records and content-addressed crops), a replay adds nothing."""
    fs = open_feedback_store(s3.where, create=True, cache_dir=tmp_path / "cache")
    cfg = BrokerConfig(url=broker.url, client_id=f"t-coll-{uuid.uuid4().hex[:8]}")
    c = FeedbackCollector(STORE, cfg, fs, KnownSnapshots(STORE, snapshots_dir=snapshots))
    c.start()
    try:
        msgs = [feedback("kA", 1), feedback("kA", 2)]
        for m in [*msgs, msgs[0]]:
            assert publisher.publish(feedback_topic(STORE, m.kiosk), m.to_bytes()).value < 128
        assert c.wait_handled(3, 10.0), c.stats()
        assert (c.stats()["stored"], c.stats()["duplicate"]) == (2, 1), c.stats()
    finally:
        c.stop()
    assert len(s3.keys("records")) == 2 and len(s3.keys("crops")) == 2


def test_the_collect_command_writes_to_s3_and_stops_cleanly(
    s3: Bucket, broker: Mosquitto, publisher: Peer, snapshots: Path
) -> None:
    """The README's `storelens feedback collect --feedback-dir s3://BUCKET/PREFIX` as a process, with the
    endpoint from boto3's own AWS_ENDPOINT_URL_S3: a kiosk's message is stored in the bucket, said so by
    record id, and SIGTERM ends it with exit 0 and its summary."""
    msg = feedback("kA", 1)
    proc = CollectorProcess(["--store", STORE, "--feedback-dir", s3.where, "--broker", broker.url,
                             "--snapshots", str(snapshots), "--client-id", f"t-cli-{uuid.uuid4().hex[:8]}"])
    try:
        assert s3.where in proc.wait_line("collecting feedback")
        assert publisher.publish(feedback_topic(STORE, "kA"), msg.to_bytes()).value < 128
        rid = record_id_of(STORE, "kA", msg.id)
        assert "stored" in proc.wait_line(rid)
    finally:
        rc = proc.finish(signal.SIGTERM)
    assert rc == 0, "\n".join(proc.seen)
    assert "stored 1" in proc.wait_line("feedback collector stopped")
    assert s3.keys("records") == [f"{PREFIX}/records/{rid}.json"]


def test_the_build_adds_approved_photos_from_s3_and_skips_a_corrupt_crop(
    s3: Bucket, embedder: CountingEmbedder, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """`catalog build --feedback s3://...` adds the approved store photos as it does from a folder; a crop
    whose bytes no longer match its sha256 is skipped by name and counted, never embedded."""
    cat = make_catalog(tmp_path / "cat", n_items=8, per_item=1)
    fs = open_feedback_store(s3.where, create=True, cache_dir=tmp_path / "writer-cache")
    ok = [_put(fs, embedder, i, 5, store="s") for i in range(4)]
    bad = _put(fs, embedder, 5, 5, store="s")
    for rid in [*ok, bad]:
        fs.decide(rid, "approved", who="staff")
    sha = fs.get(bad).crop_sha256
    s3.client.put_object(Bucket=s3.name, Key=f"{PREFIX}/crops/{sha}.jpg", Body=jpeg(7))
    with pytest.raises(CorruptCrop, match="does not match its sha256"):
        open_feedback_store(s3.where, cache_dir=tmp_path / "other").crop_path(bad)
    res = _build(cat, embedder, signing_key, tmp_path / "v1", feedback=s3.where)
    assert sorted(str(r["record"]) for r in _store_rows(res.out_dir)) == sorted(ok)
    assert res.report["feedback"]["skipped_missing_crop"] == 1


def test_a_missing_bucket_is_one_clear_line(s3: Bucket, tmp_path: Path) -> None:
    """A mistyped bucket must fail by name (the store, the dashboard, the CLI), not with a botocore
    traceback, and must not be taken for an empty store (a build would delete every store photo)."""
    import typer
    from typer.testing import CliRunner

    from cloud.cli import feedback_app
    from cloud.dashboard.serve import DashboardError, DashboardServer, PageConfig
    from cloud.feedback.cli import register

    with pytest.raises(FeedbackStoreError, match=r"s3://nope/x: cannot reach the bucket"):
        open_feedback_store("s3://nope/x")
    with pytest.raises(FeedbackStoreError, match="a folder or s3://"):
        open_feedback_store("gs://bucket/x")
    with pytest.raises(DashboardError, match="cannot reach the bucket"):
        DashboardServer("127.0.0.1", 0, PageConfig(broker_ws_url="ws://x", store="s1"),
                        snapshots_dir=tmp_path, feedback_dir="s3://nope/x",
                        staff=_staff(tmp_path))  # fmt: skip
    app = typer.Typer()
    register(feedback_app)
    app.add_typer(feedback_app, name="feedback")
    r = CliRunner().invoke(app, ["feedback", "auto-review", "--store", "s1", "--feedback-dir", "s3://nope/x",
                                 "--snapshot", str(tmp_path)])  # fmt: skip
    assert r.exit_code == 2 and "cannot reach the bucket" in r.output, r.output
    assert "Traceback" not in r.output


def _staff(tmp_path: Path) -> StaffUsers:
    add_user(tmp_path / "staff.json", "anna", "a long enough password")
    return StaffUsers(tmp_path / "staff.json")


def test_a_folder_store_still_refuses_a_missing_folder(tmp_path: Path) -> None:
    """Readers never create a mistyped folder (only the collector does, with create=True)."""
    with pytest.raises(FeedbackStoreError, match="does not exist"):
        open_feedback_store(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()
    assert isinstance(open_feedback_store(tmp_path / "new", create=True), FeedbackStore)

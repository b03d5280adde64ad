"""The scheduled relearn (`feedback relearn` as deploy/systemd/storelens-relearn.* run it): builds the next
snapshot only when an approved photo, the catalog or the bundle changed, publishes and announces it; the
collector's request file that starts it."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import cv2
import pytest
import typer
from typer.testing import CliRunner

from cloud.build import BuildSpec, build_snapshot
from cloud.cli import feedback_app
from cloud.delta import VECTORS, read_rows
from cloud.feedback.cli import register
from cloud.feedback.collector import BrokerConfig, FeedbackCollector
from cloud.feedback.store import FeedbackStore, open_feedback_store
from cloud.feedback.trigger import RelearnRequest
from cloud.feedback.verify import KnownSnapshots
from models.embedder import Embedder
from storelens import protocol, signing
from storelens.feedback import feedback_topic, make_feedback
from tests.cloud.conftest import item_image, make_catalog
from tests.cloud.test_publish import read_retained
from tests.deploy.mqtt_peer import Peer
from tests.feedback.conftest import STORE, feedback
from tests.models.conftest import tiny_bundle
from tests.support.mosquitto import Mosquitto, free_port

__all__ = ["tiny_bundle"]  # a fixture, imported for pytest

pytestmark = pytest.mark.integration

runner = CliRunner()


def _app() -> typer.Typer:
    register(feedback_app)
    app = typer.Typer()
    app.add_typer(feedback_app, name="feedback")
    return app


def _confirm(fb: FeedbackStore, emb: Embedder, item: int) -> str:
    """A kiosk's confirmation of item ``item`` (a store-like photo of it), embedded by the store's bundle."""
    ok, buf = cv2.imencode(".jpg", item_image(item, 6), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    msg = make_feedback(store="s", kiosk="k1", match_id=f"m{item}", answer="confirmed",
                        chosen_sku=f"SKU-{item:03d}", shown=[], model=emb.model_id, snapshot=1,
                        vector=emb.embed([cv2.imdecode(buf, cv2.IMREAD_COLOR)])[0], crop_jpeg=buf.tobytes(),
                        id=f"s-{item}")  # fmt: skip
    return fb.put(msg)[0]


def test_relearn_builds_publishes_and_announces_only_what_changed(
    tiny_bundle: Path, broker: Mosquitto, tmp_path: Path
) -> None:
    """The timer runs this nightly and the collector's requests run it more: it must make a snapshot when
    staff approved something new (published, announced retained for the kiosks) and none when nothing the
    build reads changed, or every run would push a new version to every kiosk; a snapshot whose
    announcement failed (broker down) must still reach the kiosks on the next run."""
    cat = make_catalog(tmp_path / "cat", n_items=8, per_item=1)
    signing.generate_keypair(tmp_path / "k" / "private.pem", tmp_path / "k" / "public.pem")
    key = tmp_path / "k" / "private.pem"
    snaps = tmp_path / "snapshots"
    build_snapshot(BuildSpec(catalog=cat.path, store="s", out_dir=snaps / "v1", private_key=signing
                             .load_private_key(key), bundle=tiny_bundle, progress=False))  # fmt: skip
    fb = FeedbackStore(tmp_path / "fb")
    with Embedder(tiny_bundle) as emb:
        rids = [_confirm(fb, emb, i) for i in range(3)]
    for rid in rids[:2]:
        fb.decide(rid, "approved", who="anna")
    pub = tmp_path / "published"
    args = ["feedback", "relearn", "--store", "s", "--feedback-dir", str(tmp_path / "fb"), "--catalog",
            str(cat.path), "--bundle", str(tiny_bundle), "--snapshots", str(snaps), "--key", str(key),
            "--auto-review", "--publish-to", pub.as_uri()]  # fmt: skip

    # The broker is down for the first run: the snapshot is built, its announcement fails loudly...
    r = runner.invoke(_app(), [*args, "--broker", f"mqtt://127.0.0.1:{free_port()}"])
    assert r.exit_code == 2 and "cannot reach broker" in r.output, r.output
    auto = sum(fb.get(rid).decided_by == "auto:knn" for rid in rids)
    assert f"auto-approved {auto}" in r.output and "snapshot v2 of s" in r.output, r.output
    assert f"{2 + auto} store photos" in r.output, r.output
    rows = read_rows(snaps / "v2" / VECTORS)
    stored = sorted(str(row["record"]) for row in rows if row.get("source") == "store")
    assert stored == sorted(rid for rid in rids if fb.get(rid).status == "approved")
    assert json.loads((snaps / "v2.report.json").read_text())["inputs_digest"]

    # ...and the next run, with nothing new to build, announces it: the kiosks still get v2.
    args += ["--broker", broker.url]
    r = runner.invoke(_app(), args)
    assert r.exit_code == 0 and "nothing new for s" in r.output and "OK published s v2" in r.output, r.output
    assert not (snaps / "v3").exists() and not (pub / "s" / "v3").exists()
    ann = protocol.decode(read_retained(broker, protocol.snapshot_topic("s")), protocol.SnapshotAnnouncement)
    assert ann.version == 2 and (pub / "s" / "v2").is_dir()

    if fb.get(rids[2]).status != "approved":
        fb.decide(rids[2], "approved", who="anna")
    else:  # auto-review took it: a staff rejection is the change instead
        fb.decide(rids[2], "rejected", who="anna")
    r = runner.invoke(_app(), args)
    assert r.exit_code == 0 and "snapshot v3 of s" in r.output and "OK published s v3" in r.output, r.output
    ann = protocol.decode(read_retained(broker, protocol.snapshot_topic("s")), protocol.SnapshotAnnouncement)
    assert ann.version == 3


def test_relearn_refuses_bad_input_in_one_line(tiny_bundle: Path, tmp_path: Path) -> None:
    """A missing snapshots folder, --auto-review with no snapshot to review against, or --broker without
    --publish-to: one `error:` line, exit 2, nothing written."""
    cat = make_catalog(tmp_path / "cat", n_items=4, per_item=1)
    signing.generate_keypair(tmp_path / "private.pem", tmp_path / "public.pem")
    (tmp_path / "fb").mkdir()
    (tmp_path / "snaps").mkdir()
    base = ["feedback", "relearn", "--store", "s", "--feedback-dir", str(tmp_path / "fb"), "--catalog",
            str(cat.path), "--bundle", str(tiny_bundle), "--key", str(tmp_path / "private.pem")]  # fmt: skip
    cases = [
        (["--snapshots", str(tmp_path / "nope")], "does not exist"),
        (["--snapshots", str(tmp_path / "snaps"), "--auto-review"], "needs a full snapshot"),
        (["--snapshots", str(tmp_path / "snaps"), "--broker", "mqtt://127.0.0.1:1"], "give --publish-to"),
    ]
    for extra, needle in cases:
        r = runner.invoke(_app(), [*base, *extra])
        assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, r.output
    assert list((tmp_path / "snaps").iterdir()) == []


def test_the_collector_requests_a_relearn_every_n_new_records(
    broker: Mosquitto, publisher: Peer, snapshots: Path, tmp_path: Path
) -> None:
    """`feedback collect --relearn-request FILE --relearn-after 2`: the file the path unit watches is
    rewritten after every second newly stored record; a replay (not a new record) does not count."""
    request = tmp_path / "relearn.request"
    hook = RelearnRequest(request, 2)
    cfg = BrokerConfig(url=broker.url, client_id=f"t-coll-{uuid.uuid4().hex[:8]}")
    c = FeedbackCollector(STORE, cfg, open_feedback_store(tmp_path / "fb", create=True),
                          KnownSnapshots(STORE, snapshots_dir=snapshots), on_stored=hook)  # fmt: skip
    c.start()
    try:
        first = feedback("kA", 1)
        for m in (first, first):
            assert publisher.publish(feedback_topic(STORE, "kA"), m.to_bytes()).value < 128
        assert c.wait_handled(2, 10.0), c.stats()
        assert not request.exists()  # one new record, one duplicate
        for seed in (2, 3, 4):
            assert publisher.publish(feedback_topic(STORE, "kA"), feedback("kA", seed).to_bytes()).value < 128
        assert c.wait_handled(5, 10.0), c.stats()
    finally:
        c.stop()
    body = json.loads(request.read_text())
    assert (hook.requests, body["stored_since_start"], body["store"]) == (2, 4, STORE)
    with pytest.raises(ValueError, match="1 or more"):
        RelearnRequest(request, 0)

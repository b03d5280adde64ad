"""`storelens feedback release`: enough approved store photos -> a tuned bundle and its snapshot (with the
store photos) as one signed release that a kiosk's updater applies; too few -> nothing tuned, and why."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import typer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from cloud.delta import VECTORS, read_rows
from cloud.feedback import relearn_cli
from cloud.feedback.release import (
    TUNED_DIR,
    TUNING_CATALOG,
    Threshold,
    TuningSet,
    release_relearned_model,
)
from cloud.feedback.store import FeedbackStore
from models.bundle import read_manifest, verify_bundle
from storelens.archive import unpack
from storelens.feedback import make_feedback
from storelens.release import verify_release
from storelens.snapshot import SnapshotRejected, verify_snapshot
from tests.fleet.helpers import export_tiny, item_image, make_catalog, make_release
from tests.support.mosquitto import Mosquitto

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

STORE = "s1"
SEQUENCE = 20
RELEASE = "relearn20"
# the tiny net has 3 convolutions; 2 of them tuned for 1 epoch keeps the tune to a few seconds
TUNE_ARGS = ["--tune-convs", "2", "--epochs", "1"]


@dataclass
class World:
    root: Path
    key: Ed25519PrivateKey
    key_file: Path
    catalog: Path
    base: Path
    base_id: str


def _approve(fb: FeedbackStore, model: str, item: int, variant: int, *, approve: bool = True) -> str:
    """A kiosk's confirmed crop of ``item`` stored in ``fb``, then approved by staff (or left pending)."""
    ok, buf = cv2.imencode(".jpg", item_image(item, variant), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    msg = make_feedback(
        store=STORE, kiosk="k1", match_id=f"m{item}x{variant}", answer="confirmed",
        chosen_sku=f"SKU-{item:03d}", shown=[f"SKU-{item:03d}"], model=model, snapshot=10,
        vector=np.ones(64, np.float32), crop_jpeg=buf.tobytes(), id=f"{item}-{variant}",
    )  # fmt: skip
    rid = fb.put(msg)[0]
    if approve:
        fb.decide(rid, "approved", who="staff")
    return rid


def _feedback(root: Path, base_id: str, products: int, photos: int) -> tuple[Path, set[str]]:
    """A feedback store with ``photos`` approved crops of each of ``products`` items, and one pending."""
    fb = FeedbackStore(root)
    ids = {_approve(fb, base_id, i, 10 + v) for i in range(products) for v in range(photos)}
    _approve(fb, base_id, products, 10, approve=False)
    return root, ids


def _app() -> typer.Typer:
    app = typer.Typer()
    relearn_cli.register(app)
    return app


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("model-release")
    key = Ed25519PrivateKey.generate()
    key_file = root / "private.pem"
    pem = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    key_file.write_bytes(key.private_bytes(*pem))
    catalog = make_catalog(root / "cat", [STORE])
    base = export_tiny(root / "base", seed=0)
    return World(root, key, key_file, catalog, base, verify_bundle(base).model_id)


@dataclass
class Released:
    output: str
    work: Path
    artifacts: Path
    feedback: Path
    approved: set[str]


@pytest.fixture(scope="module")
def released(world: World) -> Released:
    """`feedback release` run once: 4 products with 2 approved photos each, threshold 3 x 2."""
    fb, approved = _feedback(world.root / "fb", world.base_id, products=4, photos=2)
    work, artifacts = world.root / "work", world.root / "artifacts"
    args = ["release", "--store", STORE, "--feedback-dir", str(fb), "--catalog", str(world.catalog),
            "--bundle", str(world.base), "--key", str(world.key_file), "--work", str(work),
            "--to", artifacts.as_uri(), "--min-products", "3", "--min-photos", "2",
            "--sequence", str(SEQUENCE), "--id", RELEASE, "--cache-dir", str(world.root / "cache"),
            *TUNE_ARGS]  # fmt: skip
    r = CliRunner().invoke(_app(), args)
    assert r.exit_code == 0, r.output
    return Released(r.output, work, artifacts, fb, approved)


def test_release_ships_the_tuned_model_with_a_snapshot_of_the_store_photos(
    world: World, released: Released, tmp_path: Path
) -> None:
    """The release must name a NEW model (tuned from the base on the store-photo catalog) and carry a
    snapshot built with it whose rows include every approved store photo, marked as such; the command
    says what to run next."""
    rel_dir = released.artifacts / "releases" / RELEASE
    m = verify_release((rel_dir / "release.json").read_bytes(), (rel_dir / "release.sig").read_bytes(),
                       [world.key.public_key()])  # fmt: skip
    tuned = read_manifest(released.work / TUNED_DIR)
    assert m.bundle.model_id == tuned.model_id != world.base_id
    assert list(m.stores) == [STORE] and m.sequence == SEQUENCE
    catalog = released.work / TUNING_CATALOG
    info = tuned.extra["tuned"]
    assert info["base_model_id"] == world.base_id
    assert info["catalog_id"] == hashlib.sha256(catalog.read_bytes()).hexdigest()[:16]
    listed = {img for line in catalog.read_text().splitlines() for img in json.loads(line)["images"]}
    fb = FeedbackStore(released.feedback)
    assert {str(fb.crop_path(rid).resolve()) for rid in released.approved} <= listed
    snap = tmp_path / "snap"
    unpack(rel_dir / "snapshots" / STORE / "snapshot.tar", snap, max_total_bytes=1 << 30)
    sm = verify_snapshot(snap, [world.key.public_key()], model_id=tuned.model_id, store=STORE)
    assert sm.version == SEQUENCE
    with pytest.raises(SnapshotRejected):  # the pairing rule: not with the model the kiosks ran before
        verify_snapshot(snap, [world.key.public_key()], model_id=world.base_id, store=STORE)
    rows = read_rows(snap / VECTORS)
    assert {r["record"] for r in rows if r.get("source") == "store"} == released.approved
    assert any(r["source"] == "catalog" for r in rows)
    url = (rel_dir / "release.json").as_uri()
    assert f"next: storelens fleet rollout {url} --stores {STORE}" in released.output


def test_too_few_approved_photos_tunes_nothing_and_says_why(world: World, tmp_path: Path) -> None:
    """Below the threshold no tuner may run and no release be written; the reason names the counts."""
    fb, _ = _feedback(tmp_path / "fb", world.base_id, products=2, photos=2)
    calls: list[TuningSet] = []

    def tuner(data: TuningSet, base: Path, out: Path) -> Path:
        calls.append(data)
        return out

    r = release_relearned_model(
        STORE, fb, world.catalog, world.base, world.key, (tmp_path / "pub").as_uri(), tmp_path / "work",
        threshold=Threshold(min_products=3, min_photos=2), tune=tuner,
    )  # fmt: skip
    assert r.published is None and not r.readiness.ready and calls == []
    assert r.readiness.photos_per_product == {"SKU-000": 2, "SKU-001": 2}
    assert "2 of the 3 products needed have >= 2 approved" in r.readiness.describe()
    assert not (tmp_path / "pub").exists() and not (tmp_path / "work").exists()
    args = ["release", "--store", STORE, "--feedback-dir", str(fb), "--catalog", str(world.catalog),
            "--bundle", str(world.base), "--key", str(world.key_file), "--work", str(tmp_path / "work"),
            "--to", (tmp_path / "pub").as_uri(), "--min-products", "3", "--min-photos", "2"]  # fmt: skip
    res = CliRunner().invoke(_app(), args)
    assert res.exit_code == 0, res.output
    assert res.output.startswith("not yet: 2 of the 3 products") and "nothing tuned" in res.output
    assert not (tmp_path / "pub").exists()


def test_bad_input_is_one_line_and_exit_2(world: World, tmp_path: Path) -> None:
    """A missing feedback folder, a zero threshold or a missing bundle: one error line, no traceback."""
    fb, _ = _feedback(tmp_path / "fb", world.base_id, products=1, photos=1)
    base = ["release", "--store", STORE, "--catalog", str(world.catalog), "--key", str(world.key_file),
            "--work", str(tmp_path / "work"), "--to", (tmp_path / "pub").as_uri()]  # fmt: skip
    cases = [
        (["--feedback-dir", str(tmp_path / "nope"), "--bundle", str(world.base)], "does not exist"),
        (["--feedback-dir", str(fb), "--bundle", str(world.base), "--min-photos", "0"], "at least 1"),
        (["--feedback-dir", str(fb), "--bundle", str(tmp_path / "nobundle")], "base bundle"),
    ]
    for extra, said in cases:
        res = CliRunner().invoke(_app(), [*base, *extra])
        assert res.exit_code == 2, res.output
        assert said in res.output and "Traceback" not in res.output, res.output


@pytest.mark.integration
def test_a_kiosk_applies_the_relearned_release_and_serves_the_tuned_model(
    world: World, released: Released, broker: Mosquitto, tmp_path: Path
) -> None:
    """The release must pass a real kiosk updater's checks (signature, pairing, canaries, probation) and
    leave it serving the tuned model, from the base release it ran before."""
    from device.sync import Sources
    from tests.fleet.helpers import desired
    from tests.fleet.standin import StandInKiosk

    base_rel = make_release(world.root, world.base, world.catalog, [STORE], world.key, sequence=10)
    new_rel = _published(released)
    kiosk = StandInKiosk(tmp_path / "k1", STORE, "k1", broker.url, world.key.public_key(),
                         sources=Sources([world.root.as_uri() + "/"]))  # fmt: skip
    kiosk.start()
    try:
        kiosk.updater.submit(desired(base_rel, STORE, "k1", probation_s=0.0))
        assert _wait(lambda: kiosk.model_id == world.base_id and kiosk.updater.idle.is_set())
        kiosk.updater.submit(desired(new_rel, STORE, "k1", probation_s=0.2))
        tuned_id = new_rel.manifest.bundle.model_id
        assert _wait(lambda: kiosk.model_id == tuned_id and kiosk.updater.idle.is_set())
        assert kiosk.switches[-1] == tuned_id and kiosk.errors == 0
    finally:
        kiosk.stop()


def _published(released: Released) -> object:
    """The release as `fleet rollout` reads it (manifest, url, sig_url)."""
    from cloud.fleet.release import PublishedRelease
    from storelens.release import ReleaseManifest

    rel_dir = released.artifacts / "releases" / RELEASE
    m = ReleaseManifest.model_validate_json((rel_dir / "release.json").read_bytes())
    return PublishedRelease(m, (rel_dir / "release.json").as_uri(), (rel_dir / "release.sig").as_uri(), 0.0)


def _wait(pred: object, timeout_s: float = 90.0) -> bool:
    ev = threading.Event()
    for _ in range(int(timeout_s / 0.05)):
        if pred():  # type: ignore[operator]
            return True
        ev.wait(0.05)
    return bool(pred())  # type: ignore[operator]


def test_the_release_command_tunes_as_many_convolutions_as_the_relearn() -> None:
    """`feedback release --tune-convs` defaults to a literal (the CLI module stays free of numpy): it must
    be the relearn's own choice, or the release would tune another model than the one measured."""
    import inspect

    from cloud.feedback.relearn_cli import release_cmd
    from cloud.feedback.relearn_model import RELEARN_TUNE_CONVS, relearn_bundle
    from cloud.feedback.release import CatalogTuner

    assert inspect.signature(release_cmd).parameters["tune_convs"].default == RELEARN_TUNE_CONVS
    assert inspect.signature(relearn_bundle).parameters["convs"].default == RELEARN_TUNE_CONVS
    assert CatalogTuner().convs == RELEARN_TUNE_CONVS

"""`fleet release|status|rollout` commands and the signed release contract."""

from __future__ import annotations

import json
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import typer
from cryptography.hazmat.primitives import serialization
from paho.mqtt.enums import CallbackAPIVersion
from typer.testing import CliRunner

from cloud.fleet.cli import register
from models.bundle import verify_bundle
from storelens.archive import unpack
from storelens.protocol import KioskState, Status, Topics, UpdateProgress
from storelens.release import ReleaseRejected, verify_release
from storelens.snapshot import verify_snapshot
from tests.fleet.conftest import STORES, Releases
from tests.fleet.helpers import make_catalog
from tests.support.mosquitto import Mosquitto

pytestmark = pytest.mark.integration


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def _key_file(tmp_path: Path, releases: Releases) -> Path:
    key = tmp_path / "private.pem"
    key.write_bytes(
        releases.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return key


def test_release_command_publishes_a_verifiable_release(tmp_path: Path, releases: Releases) -> None:
    """release.json verifies with the public key and names exactly the published bytes; snapshots carry
    canary images and verify against the NEW bundle's model_id."""
    key = _key_file(tmp_path, releases)
    out = tmp_path / "pub"
    r = CliRunner().invoke(
        _app(),
        [
            "release",
            "--bundle",
            str(releases.root / "b"),
            "--catalog",
            str(releases.catalog),
            "--stores",
            ",".join(STORES),
            "--key",
            str(key),
            "--to",
            out.as_uri(),
            "--sequence",
            "42",
            "--cache-dir",
            str(releases.root / "cache"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "warning" not in r.output  # two photos per item: every store's snapshot has its rule
    rel_dir = out / "releases" / f"r42-{verify_bundle(releases.root / 'b').model_id[:8]}"
    data, sig = (rel_dir / "release.json").read_bytes(), (rel_dir / "release.sig").read_bytes()
    m = verify_release(data, sig, [releases.key.public_key()])
    assert m.sequence == 42 and set(m.stores) == set(STORES)
    for name, art in m.bundle.files.items():
        assert (rel_dir / "bundle" / name).stat().st_size == art.size
    for store, ref in m.stores.items():
        snap = tmp_path / f"snap-{store}"
        unpack(rel_dir / "snapshots" / store / "snapshot.tar", snap, max_total_bytes=1 << 30)
        sm = verify_snapshot(snap, [releases.key.public_key()], model_id=m.bundle.model_id, store=store)
        assert sm.version == ref.version and all(c.image for c in sm.canary)
    tampered = data.replace(b'"sequence": 42', b'"sequence": 43')
    with pytest.raises(ReleaseRejected) as exc:
        verify_release(tampered, sig, [releases.key.public_key()])
    assert exc.value.reason == "bad_signature"


def test_release_command_warns_when_snapshots_cannot_say_no_match(tmp_path: Path, releases: Releases) -> None:
    """One photo per item: each store's snapshot never answers "no match"; ops must hear it at release."""
    catalog = make_catalog(tmp_path / "cat", STORES, per_item=1)
    key = _key_file(tmp_path, releases)
    args = ["release", "--bundle", str(releases.root / "b"), "--catalog", str(catalog), "--stores",
            ",".join(STORES), "--key", str(key), "--to", (tmp_path / "pub").as_uri()]
    r = CliRunner().invoke(_app(), args)
    assert r.exit_code == 0, r.output
    warned = [ln for ln in r.output.splitlines() if ln.startswith("warning: store ")]
    assert len(warned) == len(STORES) and all('never answer "no match"' in w for w in warned), r.output


def test_release_command_names_a_bad_catalog_in_one_line(tmp_path: Path, releases: Releases) -> None:
    """A catalog that is missing, a folder or not UTF-8: one line and exit 2 (a CatalogError traceback
    before)."""
    key = _key_file(tmp_path, releases)
    (tmp_path / "folder").mkdir()
    (tmp_path / "latin1.csv").write_bytes("sku,title\n1,Caf\xe9\n".encode("latin-1"))
    cases = (("none.csv", "does not exist"), ("folder", "is a folder"), ("latin1.csv", "UTF-8"))
    for catalog, named in cases:
        args = ["release", "--bundle", str(releases.root / "b"), "--catalog", str(tmp_path / catalog),
                "--stores", ",".join(STORES), "--key", str(key), "--to", (tmp_path / "pub").as_uri()]
        r = CliRunner().invoke(_app(), args)
        assert r.exit_code == 2 and r.output.startswith("error: ") and named in r.output, r.output
        assert r.output.count("\n") == 1 and "Traceback" not in r.output


def test_status_command_lists_every_kiosk(broker: Mosquitto) -> None:
    """status shows each kiosk's state, model, snapshot and last update step from the retained topics."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="status-seed")
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    t = Topics("st9", "kx")
    infos = [
        c.publish(
            t.status,
            Status(kiosk="kx", store="st9", state=KioskState.ONLINE, model="ab" * 32, snapshot=7).to_bytes(),
            qos=1,
            retain=True,
        ),
        c.publish(
            t.update,
            UpdateProgress(
                kiosk="kx", store="st9", release="rel7", step="rolled_back", ok=False, detail="selftest"
            ).to_bytes(),
            qos=1,
            retain=True,
        ),
    ]
    for info in infos:
        info.wait_for_publish(5)
    c.disconnect()
    c.loop_stop()
    r = CliRunner().invoke(_app(), ["status", "--stores", "st9", "--broker", broker.url])
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if ln.startswith("st9"))
    assert "kx" in line and "online" in line and "abababababab" in line and "rel7 rolled_back FAILED" in line


def test_rollout_command_refuses_stores_missing_from_the_release(
    releases: Releases, broker: Mosquitto
) -> None:
    """A store the release has no snapshot for is a usage error (exit 2), before anything is staged."""
    r = CliRunner().invoke(
        _app(), ["rollout", releases.good1.url, "--stores", "s1,s9", "--broker", broker.url]
    )
    assert r.exit_code == 2 and "s9" in r.output
    r = CliRunner().invoke(_app(), ["rollout", releases.good1.url, "--stores", "s1", "--broker", broker.url])
    assert r.exit_code == 0 and "nothing_to_do" in r.output
    assert json.loads(Path(releases.good1.url.removeprefix("file://")).read_text())["release"] == "rel10"

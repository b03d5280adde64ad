"""A kiosk killed at every step of a switch restarts serving the old or the new generation, never neither
and never a model with another model's index."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization

from device.app import KioskApp
from device.config import parse_config
from models.fake import FakeEmbedder
from tests.device.generations.kiosk_child import CRASHED
from tests.device.snapshots import make_snapshot
from tests.fleet.conftest import Releases
from tests.fleet.helpers import desired

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[3]
# (where the kiosk dies, which generation it must serve after the restart)
STEPS = [
    ("compile", "old"),  # the compile child ran; nothing committed
    ("canary", "old"),  # the canary gate; nothing committed
    ("pointer", "old"),  # the pointer write torn before its rename
    ("swap", "new"),  # pointer committed in probation, the reference not yet swapped
    ("probation", "new"),  # swapped, probation watching
    ("done", "new"),  # probation passed
]


def _config(tmp_path: Path, releases: Releases) -> dict[str, Any]:
    pub = tmp_path / "pub.pem"
    pub.write_bytes(releases.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    emb = FakeEmbedder(64)
    vectors = emb.embed([np.full((32, 32, 3), i * 60, np.uint8) for i in range(3)])
    initial = make_snapshot(tmp_path / "initial", vectors, ["a", "b", "c"], releases.key,
                            model_id=emb.model_id)
    return {
        "kiosk": {"store_id": "s1", "kiosk_id": "k1"},
        "camera": {"source": "synthetic", "loop": True},
        "model": {"kind": "fake", "fake_dim": 64},
        "snapshots": {"state_dir": str(tmp_path / "state"), "public_keys": [str(pub)],
                      "initial": str(initial), "subscribe": False},
        "sync": {"sources": [releases.root.as_uri() + "/"]},
        "broker": {"transport": "none"},
        "screen": {"enabled": False},
        "outbox": {"path": str(tmp_path / "outbox.sqlite")},
        "update": {"state_dir": str(tmp_path / "update"), "probation_s": 0.3, "probe_interval_s": 0.05},
    }


@pytest.mark.parametrize(("crash_at", "serves"), STEPS)
def test_a_kiosk_killed_at_any_step_of_a_switch_serves_one_whole_generation(
    crash_at: str, serves: str, releases: Releases, tmp_path: Path
) -> None:
    """Killed mid-switch (child compile, canary, pointer write, swap, probation), the restarted kiosk must
    serve generation 0 or the release, each with its own snapshot: never no model, never a mixed pair."""
    raw = _config(tmp_path, releases)
    want = desired(releases.good1, "s1", "k1")
    r = subprocess.run(
        [sys.executable, "-m", "tests.device.generations.kiosk_child", json.dumps(raw),
         want.model_dump_json(), crash_at],
        cwd=REPO, timeout=180,
    )
    assert r.returncode == CRASHED, f"did not reach {crash_at}"
    old_model, new_model = FakeEmbedder(64).model_id, releases.good1.manifest.bundle.model_id
    app = KioskApp(parse_config(raw, base_dir=tmp_path))
    app.start()
    try:
        pair = app.serving.current()
        assert pair.snapshot is not None, "restarted with no index"
        assert pair.snapshot.manifest.model_id == pair.model_id, "a model with another model's index"
        assert pair.model_id == (old_model if serves == "old" else new_model)
        new_version = releases.good1.manifest.stores["s1"].version
        assert pair.snapshot.version == (1 if serves == "old" else new_version)
        pair.snapshot.check_canaries()
        assert app.updater is not None and not list(app.updater.store.staging.iterdir())
    finally:
        app.stop()


# (where the kiosk dies during a snapshot-only switch, which snapshot it must serve after the restart)
SNAPSHOT_STEPS = [
    ("load", "old"),  # the new index loading off the hot path
    ("canary", "old"),  # its canaries
    ("pointer", "old"),  # the pointer write torn before its rename
    ("swap", "new"),  # pointer committed, the reference not yet swapped
]


@pytest.mark.parametrize(("crash_at", "serves"), SNAPSHOT_STEPS)
def test_a_kiosk_killed_at_any_step_of_a_snapshot_switch_serves_one_whole_snapshot(
    crash_at: str, serves: str, releases: Releases, tmp_path: Path
) -> None:
    """Killed mid snapshot-only switch (same model, new snapshot: index load, canary, pointer write, swap),
    the restarted kiosk must serve the old snapshot or the new one of its model: never none, never a mix."""
    raw = _config(tmp_path, releases)
    emb = FakeEmbedder(64)
    vectors = emb.embed([np.full((32, 32, 3), i * 60, np.uint8) for i in range(4)])
    new = make_snapshot(tmp_path / "v2", vectors, ["a", "b", "c", "d"], releases.key, model_id=emb.model_id,
                        version=2)
    r = subprocess.run(
        [sys.executable, "-m", "tests.device.generations.kiosk_child", json.dumps(raw), f"snapshot:{new}",
         crash_at],
        cwd=REPO, timeout=180,
    )
    assert r.returncode == CRASHED, f"did not reach {crash_at}"
    app = KioskApp(parse_config(raw, base_dir=tmp_path))
    app.start()
    try:
        pair = app.serving.current()
        assert pair.snapshot is not None, "restarted with no index"
        assert pair.model_id == emb.model_id and pair.snapshot.manifest.model_id == pair.model_id
        assert pair.snapshot.version == (1 if serves == "old" else 2)
        assert len(pair.snapshot.items()) == (3 if serves == "old" else 4), "a mix of two snapshots"
        pair.snapshot.check_canaries()
        assert app.updater is not None and not list(app.updater.store.staging.iterdir())
    finally:
        app.stop()

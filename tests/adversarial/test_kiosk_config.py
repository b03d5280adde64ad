"""Every key of a working kiosk config mutated (empty, a folder, a file, a missing path, a huge string, huge
and negative numbers), then loaded and the kiosk started as `storelens kiosk run` starts it.

Family ``config:<section>``. Each case must be refused with one line (a ConfigError naming the key at load,
or one of the errors `kiosk run` prints as ``error: ...`` and exits 2 on), or run: the kiosk starts, serves
for a moment and stops (an initial snapshot it cannot use is an alert, the kiosk degraded, as designed).
Never a traceback, and never a hang (pytest's timeout).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device.app import KioskApp
from device.camera.synthetic import render_items
from device.cli import installer_errors
from device.config import ConfigError, load_config
from models.fake import FakeEmbedder
from tests.adversarial.conftest import Outcome, Tally
from tests.device.snapshots import make_snapshot

pytestmark = pytest.mark.slow

# Paths (relative ones resolve against the config's folder: "" is the folder itself), and numbers at the
# ends of every range. Found by this set: a missing video file, an unusable outbox path, `initial = ""`
# (the config's folder copied into its own state folder until RecursionError) and a health interval of
# 1e308 (OverflowError) all ended in tracebacks.
_VALUES: list[Any] = ["", "afolder", "afile", "nowhere/deep/x", "x" * 300, 1e308, 10**12, 0, -1]


def _toml(cfg: dict[str, dict[str, Any]]) -> str:
    """The config as TOML (sections of scalars and lists: JSON's strings and numbers are TOML's)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v) if isinstance(v, str) else repr(v)

    return "".join(f"[{name}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in sec.items()) + "\n"
                   for name, sec in cfg.items())  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """A config that runs: fake model, synthetic camera, no broker, a signed initial snapshot."""
    root = tmp_path_factory.mktemp("kiosk-config")
    key = Ed25519PrivateKey.generate()
    pub = root / "catalog.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo))
    items = render_items(3, seed=4)
    emb = FakeEmbedder(64)
    snap = make_snapshot(root / "v1", emb.embed(items), ["a", "b", "c"], key, model_id=emb.model_id,
                         threshold=0.3, thumbs=items)
    return {
        "kiosk": {"store_id": "s1", "kiosk_id": "k1"},
        "camera": {"source": "synthetic", "fps": 30.0, "stall_s": 5.0, "open_timeout_ms": 5000,
                   "read_timeout_ms": 5000, "backoff_min_s": 1.0, "backoff_max_s": 30.0, "queue_size": 2},
        "detection": {"work_width": 160, "steady_frames": 4, "steady_diff": 8.0, "aggregate_frames": 3,
                      "top_k": 5},
        "model": {"kind": "fake", "fake_dim": 64, "cache_dir": "ov", "max_inflight": 2},
        "snapshots": {"state_dir": "state", "public_keys": [str(pub)], "initial": str(snap)},
        "sync": {"sources": ["file:///srv/snapshots/"]},
        "broker": {"transport": "none"},
        "screen": {"host": "127.0.0.1", "port": 0, "preview_fps": 10.0, "result_hold_s": 8.0},
        "outbox": {"path": "outbox.sqlite", "max_rows": 1000, "max_age_s": 3600.0},
        "feedback": {"max_per_hour": 120, "jpeg_quality": 85, "answer_timeout_s": 15.0},
        "health": {"interval_s": 30.0},
        "update": {"state_dir": "update", "probation_s": 300.0, "probe_interval_s": 5.0,
                   "compile_timeout_s": 120.0, "compile_mem_mb": 2048, "retired_close_s": 10.0},
    }  # fmt: skip


def _mutations(base: dict[str, dict[str, Any]]) -> Iterator[tuple[str, str, Any, dict[str, dict[str, Any]]]]:
    for section, keys in base.items():
        for key in keys:
            for v in _VALUES:
                cfg = json.loads(json.dumps(base))
                cfg[section][key] = v
                yield section, key, v, cfg


def _start(path: Path) -> Outcome:
    """What `storelens kiosk run --config PATH --max-seconds 0.05` does, with its outcome."""
    try:
        cfg = load_config(path, check_files=True)
    except ConfigError:
        return "refused"
    try:
        KioskApp(cfg).run(max_seconds=0.05)
    except installer_errors():
        return "refused"
    return "survived"


def test_every_config_key_mutated_is_refused_in_one_line_or_runs(
    base: dict[str, dict[str, Any]], tmp_path: Path, tally: Tally
) -> None:
    """Guards: an installer's typo in kiosk.toml ending in a traceback (or a folder copied into itself)
    instead of one line naming what is wrong."""
    failures = []
    ran = 0
    for i, (section, key, v, cfg) in enumerate(_mutations(base)):
        case = tmp_path / f"c{i}"
        case.mkdir()
        (case / "afolder").mkdir()
        (case / "afile").write_text("not what the key wants")
        path = case / "kiosk.toml"
        path.write_text(_toml(cfg))
        try:
            outcome = _start(path)
        except Exception as exc:  # what the guard is for: anything else reached the installer as a traceback
            outcome = "traceback"
            failures.append(f"{section}.{key} = {str(v)[:20]!r}: {type(exc).__name__}: {exc}"[:300])
        ran += outcome == "survived"
        tally.record(f"config:{section}", outcome)
    assert not failures, "\n".join(failures)
    assert ran > 20  # the base config runs, and so does many a harmless mutation: the kiosk really started

"""Every field of every payload the kiosk accepts, mutated by type, size and value, fed to its real handler.

Families: ``payload:announcement`` (bc/storelens/{store}/snapshot -> SnapshotSync.handle_announcement, a
full announcement and a delta one with its ``full`` ref), ``payload:desired`` (cmd/.../desired ->
Updater.on_desired) and ``payload:ha_status`` (homeassistant/status -> ConnectTasks.on_message). Each
case must be refused with a named reason, or survived harmlessly (an ignored field, a re-delivery, the
genuine signed snapshot installed), never a traceback, and the active snapshot unchanged otherwise.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device.app_connect import ConnectTasks
from device.comms import InMemoryTransport
from device.config import UpdateConfig
from device.generations.switcher import switch_snapshot
from device.sync import SnapshotStore, SnapshotSync, Sources
from device.update import Updater
from storelens.protocol import HA_STATUS_TOPIC, DesiredRelease, SnapshotAnnouncement, Topics, decode
from tests.adversarial.conftest import Tally
from tests.device.sync.snapbuild import MODEL_DIM, MODEL_ID, archive, build_snapshot

_TYPES: dict[str, Any] = {"str": "x", "int": 7, "float": 1.5, "bool": True, "null": None, "list": [1],
                          "object": {"a": 1}}
_SIZES: dict[str, Any] = {"empty": "", "huge_str": "x" * 100_000, "huge_int": 2**80, "negative": -1,
                          "zero": 0, "max_int": 2**63, "nan": float("nan")}
_BAD_URLS = ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/v2.tar", "file:///etc/passwd",
             "file:///dev/zero", "ftp://x/y", "https://a@169.254.169.254/", "//x/y", "not a url"]
_MISSING = object()


def _mutations(base: dict[str, Any], values: dict[str, list[Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(label, payload dict) for every field of ``base`` (and ``v``) x every type, size and value mutation."""
    for field in sorted({*base, "v"}):
        for label, value in [*_TYPES.items(), *_SIZES.items(), ("missing", _MISSING)] + [
            (f"value{i}", v) for i, v in enumerate(values.get(field, []))
        ]:
            out = dict(base)
            if value is _MISSING:
                out.pop(field, None)
            else:
                out[field] = value
            yield f"{field}:{label}", out


class _World:
    def __init__(self, root: Path) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.v1 = build_snapshot(root / "v1", self.key, version=1)
        self.v2 = build_snapshot(root / "v2", self.key, version=2, seed=3)
        bucket = root / "bucket"
        bucket.mkdir()
        self.tar = archive(self.v2, bucket / "v2.tar")
        self.sources = Sources([bucket.as_uri() + "/"])
        ref = dict(version=2, manifest_sha256=self.v2.manifest_sha256, size=self.tar.stat().st_size,
                   sha256=hashlib.sha256(self.tar.read_bytes()).hexdigest(), url=self.tar.as_uri())
        ann = SnapshotAnnouncement(store="store1", model_id=MODEL_ID, **ref)  # type: ignore[arg-type]
        self.full = json.loads(ann.to_bytes())
        self.delta = {**self.full, "kind": "delta", "version": 3, "base_version": 7,
                      "manifest_sha256": "e" * 64, "full": ref}
        self.template = root / "template"
        self._sync(self.template).install(self.v1.directory)
        self.state = root / "state"

    def _sync(self, state: Path, refused: list[str] | None = None) -> SnapshotSync:
        return SnapshotSync(
            SnapshotStore(state), [self.key.public_key()], store_id="store1", model_id=MODEL_ID,
            model_dim=MODEL_DIM, switch=lambda c: switch_snapshot(c, lambda s: None),
            on_refused=lambda r, d: refused.append(r) if refused is not None else None,
            sources=self.sources, download_timeout_s=10,
        )

    def fresh(self, refused: list[str]) -> SnapshotSync:
        """A kiosk's sync on a copy of the v1 state (no memory of earlier cases)."""
        shutil.rmtree(self.state, ignore_errors=True)
        shutil.copytree(self.template, self.state, symlinks=True)
        sync = self._sync(self.state, refused)
        assert sync.load_active() is not None
        return sync


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> _World:
    return _World(tmp_path_factory.mktemp("payloads"))


def _encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode()  # NaN goes out as the bare NaN token some publishers write


_SIGNED = ("store", "version", "kind", "base_version", "model_id", "manifest_sha256", "size", "sha256", "url")


@pytest.mark.parametrize("kind", ["full", "delta"])
def test_every_announcement_field_mutated_is_refused_or_harmless(
    world: _World, tally: Tally, kind: str
) -> None:
    """Guards: an announcement field (type, size, value) crashing the sync, installing something other
    than the genuine signed snapshot, or replacing the active one with nothing signed behind it."""
    base = world.full if kind == "full" else world.delta
    values: dict[str, list[Any]] = {
        "store": ["store2", "+", "store1/x"], "version": [1, 3, 2**53 + 1, "2", 2.0],
        "kind": ["delta", "weird"], "base_version": [1, 2], "model_id": ["f" * 64],
        "manifest_sha256": ["0" * 64], "size": [1, 10**12], "sha256": ["0" * 64, "A" * 64],
        "url": _BAD_URLS, "v": [0, 2, 99, "1", 1.0], "type": ["status", "desired"], "ts": ["yesterday"],
    }
    cases = list(_mutations(base, values))
    if kind == "delta":
        ref = base["full"]
        cases += [(f"full.{label}", {**base, "full": sub})
                  for label, sub in _mutations(ref, {**values, "version": [1, 3], "url": _BAD_URLS})]
    genuine = decode(_encode(world.full), SnapshotAnnouncement)
    for label, payload in cases:
        refused: list[str] = []
        sync = world.fresh(refused)
        try:
            got = sync.handle_announcement(_encode(payload))
        except Exception:
            tally.record(f"payload:announcement:{kind}", "traceback")
            raise
        active = sync.active
        assert active is not None, label
        if active.version == 1:
            assert got is None, label
            tally.record(f"payload:announcement:{kind}", "refused" if refused else "survived")
            continue
        # something was installed: only the genuine signed v2, and only when what was said is what is signed
        said = decode(_encode(payload), SnapshotAnnouncement)
        said = said.of_full() if said.kind == "delta" else said
        ok = active.version == 2 and all(getattr(said, f) == getattr(genuine, f) for f in _SIGNED)
        tally.record(f"payload:announcement:{kind}", "survived" if ok else "accepted")
        assert ok, f"{label}: installed v{active.version} from {said!r}"


def test_every_desired_field_mutated_is_refused_or_queued_only_when_valid(
    tmp_path: Path, tally: Tally
) -> None:
    """Guards: a desired-release field crashing the updater's callback, or a release for another kiosk,
    an unknown schema or a URL outside the sources reaching the update worker."""
    source = "https://cdn.example.com/releases/"
    genuine = DesiredRelease(kiosk="k1", store="s1", release="rel2", sequence=2,
                             url=source + "r/release.json", sig_url=source + "r/release.sig")
    base = json.loads(genuine.to_bytes())
    values: dict[str, list[Any]] = {
        "kiosk": ["k2", "+", "#"], "store": ["s2"], "sequence": [2**53 + 1, "2", 2.0],
        "release": ["../x", "a" * 65], "url": _BAD_URLS, "sig_url": _BAD_URLS, "v": [0, 2, 99, "1"],
        "type": ["snapshot"], "deadline_s": [1e12], "probation_s": [1e12],
    }
    sources = Sources([source])
    for label, payload in _mutations(base, values):
        alerts: list[tuple[str, str]] = []
        u = Updater(UpdateConfig(state_dir=tmp_path / "upd"), Topics("s1", "k1"),
                    [Ed25519PrivateKey.generate().public_key()], transport=None, on_switch=lambda e, s: None,
                    on_alert=lambda k, d, alerts=alerts: alerts.append((k, d)), sources=sources)
        try:
            u.on_desired("cmd/storelens/s1/k1/desired", _encode(payload), True)
        except Exception:
            tally.record("payload:desired", "traceback")
            raise
        if alerts:
            assert u.idle.is_set() and alerts[0][0] == "update_failed", label
            tally.record("payload:desired", "refused")
            continue
        d = decode(_encode(payload), DesiredRelease)  # queued: it must be a valid command for this kiosk
        ok = (d.store, d.kiosk) == ("s1", "k1") and sources.allows(d.url) and sources.allows(d.sig_url)
        tally.record("payload:desired", "survived" if ok else "accepted")
        assert ok, f"{label}: queued {d!r}"
    assert u.store.pointer.current is None


def test_home_assistant_status_payloads_are_survived(tally: Tally) -> None:
    """Guards: Home Assistant's status topic (any bytes) crashing the kiosk's transport callback."""
    transport = InMemoryTransport()
    tasks = ConnectTasks(transport, Topics("s1", "k1"), app_version="t", health_interval_s=1.0)
    payloads = [b"online", b"offline", b"", b"\xff\xfe", b"x" * 200_000, b"{}", b"[]", b"null", b"ONLINE",
                b"online\x00", *(_encode({"state": v}) for v in [*_TYPES.values(), *_SIZES.values()])]
    for payload in payloads:
        for topic in (HA_STATUS_TOPIC, HA_STATUS_TOPIC + "/x"):
            try:
                tasks.on_message(topic, payload, False)
            except Exception:
                tally.record("payload:ha_status", "traceback")
                raise
            tally.record("payload:ha_status", "survived")
    assert tasks.deferred.run_pending() >= 0

"""What a desired release may ask of a kiosk: its own store and kiosk, a known schema, allowed sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device.config import UpdateConfig
from device.sync import Sources
from device.update import Updater, steps
from storelens.protocol import DesiredRelease, Topics
from storelens.release import Artifact, BundleRef, ReleaseManifest, StoreSnapshotRef
from tests.device.sync.test_sources import _Server

SOURCE = "https://cdn.example.com/releases/"


def _updater(tmp_path: Path, alerts: list[tuple[str, str]], sources: list[str] | None = None) -> Updater:
    return Updater(
        UpdateConfig(state_dir=tmp_path / "upd"), Topics("s1", "k1"),
        [Ed25519PrivateKey.generate().public_key()],
        transport=None, on_switch=lambda e, s: None, on_alert=lambda k, d: alerts.append((k, d)),
        sources=Sources(sources if sources is not None else [SOURCE]),
    )


def _desired(**over: object) -> bytes:
    d = DesiredRelease(kiosk="k1", store="s1", release="rel2", sequence=2, url=SOURCE + "rel2/release.json",
                       sig_url=SOURCE + "rel2/release.sig")
    return json.dumps({**json.loads(d.to_bytes()), **over}).encode()


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"kiosk": "k2"}, "wrong_kiosk"),
        ({"store": "s2"}, "wrong_store"),
        ({"v": 99}, "unsupported_schema"),
        ({"sequence": 2**80}, "bad_desired"),
        ({"sequence": "2"}, "bad_desired"),
        ({"url": "http://169.254.169.254/latest/meta-data/"}, "source_not_allowed"),
        ({"sig_url": "file:///etc/shadow"}, "source_not_allowed"),
    ],
)
def test_a_desired_release_not_for_this_kiosk_is_refused_with_an_alert(
    tmp_path: Path, over: dict[str, object], reason: str
) -> None:
    """Guards: a desired release naming another kiosk/store, an unknown schema or a foreign URL acted on."""
    alerts: list[tuple[str, str]] = []
    u = _updater(tmp_path, alerts)
    u.on_desired("cmd/storelens/s1/k1/desired", _desired(**over), True)
    assert u.idle.is_set(), "nothing was queued for the worker"
    assert len(alerts) == 1 and alerts[0][0] == "update_failed" and reason in alerts[0][1], alerts
    u.on_desired("cmd/storelens/s1/k1/desired", _desired(), True)
    assert not u.idle.is_set(), "the genuine message is queued"


def test_a_desired_release_outside_the_sources_is_never_fetched(tmp_path: Path) -> None:
    """Guards: the kiosk connecting to a loopback/metadata server a desired release names."""
    server = _Server(b"{}")
    try:
        u = _updater(tmp_path, [])
        with pytest.raises(steps.UpdateFailed) as err:
            u.accept_desired(_desired(url=f"{server.url}/release.json", sig_url=f"{server.url}/release.sig"))
        assert err.value.reason == "source_not_allowed"
        raw = _desired(url=f"{server.url}/r.json", sig_url=f"{server.url}/s")
        d = DesiredRelease.model_validate_json(raw)
        with pytest.raises(steps.UpdateFailed) as err:  # the worker's own path, given unchecked input
            steps.fetch_release(d, [], timeout_s=5, sources=u.sources)
        assert err.value.reason == "source_not_allowed"
    finally:
        server.close()
    assert server.requests == []


def test_urls_inside_a_signed_release_must_lie_under_the_sources() -> None:
    """Guards: a signed release (or a compromised release bucket) sending kiosks to any URL for artifacts."""
    art = Artifact(url=SOURCE + "b/model.bin", sha256="a" * 64, size=1)
    snap = StoreSnapshotRef(version=2, manifest_sha256="b" * 64,
                            archive=Artifact(url="http://10.0.0.5/snap.tar", sha256="c" * 64, size=1))
    rel = ReleaseManifest(release="rel2", sequence=2, created_at="2026-01-01T00:00:00Z",
                          bundle=BundleRef(model_id="d" * 64, dim=8, files={"model.bin": art}),
                          stores={"s1": snap})
    steps.check_sources(rel, "s2", Sources([SOURCE]))  # another store's snapshot is not fetched here
    with pytest.raises(steps.UpdateFailed) as err:
        steps.check_sources(rel, "s1", Sources([SOURCE]))
    assert err.value.reason == "source_not_allowed" and "10.0.0.5" in err.value.detail

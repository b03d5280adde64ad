"""The shared MQTT protocol: topic rules and strict-but-forward-compatible payload parsing."""

from __future__ import annotations

import json

import pytest

from storelens import protocol as p


def test_topic_tree() -> None:
    t = p.Topics("store-1", "kiosk_a")
    assert t.status == "dt/storelens/store-1/kiosk_a/status"
    assert t.match == "dt/storelens/store-1/kiosk_a/events/match"
    assert t.snapshot == "bc/storelens/store-1/snapshot"
    assert p.parse_kiosk_topic(t.health) == ("store-1", "kiosk_a", "health")


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "x" * 65, "café", "a b"])
def test_ids_with_wildcards_or_separators_refused(bad: str) -> None:
    """Guards topic injection through a kiosk or store id (CVE-2017-7650 class)."""
    with pytest.raises(p.ProtocolError):
        p.Topics(bad, "k1")


def test_round_trip_and_unknown_fields_ignored() -> None:
    ev = p.MatchEvent(
        kiosk="k1", store="s1", matched=True, threshold=0.5, frames=8, model="m" * 64, snapshot=3,
        results=[p.MatchItem(rank=1, sku="A1", title="Apple", score=0.9)],
    )
    raw = json.loads(ev.to_bytes())
    assert raw["type"] == "match"
    raw["future_field"] = {"x": 1}
    back = p.decode(json.dumps(raw).encode(), p.MatchEvent)
    assert back.results[0].sku == "A1" and back.id == ev.id


@pytest.mark.parametrize(
    "payload",
    [b"", b"\xff\xfe", b"[1,2]", b"{", b'{"type":"health"}', b'{"type":"status","kiosk":"k","store":"s"}',
     b'{"type":"status","kiosk":"k","store":"s","state":"exploded"}', b"[" * 100_000,
     b'{"type":"status","pad":"' + b"x" * 200_000 + b'"}'],
)
def test_malformed_payloads_raise_protocol_error(payload: bytes) -> None:
    """Guards a malformed inbound message crashing the subscriber instead of being refused."""
    with pytest.raises(p.ProtocolError):
        p.decode(payload, p.Status)


def test_status_type_is_fixed() -> None:
    s = p.Status(kiosk="k", store="s", state=p.KioskState.ONLINE)
    assert json.loads(s.to_bytes())["type"] == "status"


def test_snapshot_announcement_full_ref_is_optional_and_compatible() -> None:
    """Guards: older kiosks or publishers breaking on the delta announcement's optional ``full`` ref."""
    common = dict(store="s1", model_id="m" * 64, size=10, sha256="a" * 64, url="file:///x")
    old = p.SnapshotAnnouncement(version=3, manifest_sha256="b" * 64, **common)  # type: ignore[arg-type]
    assert "full" not in json.loads(old.to_bytes()), "a full announcement's bytes are unchanged"
    ref = p.FullSnapshotRef(version=2, manifest_sha256="c" * 64, size=7, sha256="d" * 64, url="file:///f")
    delta = p.SnapshotAnnouncement(
        version=3, kind="delta", base_version=2, manifest_sha256="b" * 64, full=ref, **common  # type: ignore[arg-type]
    )
    back = p.decode(delta.to_bytes(), p.SnapshotAnnouncement)
    assert back.full == ref
    full = back.of_full()
    assert (full.kind, full.version, full.url, full.size, full.full) == ("full", 2, "file:///f", 7, None)
    assert full.store == "s1" and full.model_id == "m" * 64
    with pytest.raises(ValueError):
        old.of_full()

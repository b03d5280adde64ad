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

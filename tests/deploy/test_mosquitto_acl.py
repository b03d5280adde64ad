"""deploy/mosquitto on Debian's mosquitto 2.0.11: it starts, and its ACL keeps staff read-only."""

from __future__ import annotations

import ssl
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from storelens.protocol import KioskState, Status, Topics, snapshot_topic
from tests.deploy.conftest import PASSWORDS, STORE, StoreBroker
from tests.deploy.mqtt_peer import Peer

pytestmark = pytest.mark.integration

NOT_AUTHORIZED = 135  # MQTT 5 reason code for PUBACK/SUBACK refused by the ACL
A, B = Topics(STORE, "kA"), Topics(STORE, "kB")


@contextmanager
def peer(sb: StoreBroker, user: str, **kw: Any) -> Iterator[Peer]:
    """A connected MQTT 5 peer logged in as ``user`` (plain loopback listener unless told)."""
    kw.setdefault("port", sb.port)
    p = Peer("127.0.0.1", client_id=f"t-{user}-{kw.pop('tag', '0')}", username=user,
             password=PASSWORDS[user], **kw).connect()
    try:
        yield p
    finally:
        p.close()


def assert_not_delivered(ops: Peer, reader: Peer, *topics: str) -> None:
    """Nothing on ``topics`` reached ``reader``: a marker sent after them (same broker order) did arrive."""
    marker = f'{{"marker":"{reader.client_id}-{len(reader.messages)}"}}'.encode()
    assert reader.subscribe(snapshot_topic(STORE)).value < 128
    assert ops.publish(snapshot_topic(STORE), marker).value < 128
    assert reader.wait_for_payload(marker) is not None, "marker not delivered"
    leaked = [m.topic for m in reader.messages if m.topic in topics]
    assert not leaked, f"ACL let {reader.username} read {leaked}"


def _status(kiosk: str) -> bytes:
    return Status(kiosk=kiosk, store=STORE, state=KioskState.ONLINE).to_bytes()


def test_every_listener_starts_and_websockets_serves_http_dir(store_broker: StoreBroker) -> None:
    """The shipped config must start on 2.0.11 (a websockets-only or malformed config does not), and serve
    the dashboard over TLS on the websockets port."""
    ctx = ssl.create_default_context(cafile=str(store_broker.ca))
    with urllib.request.urlopen(f"https://127.0.0.1:{store_broker.ws_port}/index.html", timeout=5,
                                context=ctx) as r:  # fmt: skip
        assert r.status == 200
        assert b"storelens-dashboard" in r.read()


def test_anonymous_and_wrong_password_are_refused(store_broker: StoreBroker) -> None:
    """The websockets listener ignores its bind address, so it must never be open without a password."""
    for user, pw in ((None, None), ("dashboard", "wrong")):
        with pytest.raises(ConnectionRefusedError):
            Peer("127.0.0.1", store_broker.ws_port, "t-anon", username=user, password=pw,
                 transport="websockets", tls_ca=str(store_broker.ca)).connect()


def test_dashboard_reads_store_telemetry_but_every_publish_is_refused(store_broker: StoreBroker) -> None:
    """A staff browser holding the read-only credentials must not be able to fake or command a kiosk."""
    with (
        peer(store_broker, "ops") as ops,
        peer(store_broker, "dashboard", port=store_broker.ws_port, transport="websockets",
             tls_ca=str(store_broker.ca)) as dash,
        peer(store_broker, "kA") as kiosk,
    ):
        assert ops.subscribe("#").value < 128
        assert dash.subscribe(f"dt/storelens/{STORE}/#").value < 128
        assert dash.subscribe(snapshot_topic(STORE)).value < 128
        assert kiosk.publish(A.status, _status("kA"), retain=True).value < 128
        got = dash.wait_for(A.status)
        assert got is not None and b'"online"' in got.payload

        forged = [A.status, B.health, f"dt/storelens/{STORE}/dashboard/status", A.desired,
                  snapshot_topic(STORE), "homeassistant/device/dashboard/config", "homeassistant/status",
                  "anything/else"]
        for topic in forged:
            rc = dash.publish(topic, b'{"state":"offline"}')
            assert rc.value == NOT_AUTHORIZED, f"dashboard publish to {topic} was {rc}"
        # The broker delivered none of them to a subscriber of everything.
        marker = b"after-forgeries"
        assert kiosk.publish(A.health, marker).value < 128
        assert ops.wait_for(A.health) is not None
        assert not [m for m in ops.messages if m.payload == b'{"state":"offline"}']
        # mosquitto's acl_file grants the SUBSCRIBE and filters at delivery: nothing must arrive.
        assert ops.publish(A.desired, b'{"release":"r1"}', retain=True).value < 128
        dash.subscribe(A.desired)
        assert_not_delivered(ops, dash, A.desired)


def test_kiosk_publishes_only_as_itself(store_broker: StoreBroker) -> None:
    """Kiosk A must not be able to publish kiosk B's status (a forged 'online' hides a dead kiosk)."""
    with peer(store_broker, "ops") as ops, peer(store_broker, "kA") as a:
        assert ops.subscribe(f"dt/storelens/{STORE}/#").value < 128
        assert a.publish(B.status, _status("kB"), retain=True).value == NOT_AUTHORIZED
        assert a.publish(f"dt/storelens/{STORE}/dashboard/status", b"x").value == NOT_AUTHORIZED
        assert a.publish(B.ha_discovery, b"{}").value == NOT_AUTHORIZED
        for topic in (A.status, A.health, A.match, A.alert, A.update, A.ha_discovery):
            assert a.publish(topic, b"{}").value < 128, topic
        assert ops.wait_for(A.update) is not None
        assert all(m.topic.split("/")[3] == "kA" for m in ops.messages)


def test_kiosk_reads_its_commands_and_store_snapshot_only(store_broker: StoreBroker) -> None:
    """A kiosk gets its desired release and the snapshot announcement, never another kiosk's commands."""
    with peer(store_broker, "ops") as ops, peer(store_broker, "kA") as a, peer(store_broker, "kB") as b:
        assert ops.publish(snapshot_topic(STORE), b'{"type":"snapshot"}', retain=True).value < 128
        assert ops.publish(A.desired, b'{"release":"r1"}', retain=True).value < 128
        assert a.subscribe(snapshot_topic(STORE)).value < 128
        assert a.subscribe(f"cmd/storelens/{STORE}/kA/#").value < 128
        assert a.subscribe("homeassistant/status").value < 128
        assert a.wait_for(snapshot_topic(STORE)) is not None
        assert a.wait_for(A.desired) is not None
        assert ops.publish(B.desired, b'{"release":"r1"}', retain=True).value < 128
        a.subscribe(B.desired)
        a.subscribe(f"dt/storelens/{STORE}/kB/#")
        assert b.publish(B.status, _status("kB"), retain=True).value < 128
        assert_not_delivered(ops, a, B.desired, B.status)


def test_kiosk_over_tls_with_last_will(store_broker: StoreBroker) -> None:
    """Kiosks reach the broker over the LAN via TLS; their last will lands on their own status topic."""
    will = Status(kiosk="kA", store=STORE, state=KioskState.OFFLINE, reason="lwt").to_bytes()
    with peer(store_broker, "ops") as ops:
        assert ops.subscribe(A.status).value < 128
        with peer(store_broker, "kA", port=store_broker.tls_port, tls_ca=str(store_broker.ca),
                  will=(A.status, will)) as a:
            assert a.publish(A.status, _status("kA"), retain=True).value < 128
            assert ops.wait_for(A.status) is not None
            assert a.client is not None
            sock = a.client.socket()
            assert sock is not None
            sock.close()  # abrupt: no DISCONNECT, so the broker sends the will
        assert ops.wait_for_payload(will) is not None, "last will was not delivered"

"""The shipped store-broker config probed as every identity against every topic family, both ways.

Generated matrix: each identity (kiosks of this store, a kiosk of another store, the dashboard, ops, Home
Assistant, anonymous, a wrong password, a kiosk login sending another kiosk's client id or one with
``+ # / $``) publishes to and subscribes to every topic of ``storelens.protocol.Topics`` for its own kiosk,
another kiosk of its store and another store, plus ``homeassistant/status``, ``$SYS`` and ``#``. A
test-only superuser (appended to the installed ACL) sees every delivery, and an allowed marker message
sent after each batch is the barrier that proves a refused message did not arrive (no sleeps).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from paho.mqtt.client import topic_matches_sub

from storelens.protocol import KioskState, Status, Topics
from tests.adversarial.conftest import Tally
from tests.deploy.conftest import PASSWORDS, STORE, StoreBroker, run_store_broker
from tests.deploy.mqtt_peer import Peer

pytestmark = pytest.mark.integration

OTHER_STORE = "s043"
SUPER, SUPER_PW = "probe-super", "pw-probe-super"  # test-only: never in the shipped files
SUPER_ACL = f"\nuser {SUPER}\ntopic readwrite #\ntopic read $SYS/#\n"
MARKER = f"bc/storelens/{STORE}/probe-marker"  # every identity that may log in can read its store's bc/
SYS_TOPIC = "$SYS/broker/version"  # retained by the broker itself


def _kiosk_topics(t: Topics) -> list[str]:
    return [t.status, t.health, t.match, t.alert, t.feedback, t.update, t.desired, t.snapshot, t.ha_discovery]


A, B, C = Topics(STORE, "kA"), Topics(STORE, "kB"), Topics(OTHER_STORE, "kC")
A_ELSEWHERE = Topics(OTHER_STORE, "kA")  # kiosk A's own id under another store's prefix
PROBED = list(dict.fromkeys(
    [*_kiosk_topics(A), *_kiosk_topics(B), *_kiosk_topics(C), *_kiosk_topics(A_ELSEWHERE),
     f"cmd/storelens/{STORE}/all/desired", f"bc/storelens/{STORE}/other", "homeassistant/status"]
))


@dataclass(frozen=True)
class Identity:
    """Who connects, how, and what the policy says it may read and write (MQTT filters)."""

    name: str
    username: str | None
    password: str | None
    client_id: str
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    transport: str = "tcp"

    @property
    def can_connect(self) -> bool:
        return bool(self.reads or self.writes)


def _kiosk(name: str, login: str, client_id: str) -> Identity:
    return Identity(
        name, login, PASSWORDS[login], client_id,
        reads=(f"cmd/storelens/{STORE}/{login}/#", f"bc/storelens/{STORE}/#", "homeassistant/status"),
        writes=(f"dt/storelens/{STORE}/{login}/#", f"homeassistant/device/{login}/config"),
    )


_STORE_DT = f"dt/storelens/{STORE}/#"
_STORE_BC = f"bc/storelens/{STORE}/#"
# The policy, written from the issue, not from the ACL file: a kiosk is only itself, in its own store.
IDENTITIES = [
    _kiosk("kioskA", "kA", "kA"),
    _kiosk("kioskB", "kB", "kB"),
    Identity("kioskC-other-store", "kC", "pw-kiosk-c", "kC"),  # its login lives on s043's broker only
    Identity("dashboard", "dashboard", PASSWORDS["dashboard"], "dash-1", reads=(_STORE_DT, _STORE_BC),
             transport="websockets"),
    Identity("ops", "ops", PASSWORDS["ops"], "fleet-1",
             reads=(_STORE_DT, f"cmd/storelens/{STORE}/#", _STORE_BC, "homeassistant/#"),
             writes=(f"cmd/storelens/{STORE}/#", _STORE_BC)),
    # Its birth message; it reads its store's bc/ through the kiosk pattern lines, which apply to every user.
    Identity("homeassistant", "homeassistant", PASSWORDS["homeassistant"], "ha-1",
             reads=(_STORE_DT, "homeassistant/#", _STORE_BC), writes=("homeassistant/status",)),
    Identity("anonymous", None, None, "anon"),
    Identity("wrong-password", "kA", "not-the-password", "kA"),
    _kiosk("kioskA-as-kB", "kA", "kB"),
    *(_kiosk(f"kioskA-id-{tag}", "kA", cid)
      for tag, cid in (("plus", "k+"), ("hash", "k#"), ("slash", "s042/kB"), ("dollar", "$SYS"))),
]


@pytest.fixture(scope="module")
def probe_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreBroker]:
    tmp: Path = tmp_path_factory.mktemp("broker-probe")
    with run_store_broker(tmp, {**PASSWORDS, SUPER: SUPER_PW}, acl_extra=SUPER_ACL) as sb:
        yield sb


@pytest.fixture(scope="module")
def watcher(probe_broker: StoreBroker) -> Iterator[Peer]:
    """The superuser: it has seeded a retained message on every probed topic and sees every publish."""
    su = Peer("127.0.0.1", probe_broker.port, SUPER, SUPER, SUPER_PW).connect()
    try:
        for topic in PROBED:
            assert su.publish(topic, f"seed:{topic}".encode(), retain=True).value < 128, topic
        assert su.subscribe("#").value < 128
        assert su.subscribe("$SYS/#").value < 128
        assert su.wait_for(SYS_TOPIC) is not None, "the superuser cannot see $SYS: the probe would be blind"
        yield su
    finally:
        su.close()


def _barrier(su: Peer, reader: Peer | None, tag: str) -> None:
    """A marker published after the batch reached ``reader`` (or the superuser): the batch is delivered."""
    payload = f"marker:{tag}".encode()
    assert su.publish(MARKER, payload).value < 128
    assert (reader or su).wait_for_payload(payload) is not None, f"marker {tag} not delivered"


def _allowed(filters: tuple[str, ...], topic: str) -> bool:
    return any(topic_matches_sub(f, topic) for f in filters)


def _connect(sb: StoreBroker, who: Identity) -> Peer:
    port = sb.ws_port if who.transport == "websockets" else sb.port
    ws = who.transport == "websockets"  # the shipped websockets listener is TLS (wss)
    return Peer("127.0.0.1", port, who.client_id, who.username, who.password,
                transport="websockets" if ws else "tcp", tls_ca=str(sb.ca) if ws else None).connect()


@pytest.mark.parametrize("who", IDENTITIES, ids=lambda i: i.name)
def test_identity_may_do_exactly_what_the_policy_grants(
    who: Identity, probe_broker: StoreBroker, watcher: Peer, tally: Tally
) -> None:
    """A kiosk forging another kiosk's or store's telemetry or reading its commands, the dashboard writing,
    a login picking another's client id or a wildcard id, or anyone reading $SYS must all be refused."""
    family = f"broker:{who.name}"
    if not who.can_connect:
        with pytest.raises(ConnectionRefusedError):
            _connect(probe_broker, who).close()
        tally.record(family, "refused")
        return
    peer = _connect(probe_broker, who)
    try:
        wrong: list[str] = []
        # Reads: exact subscriptions to every probed topic (seeded retained), $SYS, and the wildcards.
        for topic in [*PROBED, SYS_TOPIC, "#", "$SYS/#"]:
            peer.subscribe(topic)  # mosquitto acks and filters at delivery: only deliveries count
        assert peer.subscribe(MARKER).value < 128
        _barrier(watcher, peer, f"read-{who.name}")
        got = {m.topic for m in peer.messages if m.retain}
        for topic in [*PROBED, SYS_TOPIC]:
            expected = _allowed(who.reads, topic)
            if (topic in got) != expected:
                wrong.append(f"read {topic}: {'delivered' if topic in got else 'not delivered'}")
            if not expected:
                tally.record(family, "accepted" if topic in got else "refused")
        # Writes: every probed topic, seen (or not) by the superuser, then a barrier.
        before = len(watcher.messages)
        for topic in [*PROBED, "$SYS/broker/probe"]:
            peer.publish(topic, f"forge:{who.name}:{topic}".encode())
        _barrier(watcher, None, f"write-{who.name}")
        forged = f"forge:{who.name}:".encode()
        seen = {m.topic for m in watcher.messages[before:] if m.payload.startswith(forged)}
        for topic in [*PROBED, "$SYS/broker/probe"]:
            expected = _allowed(who.writes, topic)
            if (topic in seen) != expected:
                wrong.append(f"write {topic}: {'delivered' if topic in seen else 'refused'}")
            if not expected:
                tally.record(family, "accepted" if topic in seen else "refused")
        assert not wrong, f"{who.name} against the policy: " + "; ".join(wrong)
    finally:
        peer.close()


@pytest.mark.parametrize("listener", ["loopback", "tls", "websockets"])
def test_no_login_can_take_over_a_connected_kiosk(
    listener: str, probe_broker: StoreBroker, watcher: Peer, tally: Tally
) -> None:
    """Kiosk A (or the dashboard, whose password any staff page shows) connecting with kiosk B's client id
    must not drop B nor fire B's 'offline' last will: they would take each other down in a loop."""
    sb = probe_broker
    will = Status(kiosk="kB", store=STORE, state=KioskState.OFFLINE, reason="lwt").to_bytes()
    b = Peer("127.0.0.1", sb.tls_port, "kB", "kB", PASSWORDS["kB"], tls_ca=str(sb.ca),
             will=(B.status, will)).connect()
    try:
        user = "dashboard" if listener == "websockets" else "kA"
        port = {"loopback": sb.port, "tls": sb.tls_port, "websockets": sb.ws_port}[listener]
        intruder = Peer("127.0.0.1", port, "kB", user, PASSWORDS[user],
                        transport="websockets" if listener == "websockets" else "tcp",
                        tls_ca=str(sb.ca) if listener in ("tls", "websockets") else None).connect()
        intruder.close()
        # B is still connected: its publish is acked and reaches the watcher after the intruder came and went.
        alive = f"alive:{listener}".encode()
        assert b.publish(B.health, alive).value < 128
        assert watcher.wait_for_payload(alive) is not None, "kiosk B was dropped"
        dropped = [m for m in watcher.messages if m.payload == will]
        tally.record(f"broker:takeover-{listener}", "accepted" if dropped else "refused")
        assert not dropped, "kiosk B's last will fired: its session was taken over"
    finally:
        b.close()

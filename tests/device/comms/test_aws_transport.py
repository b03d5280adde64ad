"""The awsiotsdk MQTT5 path (AWS IoT Core's mTLS) against mosquitto's client-certificate listener."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from device.comms import Comms, Outbox, Transport
from device.comms.aws_transport import AwsIotTransport
from device.comms.paho_transport import PahoTransport
from storelens.protocol import KioskState, Status, Topics
from tests.device.comms.helpers import Collector
from tests.support.mosquitto import Mosquitto

pytestmark = pytest.mark.integration


def test_mtls_connect_publish_subscribe(tls_broker: Mosquitto) -> None:
    """Guards: the IoT Core transport never exercised before a real device (mTLS, PUBACK, inbound)."""
    assert tls_broker.pki is not None
    pair = tls_broker.pki.issue("kiosk-aws")
    t = AwsIotTransport("localhost", tls_broker.tls_port, "kiosk-aws", pair.cert, pair.key, tls_broker.pki.ca)
    assert isinstance(t, Transport)
    got: list[tuple[str, bytes, bool]] = []
    seen = threading.Event()
    watcher = Collector(tls_broker.port, ["aws/out"])
    try:
        t.connect(will=("aws/status", b"offline"), timeout_s=10)
        assert t.connected

        def on_message(topic: str, payload: bytes, retained: bool) -> None:
            got.append((topic, payload, retained))
            seen.set()

        t.subscribe("aws/in", on_message)
        assert t.publish("aws/out", b"hello", qos=1, retain=False, timeout_s=5), "QoS 1 acked"
        assert watcher.wait_for(lambda m: m == [("aws/out", b"hello", False)])
        # SUBSCRIBE is asynchronous; a retained message reaches it even if it lands after the publish
        assert t.publish("aws/in", b"ping", qos=1, retain=True, timeout_s=5)
        assert seen.wait(10)
        assert got[0][:2] == ("aws/in", b"ping")
    finally:
        t.close()
        watcher.close()
    assert not t.connected


def test_comms_over_aws_transport(tls_broker: Mosquitto, tmp_path: Path) -> None:
    """Guards: Comms depending on something only the paho adapter does (status, events via MQTT5)."""
    assert tls_broker.pki is not None
    pair = tls_broker.pki.issue("kiosk-aws2")
    topics = Topics("store1", "kiosk-aws2")
    watcher = Collector(tls_broker.port, [topics.status, topics.match])
    box = Outbox(tmp_path / "o.db")
    t = AwsIotTransport(
        "localhost", tls_broker.tls_port, "kiosk-aws2", pair.cert, pair.key, tls_broker.pki.ca
    )
    comms = Comms(t, box, topics, app_version="1.0")
    comms.start(Status(kiosk="kiosk-aws2", store="store1", state=KioskState.ONLINE))
    for i in range(20):
        comms.publish_event(topics.match, b'{"seq":%d}' % i)
    try:
        assert watcher.wait_for(lambda m: len([x for x in m if x[0] == topics.match]) == 20)
        assert any(b'"online"' in p for p in watcher.payloads(topics.status))
    finally:
        comms.stop()
        watcher.close()
    assert watcher.payloads(topics.status)[-1].count(b'"offline"') == 1
    assert box.depth == 0
    box.close()


def test_client_without_certificate_is_refused(tls_broker: Mosquitto) -> None:
    """Guards: a TLS listener that lets a client in without a certificate."""
    assert tls_broker.pki is not None
    t = PahoTransport(
        f"mqtts://localhost:{tls_broker.tls_port}", "no-cert", ca=str(tls_broker.pki.ca), reconnect_min_s=5.0
    )
    t.connect(will=None, timeout_s=1.0)
    assert not t.connected
    t.close()


def test_aws_client_with_foreign_certificate_is_refused(tls_broker: Mosquitto, tmp_path: Path) -> None:
    """Guards: a certificate from another CA being accepted."""
    from tests.support.pki import TestPKI

    assert tls_broker.pki is not None
    other = TestPKI(tmp_path / "other").issue("intruder")
    t = AwsIotTransport(
        "localhost",
        tls_broker.tls_port,
        "intruder",
        other.cert,
        other.key,
        tls_broker.pki.ca,
        reconnect_min_ms=5000,
    )
    t.connect(will=None, timeout_s=1.0)
    assert not t.connected
    t.close()

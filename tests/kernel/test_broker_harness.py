"""The broker fixtures themselves: real mosquitto listeners answer on plain, TLS+mTLS and websockets."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from tests.support.mosquitto import Mosquitto

pytestmark = pytest.mark.integration


def _roundtrip(client: mqtt.Client, host: str, port: int) -> bytes:
    got = threading.Event()
    box: list[bytes] = []

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        box.append(msg.payload)
        got.set()

    subscribed = threading.Event()
    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.set()
    client.connect(host, port)
    client.loop_start()
    try:
        client.subscribe("t/x", qos=1)
        assert subscribed.wait(5)
        client.publish("t/x", b"hello", qos=1).wait_for_publish(5)
        assert got.wait(5)
    finally:
        client.disconnect()
        client.loop_stop()
    return box[0]


def test_plain_listener(broker: Mosquitto) -> None:
    assert _roundtrip(mqtt.Client(mqtt.CallbackAPIVersion.VERSION2), "127.0.0.1", broker.port) == b"hello"


def test_websockets_listener(ws_broker: Mosquitto) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, transport="websockets")
    assert _roundtrip(c, "127.0.0.1", ws_broker.ws_port) == b"hello"


def test_tls_listener_requires_client_certificate(tls_broker: Mosquitto) -> None:
    """Guards a TLS listener that silently accepts clients without a certificate."""
    assert tls_broker.pki is not None
    pair = tls_broker.pki.issue("kiosk-1")
    good = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    good.tls_set(ca_certs=str(tls_broker.pki.ca), certfile=str(pair.cert), keyfile=str(pair.key))
    assert _roundtrip(good, "localhost", tls_broker.tls_port) == b"hello"
    bad = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    bad.tls_set(ca_certs=str(tls_broker.pki.ca))
    connected, failed = threading.Event(), threading.Event()
    bad.on_connect = lambda _c, _u, _f, rc, _p: (connected if not rc.is_failure else failed).set()
    bad.on_disconnect = lambda *_a: failed.set()
    bad.on_connect_fail = lambda *_a: failed.set()
    try:
        bad.connect("localhost", tls_broker.tls_port)
    except (ssl.SSLError, OSError):
        failed.set()
    bad.loop_start()
    try:
        assert failed.wait(5), "a client without a certificate was not refused"
        assert not connected.is_set()
    finally:
        bad.disconnect()
        bad.loop_stop()


def test_start_returns_once_every_listener_accepts(tmp_path: Path) -> None:
    """start() waits for the broker's own "running" line, logged after it opened all its listeners."""
    broker = Mosquitto(tmp_path, tls=True, websockets=True).start()
    try:
        for port in (broker.port, broker.tls_port, broker.ws_port):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()  # no retry: open already
    finally:
        broker.stop()


def test_a_broker_that_cannot_start_is_reported_with_its_own_words(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        broker = Mosquitto(tmp_path, port=taken.getsockname()[1])
        with pytest.raises(RuntimeError, match=r"mosquitto exited with .*Address already in use"):
            broker.start()
    finally:
        taken.close()

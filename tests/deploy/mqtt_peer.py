"""A paho MQTT v5 test peer that records acks and messages and waits on them without sleeping."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

WAIT_S = 10.0  # generous for a loaded 2-core CI box; waits end early on the event


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool


@dataclass
class Peer:
    """One connected client; `publish`/`subscribe` return the broker's reason codes."""

    host: str
    port: int
    client_id: str
    username: str | None = None
    password: str | None = None
    transport: Literal["tcp", "websockets"] = "tcp"
    tls_ca: str | None = None
    will: tuple[str, bytes] | None = None
    on_message_fn: Callable[[str, bytes], object] | None = None  # runs on paho's thread: must not block
    messages: list[Received] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _acks: dict[int, list[ReasonCode]] = field(default_factory=dict)
    _connected: threading.Event = field(default_factory=threading.Event)
    _connect_rc: ReasonCode | None = None
    client: mqtt.Client | None = None

    def connect(self) -> Peer:
        """Connect and wait for CONNACK; raises if the broker refuses."""
        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5,
            transport=self.transport,
        )
        if self.username is not None:
            c.username_pw_set(self.username, self.password)
        if self.tls_ca is not None:
            c.tls_set(ca_certs=self.tls_ca)
        if self.will is not None:
            c.will_set(self.will[0], self.will[1], qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        self.client = c
        c.connect(self.host, self.port, keepalive=30)
        c.loop_start()
        if not self._connected.wait(WAIT_S):
            self.close()
            raise TimeoutError(f"{self.client_id}: no CONNACK")
        if self._connect_rc is not None and self._connect_rc.is_failure:
            self.close()
            raise ConnectionRefusedError(f"{self.client_id}: {self._connect_rc}")
        return self

    def close(self) -> None:
        """Disconnect cleanly and stop the network thread."""
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> ReasonCode:
        """QoS 1 publish; the PUBACK reason code (135 'Not authorized' when the ACL refuses)."""
        assert self.client is not None
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        return self._wait_ack(info.mid)[0]

    def subscribe(self, topic: str) -> ReasonCode:
        """QoS 1 subscribe; the SUBACK reason code (0x87 when the ACL refuses)."""
        assert self.client is not None
        _, mid = self.client.subscribe(topic, qos=1)
        assert mid is not None
        return self._wait_ack(mid)[0]

    def wait_for(self, topic: str, timeout_s: float = WAIT_S) -> Received | None:
        """The first message received on ``topic``, or None after ``timeout_s``."""
        with self._cond:
            self._cond.wait_for(lambda: any(m.topic == topic for m in self.messages), timeout_s)
            return next((m for m in self.messages if m.topic == topic), None)

    def publish_nowait(self, topic: str, payload: bytes, retain: bool) -> None:
        """QoS 1 publish without waiting for the ack (safe from paho's own callbacks)."""
        assert self.client is not None
        self.client.publish(topic, payload, qos=1, retain=retain)

    def count(self, topic: str) -> int:
        """How many messages arrived on ``topic`` so far."""
        with self._cond:
            return sum(m.topic == topic for m in self.messages)

    def wait_count(self, topic: str, n: int, timeout_s: float = WAIT_S) -> bool:
        """Wait until at least ``n`` messages arrived on ``topic``."""
        with self._cond:
            return self._cond.wait_for(lambda: sum(m.topic == topic for m in self.messages) >= n, timeout_s)

    def wait_match(self, topic: str, pred: Callable[[bytes], bool], timeout_s: float = WAIT_S) -> bool:
        """Wait until a message on ``topic`` whose payload satisfies ``pred`` has arrived."""
        with self._cond:
            return self._cond.wait_for(
                lambda: any(m.topic == topic and pred(m.payload) for m in self.messages), timeout_s
            )

    def wait_for_payload(self, payload: bytes, timeout_s: float = WAIT_S) -> Received | None:
        """The first message received with exactly ``payload``, or None after ``timeout_s``."""
        with self._cond:
            self._cond.wait_for(lambda: any(m.payload == payload for m in self.messages), timeout_s)
            return next((m for m in self.messages if m.payload == payload), None)

    def _wait_ack(self, mid: int) -> list[ReasonCode]:
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._acks, WAIT_S):
                raise TimeoutError(f"{self.client_id}: no ack for mid {mid}")
            return self._acks.pop(mid)

    def _on_connect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self._connect_rc = rc
        self._connected.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        if self.on_message_fn is not None:
            self.on_message_fn(msg.topic, payload)
        with self._cond:
            self.messages.append(Received(msg.topic, payload, bool(msg.retain)))
            self._cond.notify_all()

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        with self._cond:
            self._acks[mid] = [rc]
            self._cond.notify_all()

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, rcs: list[ReasonCode], _p: Any) -> None:
        with self._cond:
            self._acks[mid] = list(rcs)
            self._cond.notify_all()

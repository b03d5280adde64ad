"""awsiotsdk MQTT5 adapter for AWS IoT Core: mTLS with the thing's certificate; CRT reconnects itself."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from pathlib import Path
from typing import Any

from awscrt import mqtt5
from awsiot import mqtt5_client_builder

from device.comms.port import OnConnect, OnMessage, TransportError

_LOGGER = logging.getLogger(__name__)

RECONNECT_MIN_MS = 500  # first retry after a loss
RECONNECT_MAX_MS = 30_000  # cap; CRT adds full jitter
KEEPALIVE_S = 30  # IoT Core accepts 30-1200 s
_STOP_TIMEOUT_S = 5.0


class AwsIotTransport:
    """MQTT5 over mTLS (port 8883) via ``awsiot.mqtt5_client_builder.mtls_from_path``."""

    def __init__(
        self,
        endpoint: str,
        port: int,
        client_id: str,
        cert: str | Path,
        key: str | Path,
        ca: str | Path | None = None,
        *,
        keepalive_s: int = KEEPALIVE_S,
        reconnect_min_ms: int = RECONNECT_MIN_MS,
        reconnect_max_ms: int = RECONNECT_MAX_MS,
    ) -> None:
        for what, path in (("certificate", cert), ("private key", key), ("CA", ca)):
            if path is not None and not Path(path).is_file():
                raise TransportError(f"{what} file {path} does not exist")
        self._endpoint, self._port, self._client_id = endpoint, port, client_id
        self._files = (str(cert), str(key), str(ca) if ca is not None else None)
        self._keepalive_s = keepalive_s
        self._reconnect = (reconnect_min_ms, reconnect_max_ms)
        self._lock = threading.Lock()
        self._subs: dict[str, list[OnMessage]] = {}
        self._connected = threading.Event()
        self._stopped = threading.Event()
        self._on_connect: OnConnect | None = None
        self._client: mqtt5.Client | None = None

    def __repr__(self) -> str:
        return f"AwsIotTransport({self._endpoint}:{self._port}, client_id={self._client_id!r})"

    def connect(
        self, *, will: tuple[str, bytes] | None, timeout_s: float, on_connect: OnConnect | None = None
    ) -> None:
        """Build the MQTT5 client with a retained will, start it and wait up to ``timeout_s``."""
        if self._client is not None:
            raise TransportError("connect() called twice")
        self._on_connect = on_connect
        will_packet = (
            mqtt5.PublishPacket(topic=will[0], payload=will[1], qos=mqtt5.QoS.AT_LEAST_ONCE, retain=True)
            if will is not None
            else None
        )
        cert, key, ca = self._files
        try:
            self._client = mqtt5_client_builder.mtls_from_path(
                endpoint=self._endpoint,
                port=self._port,
                cert_filepath=cert,
                pri_key_filepath=key,
                ca_filepath=ca,
                client_id=self._client_id,
                keep_alive_interval_sec=self._keepalive_s,
                will=will_packet,
                session_behavior=mqtt5.ClientSessionBehaviorType.CLEAN,
                # the outbox is the queue: nothing waits in CRT's memory across a disconnect
                offline_queue_behavior=mqtt5.ClientOperationQueueBehaviorType.FAIL_ALL_ON_DISCONNECT,
                retry_jitter_mode=mqtt5.ExponentialBackoffJitterMode.FULL,
                min_reconnect_delay_ms=self._reconnect[0],
                max_reconnect_delay_ms=self._reconnect[1],
                on_publish_received=self._handle_publish,
                on_lifecycle_connection_success=self._handle_success,
                on_lifecycle_connection_failure=self._handle_failure,
                on_lifecycle_disconnection=self._handle_disconnection,
                on_lifecycle_stopped=self._handle_stopped,
            )
        except Exception as exc:  # CRT raises its own error types for unreadable files
            raise TransportError(f"cannot build MQTT5 client for {self._client_id}: {exc}") from exc
        self._client.start()
        if not self._connected.wait(timeout_s):
            _LOGGER.warning("%r not connected after %.1f s; retrying in the background", self, timeout_s)

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool, timeout_s: float) -> bool:
        """Publish and wait for the PUBACK (QoS 1) or the write (QoS 0); False when not connected."""
        client = self._client
        if client is None or not self._connected.is_set():
            return False
        packet = mqtt5.PublishPacket(topic=topic, payload=payload, qos=mqtt5.QoS(qos), retain=retain)
        try:
            result = client.publish(packet).result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            return False
        except Exception as exc:  # CRT fails pending operations on disconnect with its own errors
            _LOGGER.debug("publish to %s failed: %s", topic, exc)
            return False
        if qos == 0:
            return True
        code = getattr(result.puback, "reason_code", None)
        ok = code in (mqtt5.PubackReasonCode.SUCCESS, mqtt5.PubackReasonCode.NO_MATCHING_SUBSCRIBERS)
        if not ok:
            _LOGGER.warning("broker refused publish to %s: %s", topic, code)
        return ok

    def subscribe(self, topic: str, on_message: OnMessage) -> None:
        """Subscribe at QoS 1 now (if connected) and after every reconnect (clean sessions)."""
        with self._lock:
            first = topic not in self._subs
            self._subs.setdefault(topic, []).append(on_message)
        if first and self._connected.is_set():
            self._send_subscribe([topic])

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def close(self) -> None:
        """Stop with a DISCONNECT packet (so the broker drops the will) and wait for the client to stop."""
        client, self._client = self._client, None
        if client is None:
            return
        client.stop(mqtt5.DisconnectPacket(reason_code=mqtt5.DisconnectReasonCode.NORMAL_DISCONNECTION))
        if not self._stopped.wait(_STOP_TIMEOUT_S):
            _LOGGER.warning("%r did not report stopped within %.1f s", self, _STOP_TIMEOUT_S)
        self._connected.clear()

    def _send_subscribe(self, topics: list[str]) -> None:
        client = self._client
        if client is None:
            return
        for i in range(0, len(topics), 8):  # IoT Core: at most 8 filters per SUBSCRIBE
            subs = [
                mqtt5.Subscription(topic_filter=t, qos=mqtt5.QoS.AT_LEAST_ONCE) for t in topics[i : i + 8]
            ]
            client.subscribe(mqtt5.SubscribePacket(subscriptions=subs))

    # -- CRT callbacks (CRT event-loop thread) --
    def _handle_success(self, data: Any) -> None:
        self._connected.set()
        _LOGGER.info("%r connected", self)
        with self._lock:
            topics = list(self._subs)
        if topics:
            self._send_subscribe(topics)
        if self._on_connect is not None:
            try:
                self._on_connect()
            except Exception:
                _LOGGER.exception("on_connect callback failed")

    def _handle_failure(self, data: Any) -> None:
        _LOGGER.warning("%r connection attempt failed: %s", self, getattr(data, "exception", data))

    def _handle_disconnection(self, data: Any) -> None:
        self._connected.clear()
        _LOGGER.warning("%r disconnected: %s", self, getattr(data, "exception", data))

    def _handle_stopped(self, data: Any) -> None:
        self._connected.clear()
        self._stopped.set()

    def _handle_publish(self, data: mqtt5.PublishReceivedData) -> None:
        packet = data.publish_packet
        topic = str(packet.topic)
        with self._lock:
            handlers = [h for t, hs in self._subs.items() if _matches(t, topic) for h in hs]
        for h in handlers:
            try:
                h(topic, bytes(packet.payload or b""), bool(packet.retain))
            except Exception:
                _LOGGER.exception("handler for %s failed", topic)


def _matches(sub: str, topic: str) -> bool:
    """MQTT topic filter match ('+' one level, '#' the rest)."""
    s, t = sub.split("/"), topic.split("/")
    for i, part in enumerate(s):
        if part == "#":
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(s) == len(t)

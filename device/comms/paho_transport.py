"""paho-mqtt adapter for a store broker (mosquitto): username/password and TLS, reconnect with jitter."""

from __future__ import annotations

import logging
import random
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from device.comms.port import OnConnect, OnMessage, TransportError

_LOGGER = logging.getLogger(__name__)

KEEPALIVE_S = 30  # broker notices a dead kiosk (and sends the will) after 1.5x this
RECONNECT_MIN_S = 0.5  # first retry; short so a broker restart costs little
RECONNECT_MAX_S = 30.0  # cap: a fleet of kiosks must not hammer a recovering broker
MAX_INFLIGHT = 20  # paho's window of unacked QoS 1 publishes


class _JitterClient(mqtt.Client):
    """paho's reconnect backoff has no jitter and sleeps in 1 s steps; this wait has both fixed.

    Overrides paho 2.x's one backoff hook (``_reconnect_wait``, called by ``loop_forever``).
    """

    def __init__(
        self, *args: Any, min_s: float, max_s: float, wake: threading.Event,
        on_fail: Callable[[OSError], None], **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._sl_min_s, self._sl_max_s, self._sl_wake = min_s, max_s, wake
        self._sl_on_fail = on_fail
        self._sl_delay_s = 0.0

    def reconnect(self) -> MQTTErrorCode:
        # paho's loop swallows a failed (re)connect (TLS handshake included) without saying why: say it
        try:
            return super().reconnect()
        except OSError as exc:
            self._sl_on_fail(exc)
            raise

    def reset_backoff(self) -> None:
        self._sl_delay_s = 0.0

    def _reconnect_wait(self) -> None:
        self._sl_delay_s = min(self._sl_max_s, max(self._sl_min_s, self._sl_delay_s * 2))
        wait_s = self._sl_delay_s * random.uniform(0.5, 1.5)  # jitter: spread a fleet's reconnects
        _LOGGER.debug("mqtt reconnect in %.2f s", wait_s)
        self._sl_wake.wait(wait_s)


def describe_tls_alert(text: str) -> str | None:
    """A broker's TLS alert about our certificate (expired, unknown CA) as one line; None if not one."""
    m = re.search(r"alert[ _a-z0-9]*", text.lower())
    if m is None:
        return None
    alert = m.group(0).replace("_", " ").strip()
    return f"TLS: the broker refused the client certificate ({alert}); check broker.cert/key"


def describe_connect_error(exc: OSError, *, tls: bool) -> str:
    """One line for a failed connect: an untrusted broker certificate, a TLS alert, a closed socket."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: broker certificate not trusted ({exc.verify_message}); check broker.ca"
    if isinstance(exc, ssl.SSLEOFError):
        return "TLS handshake failed: the broker closed the connection (not a TLS listener?)"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or str(exc)).lower().replace("_", " ")
        return describe_tls_alert(reason) or f"TLS handshake failed: {reason}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listening on that port?)"
    if isinstance(exc, ConnectionError):
        what = "TLS handshake failed" if tls else "connection lost during connect"
        return f"{what}: {(exc.strerror or str(exc)).lower()} (the broker dropped the connection)"
    return f"cannot connect: {exc.strerror or exc}"


class PahoTransport:
    """``mqtt://host:port`` or ``mqtts://host:port`` (TLS; client cert optional) via paho-mqtt 2.x."""

    def __init__(
        self,
        url: str,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        *,
        keepalive_s: int = KEEPALIVE_S,
        reconnect_min_s: float = RECONNECT_MIN_S,
        reconnect_max_s: float = RECONNECT_MAX_S,
    ) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
            raise TransportError(
                f"broker url must be mqtt://host:port or mqtts://host:port, got {parsed.scheme}://"
            )
        self._tls = parsed.scheme == "mqtts"
        self._host = parsed.hostname
        self._port = parsed.port or (8883 if self._tls else 1883)
        self._keepalive_s = keepalive_s
        self._client_id = client_id
        self._closing = threading.Event()
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self._subs: dict[str, list[OnMessage]] = {}
        self._on_connect: OnConnect | None = None
        self._started = False
        self._last_error: str | None = None  # why the last attempt failed; None once connected
        self._sock_error: str | None = None  # paho's last socket error (it only logs it)
        self._client = _JitterClient(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=True,
            min_s=reconnect_min_s,
            max_s=reconnect_max_s,
            wake=self._closing,
            on_fail=lambda exc: self._fail(describe_connect_error(exc, tls=self._tls)),
        )
        self._client.max_inflight_messages_set(MAX_INFLIGHT)
        if username is not None:
            self._client.username_pw_set(username, password)
        if self._tls:
            try:
                self._client.tls_set(ca_certs=ca, certfile=cert, keyfile=key, cert_reqs=ssl.CERT_REQUIRED)
            except (OSError, ValueError) as exc:
                raise TransportError(f"cannot load TLS files for {client_id}: {exc}") from exc
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message
        self._client.on_log = self._handle_log

    def __repr__(self) -> str:  # never shows the password
        scheme = "mqtts" if self._tls else "mqtt"
        return f"PahoTransport({scheme}://{self._host}:{self._port}, client_id={self._client_id!r})"

    def connect(
        self, *, will: tuple[str, bytes] | None, timeout_s: float, on_connect: OnConnect | None = None
    ) -> None:
        """Start paho's network thread (it reconnects by itself) and wait up to ``timeout_s``."""
        if self._started:
            raise TransportError("connect() called twice")
        self._on_connect = on_connect
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        self._client.connect_async(self._host, self._port, keepalive=self._keepalive_s)
        self._started = True
        self._client.loop_start()
        if not self._connected.wait(timeout_s):
            _LOGGER.warning("%r not connected after %.1f s; retrying in the background", self, timeout_s)

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool, timeout_s: float) -> bool:
        """Publish and wait for the PUBACK (QoS 1) or the write (QoS 0); False when not connected."""
        if not self._connected.is_set():
            return False  # paho would queue it in memory: the outbox is our queue
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
        except (ValueError, OSError) as exc:
            _LOGGER.warning("publish to %s failed: %s", topic, exc)
            return False
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return False
        deadline = time.monotonic() + timeout_s
        # wait_for_publish has no wake-up on disconnect: wait in short slices so a loss returns early
        while not info.is_published():
            left = deadline - time.monotonic()
            if left <= 0 or not self._connected.is_set() or self._closing.is_set():
                return False
            try:
                info.wait_for_publish(min(left, 0.05))
            except (RuntimeError, ValueError):
                return False
        return True

    def subscribe(self, topic: str, on_message: OnMessage) -> None:
        """Subscribe at QoS 1 now (if connected) and after every reconnect."""
        with self._lock:
            first = topic not in self._subs
            self._subs.setdefault(topic, []).append(on_message)
        if first and self._connected.is_set():
            self._client.subscribe(topic, qos=1)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def last_error(self) -> str | None:
        """Why the broker is not reachable (refused login, TLS failure), None while connected."""
        return self._last_error

    def _fail(self, problem: str) -> None:
        """Record a failed attempt: logged once per distinct problem (retries repeat it at debug level)."""
        with self._lock:
            new, self._last_error = problem != self._last_error, problem
        if self._closing.is_set():
            return
        if new:
            _LOGGER.error("%r cannot connect: %s (retrying with backoff)", self, problem)
        else:
            _LOGGER.debug("%r still cannot connect: %s", self, problem)

    def close(self) -> None:
        """Send DISCONNECT (the broker then drops the will) and stop the network thread."""
        self._closing.set()
        if self._started:
            if self._connected.is_set():
                self._client.disconnect()
            self._client.loop_stop()
        self._connected.clear()

    # -- paho callbacks (paho's network thread) --
    def _handle_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if reason.is_failure:
            self._fail(f"broker refused the connection: {str(reason).lower()}; check broker.username, "
                       "the password and broker.client_id")
            return
        sock = client.socket()
        if isinstance(sock, socket.socket):  # ssl.SSLSocket is one too
            try:  # paho 2.2 leaves Nagle on: a QoS 1 publish then waits ~40 ms for delayed ACKs
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                _LOGGER.debug("cannot set TCP_NODELAY", exc_info=True)
        self._client.reset_backoff()
        with self._lock:
            topics = list(self._subs)
            recovered, self._last_error, self._sock_error = self._last_error, None, None
        if recovered is not None:
            _LOGGER.warning("%r connected after: %s", self, recovered)
        if topics:
            client.subscribe([(t, 1) for t in topics])
        self._connected.set()
        _LOGGER.info("%r connected", self)
        if self._on_connect is not None:
            try:
                self._on_connect()
            except Exception:
                _LOGGER.exception("on_connect callback failed")

    def _handle_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        with self._lock:
            sock_error, self._sock_error = self._sock_error, None
        if was and not self._closing.is_set():
            _LOGGER.warning("%r lost connection: %s", self, sock_error or reason)
        elif not was and sock_error is not None:  # e.g. a TLS 1.3 server refusing our certificate late
            self._fail(describe_tls_alert(sock_error)
                       or f"connection closed before the broker accepted it: {sock_error}")

    def _handle_log(self, client: mqtt.Client, userdata: Any, level: int, buf: str) -> None:
        if level == mqtt.MQTT_LOG_ERR and "socket" in buf:
            with self._lock:
                self._sock_error = buf

    def _handle_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            handlers = [h for t, hs in self._subs.items() if mqtt.topic_matches_sub(t, msg.topic) for h in hs]
        for h in handlers:
            try:
                h(msg.topic, bytes(msg.payload), bool(msg.retain))
            except Exception:  # a bad handler must not kill paho's network thread
                _LOGGER.exception("handler for %s failed", msg.topic)

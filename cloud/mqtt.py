"""The one cloud MQTT client: catalog publish, fleet and the feedback collector connect through it.

Where and as whom is configured once (``BrokerSettings``): a ``[broker]`` section of a cloud config file
(``--config`` or ``$STORELENS_CONFIG``), then ``STORELENS_BROKER`` / ``STORELENS_MQTT_*`` variables, then
command-line flags, each overriding the one before. The password only ever comes from the environment.

URLs: ``mqtt://`` (1883), ``mqtts://`` (TLS, 8883), ``ws://`` (80) and ``wss://`` (TLS, 443) over
websockets (path ``/mqtt`` unless the URL names one); ``iot://[ENDPOINT]`` is AWS IoT Core's data plane
(``cloud.iot_data``), not MQTT. Every way a connection can fail ends in one ``BrokerError`` line that names
the cause: nothing listening (wrong port), a TLS handshake cut or refused, a broker certificate the CA file
does not vouch for, a login refused, a missing or unreadable TLS file.
"""

from __future__ import annotations

import os
import ssl
import threading
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

CONNECT_TIMEOUT_S = 10.0
PUBACK_TIMEOUT_S = 10.0
KEEPALIVE_S = 30
CONFIG_ENV = "STORELENS_CONFIG"
PASSWORD_ENV = "STORELENS_MQTT_PASSWORD"
# Variable -> BrokerSettings field. Flags override these; these override the config file.
ENV_VARS = {
    "STORELENS_BROKER": "url",
    "STORELENS_MQTT_USERNAME": "username",
    "STORELENS_MQTT_CA": "ca",
    "STORELENS_MQTT_CERT": "cert",
    "STORELENS_MQTT_KEY": "key",
}
# scheme -> default port, paho transport, TLS
_SCHEMES: dict[str, tuple[int, Literal["tcp", "websockets"], bool]] = {
    "mqtt": (1883, "tcp", False),
    "tcp": (1883, "tcp", False),
    "mqtts": (8883, "tcp", True),
    "ssl": (8883, "tcp", True),
    "ws": (80, "websockets", False),
    "wss": (443, "websockets", True),
}
IOT_SCHEME = "iot"
_REFUSED_LOGIN = {4, 5, 0x86, 0x87, 0x8C}  # MQTT 3.1.1 bad credentials / not authorised; v5 equivalents


class BrokerError(Exception):
    """The broker cannot be used: bad URL or TLS file, unreachable, handshake failed, login refused."""


class BrokerSection(BaseModel):
    """The ``[broker]`` section of a cloud config file (paths relative to the file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    url: str | None = None
    username: str | None = None
    password_env: str = PASSWORD_ENV
    ca: str | None = None
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Where and as whom to connect."""

    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @property
    def scheme(self) -> str:
        return urllib.parse.urlsplit(self.url).scheme

    @property
    def is_iot(self) -> bool:
        """AWS IoT Core's data plane (``iot://``), not an MQTT broker."""
        return self.scheme == IOT_SCHEME

    def endpoint(self) -> tuple[str, int, Literal["tcp", "websockets"], bool, str]:
        """(host, port, paho transport, tls, websocket path); BrokerError for a URL we cannot use."""
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in _SCHEMES:
            raise BrokerError(
                f"unsupported broker URL {redact(self.url)!r} (mqtt://host:port, mqtts://, ws://, wss:// or iot://)"
            )
        default_port, transport, tls = _SCHEMES[parts.scheme]
        try:
            port = parts.port or default_port
        except ValueError as exc:
            raise BrokerError(f"bad port in broker URL {redact(self.url)!r}") from exc
        if not parts.hostname:
            raise BrokerError(f"broker URL {redact(self.url)!r} names no host")
        return parts.hostname, port, transport, tls, parts.path or "/mqtt"

    def where(self) -> str:
        """``scheme://host:port`` for messages (never credentials)."""
        if self.is_iot:
            return redact(self.url)
        host, port, _, _, _ = self.endpoint()
        return f"{self.scheme}://{host}:{port}"


def redact(url: str) -> str:
    """The URL without any user:password part."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def load_section(path: Path) -> BrokerSection:
    """The ``[broker]`` section of a cloud config file (empty when the file has none)."""
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise BrokerError(f"config file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BrokerError(f"cannot read config file {path}: {exc}") from exc
    try:
        return BrokerSection.model_validate(doc.get("broker", {}))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BrokerError(f"{path} [broker] {where}: {first['msg']}") from exc


def resolve(
    url: str | None = None,
    *,
    config: Path | None = None,
    username: str | None = None,
    ca: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    password_env: str | None = None,
    environ: Mapping[str, str] | None = None,
    required: bool = True,
) -> BrokerSettings | None:
    """Settings from config file < environment < arguments; None when no URL anywhere and not required."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    cfg_path = config or (Path(env[CONFIG_ENV]) if env.get(CONFIG_ENV) else None)
    section = BrokerSection()
    if cfg_path is not None:
        section = load_section(cfg_path)
        base = cfg_path.parent
        for name in ("url", "username"):
            if getattr(section, name) is not None:
                values[name] = getattr(section, name)
        for name in ("ca", "cert", "key"):
            if getattr(section, name) is not None:
                values[name] = base / Path(getattr(section, name)).expanduser()
    for var, name in ENV_VARS.items():
        if env.get(var):
            values[name] = Path(env[var]) if name in ("ca", "cert", "key") else env[var]
    for name, value in (("url", url), ("username", username), ("ca", ca), ("cert", cert), ("key", key)):
        if value is not None:
            values[name] = value
    if not values.get("url"):
        if required:
            raise BrokerError("no broker: give --broker URL, STORELENS_BROKER or [broker] url in --config")
        return None
    pw_var = password_env or section.password_env
    password = env.get(pw_var) if values.get("username") is not None else None
    settings = BrokerSettings(password=password, **values)
    check(settings)
    return settings


def check(settings: BrokerSettings) -> None:
    """Fail early, in one line, on a URL we cannot use or a TLS file that is missing or unreadable."""
    if settings.is_iot:
        return
    _, _, _, tls, _ = settings.endpoint()
    if (settings.cert is None) != (settings.key is None):
        raise BrokerError("a client certificate needs both --cert and --key")
    for label, path in (("CA file (--ca)", settings.ca), ("client certificate (--cert)", settings.cert),
                        ("client key (--key)", settings.key)):  # fmt: skip
        if path is None:
            continue
        if not path.is_file():
            raise BrokerError(f"{label} {path} does not exist")
        try:
            path.open("rb").close()
        except OSError as exc:
            raise BrokerError(f"cannot read {label} {path}: {exc.strerror}") from exc
        if not tls:
            raise BrokerError(f"{label} {path} given for {settings.where()}: TLS needs mqtts:// or wss://")


class CloudClient:
    """One paho client built from ``BrokerSettings``; ``connect`` waits for CONNACK or says why not.

    Callers attach their own ``on_message`` / ``on_subscribe`` to ``client``; ``on_connected`` runs (on
    paho's thread) after every accepted CONNACK (with the session-present flag), so a reconnect can
    subscribe again; ``on_disconnected`` after losing an accepted connection (paho reconnects by itself).
    """

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        client_id: str,
        clean_session: bool = True,
        manual_ack: bool = False,
        mqtt5: bool = True,
        on_connected: Callable[[Any, bool], None] | None = None,
        on_disconnected: Callable[[Any], None] | None = None,
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        if settings.is_iot:
            raise BrokerError(f"{settings.where()} is AWS IoT Core's data plane, not an MQTT broker")
        self.settings = settings
        self._host, self._port, transport, self._tls, ws_path = settings.endpoint()
        self._mqtt5 = mqtt5
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self._connack = threading.Event()
        self._closed_early = threading.Event()
        self._settled = threading.Event()  # CONNACK (either way) or the connection closed first
        self._refusal: str | None = None
        self._cond = threading.Condition()
        self._acks: dict[int, Any] = {}  # mid -> PUBACK reason code (None for MQTT 3.1.1)
        kwargs: dict[str, Any] = {"protocol": mqtt.MQTTv5} if mqtt5 else {
            "protocol": mqtt.MQTTv311, "clean_session": clean_session}  # fmt: skip
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, transport=transport,
                                  manual_ack=manual_ack, **kwargs)  # fmt: skip
        self._clean_start = clean_session
        if transport == "websockets":
            self.client.ws_set_options(path=ws_path)
        if settings.username is not None:
            self.client.username_pw_set(settings.username, settings.password)
        if self._tls:
            try:
                self.client.tls_set(
                    ca_certs=None if settings.ca is None else str(settings.ca),
                    certfile=None if settings.cert is None else str(settings.cert),
                    keyfile=None if settings.key is None else str(settings.key),
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (OSError, ValueError, ssl.SSLError) as exc:
                raise BrokerError(f"cannot load TLS files for {self.where}: {_ssl_reason(exc)}") from exc
        self.client.reconnect_delay_set(1, 30)
        self.client.on_connect = self._handle_connect
        self.client.on_disconnect = self._handle_disconnect
        self.client.on_publish = self._handle_publish

    @property
    def where(self) -> str:
        return self.settings.where()

    def __repr__(self) -> str:  # never shows the password
        return f"CloudClient({self.where}, user={self.settings.username!r})"

    def connect(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Connect, start paho's network thread, wait for CONNACK; BrokerError naming the cause."""
        import paho.mqtt.client as mqtt

        self.client.connect_timeout = timeout_s
        kwargs: dict[str, Any] = {}
        if self._mqtt5 and not self._clean_start:
            kwargs["clean_start"] = False
        try:
            self.client.connect(self._host, self._port, keepalive=KEEPALIVE_S, **kwargs)
        except ssl.SSLCertVerificationError as exc:
            raise BrokerError(
                f"{self.where}: broker certificate not trusted: {exc.verify_message}"
                f"{'' if self.settings.ca is None else f' (CA file {self.settings.ca})'}"
            ) from exc
        except ssl.SSLError as exc:
            raise BrokerError(f"{self.where}: TLS handshake failed: {_ssl_reason(exc)}"
                              " (a plain MQTT port? a certificate the broker refuses?)") from exc  # fmt: skip
        except ConnectionRefusedError as exc:
            raise BrokerError(f"cannot reach broker {self.where}: connection refused (wrong port?)") from exc
        except mqtt.WebsocketConnectionError as exc:
            raise BrokerError(f"{self.where}: websocket upgrade refused ({exc}): not a websockets port?") \
                from exc
        except (TimeoutError, OSError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            if self._tls and isinstance(exc, ConnectionResetError | BrokenPipeError):
                raise BrokerError(f"{self.where}: TLS handshake failed: the broker hung up ({reason}): "
                                  "a plain MQTT port, or a client certificate it refuses?") from exc
            raise BrokerError(f"cannot reach broker {self.where}: {reason}") from exc
        except ValueError as exc:
            raise BrokerError(f"{self.where}: {exc}") from exc
        self.client.loop_start()
        if not self._settled.wait(timeout_s):
            self.close()
            raise BrokerError(f"{self.where}: no CONNACK within {timeout_s:g} s")
        if self._refusal is not None or not self._connack.is_set():
            self.close()
            hint = (" (a client certificate it refuses: expired, or from another CA?)" if self._tls
                    else " (a TLS port? use mqtts://)")  # fmt: skip
            raise BrokerError(self._refusal or f"{self.where} closed the connection before answering{hint}")

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                timeout_s: float = PUBACK_TIMEOUT_S) -> None:  # fmt: skip
        """Publish and, for QoS 1, wait for PUBACK; BrokerError on no ack or an ACL refusal (MQTT 5)."""
        with self._cond:  # the ack may arrive before publish() returns its mid
            info = self.client.publish(topic, payload, qos=qos, retain=retain)
            if info.rc:
                raise BrokerError(f"{self.where}: cannot publish on {topic}: {info.rc}")
            if qos == 0:
                return
            if not self._cond.wait_for(lambda: info.mid in self._acks, timeout_s):
                raise BrokerError(f"{self.where}: no PUBACK for {topic} within {timeout_s:g} s")
            reason = self._acks.pop(info.mid)
        if reason is not None and reason.is_failure:
            who = f"user {self.settings.username!r}" if self.settings.username else "this login"
            raise BrokerError(f"{self.where} refused {who} publishing on {topic}: {reason} (see the ACL)")

    def close(self) -> None:
        """DISCONNECT and stop the network thread (idempotent)."""
        self.client.disconnect()
        self.client.loop_stop()

    # -- paho callbacks (network thread) --
    def _handle_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            code = int(getattr(reason, "value", 0))
            who = f" as {self.settings.username!r}" if self.settings.username else " without a username"
            why = "bad username or password, or not authorised" if code in _REFUSED_LOGIN else str(reason)
            self._refusal = f"{self.where} refused the login{who}: {why}"
            self._closed_early.set()
            self._settled.set()
            client.disconnect()
            return
        self._connack.set()
        self._settled.set()
        if self._on_connected is not None:
            self._on_connected(client, bool(getattr(flags, "session_present", False)))

    def _handle_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._cond:
            self._acks[mid] = reason if self._mqtt5 else None
            self._cond.notify_all()

    def _handle_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not self._connack.is_set():
            self._closed_early.set()
            self._settled.set()
        elif self._on_disconnected is not None:
            self._on_disconnected(reason)


def _ssl_reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason) if reason else str(exc).strip() or type(exc).__name__


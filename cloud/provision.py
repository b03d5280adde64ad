"""Provisioning a store broker: CA, server certificate, logins, password file and ACL, as the shipped
``deploy/mosquitto`` config expects them, plus each client's credentials.

Output folder (nothing outside it is touched; secrets are 0600, the folder 0700):

    broker/conf.d/storelens.conf       -> /etc/mosquitto/conf.d/
    broker/storelens/{acl,passwd}      -> /etc/mosquitto/storelens/  (root:mosquitto 0640)
    broker/storelens/tls/{ca.crt,server.crt,server.key}
    ca/{ca.crt,ca.key}                 the store CA; keep ca.key offline (it signs broker certificates)
    kiosks/<kiosk>/{kiosk.env,ca.pem,broker.toml}   -> /etc/storelens/ on that kiosk
    cloud/{cloud.toml,ops.env,feedback.env,dashboard.env,ca.pem}   for storelens catalog|fleet|feedback

Logins: one per kiosk (username = kiosk id, its client id on the broker), ``ops`` (announcements and
commands: what the cloud commands log in as), ``dashboard`` (read-only), ``collector`` (feedback only),
and ``homeassistant`` when asked. Passwords are random and stored hashed as mosquitto 2.0 does
(PBKDF2-SHA512, ``$7$``), so ``mosquitto_passwd`` is not needed.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from storelens.protocol import ProtocolError, check_id

SERVICE_USERS = ("ops", "dashboard", "collector")
RESERVED = frozenset({*SERVICE_USERS, "homeassistant"})  # the ACL's named users: never a kiosk id
PBKDF2_ITERATIONS = 101  # mosquitto_passwd 2.0's own default for $7$ hashes
CA_DAYS = 3650
SERVER_DAYS = 825  # the longest validity browsers and most TLS stacks still accept for a leaf
TLS_PORT = 8883


class ProvisionError(Exception):
    """Bad input (store or kiosk id, host name), a missing template, or an output folder in the way."""


@dataclass(frozen=True, slots=True)
class Provisioned:
    """What was written; ``passwords`` never appears in repr."""

    out: Path
    store: str
    kiosks: tuple[str, ...]
    broker_url: str
    passwords: dict[str, str] = field(repr=False)


def mosquitto_hash(password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """A mosquitto 2.0 password-file hash: ``$7$<iterations>$<b64 salt>$<b64 PBKDF2-SHA512>``."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, dklen=64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


_CA_USAGE = x509.KeyUsage(
    digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
    key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
)


def _ca(store: str, now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"StoreLens store CA {store}")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return key, cert


def _server(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, hosts: Sequence[str],
            now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    return key, cert


def _check_host(h: str) -> str:
    try:
        ipaddress.ip_address(h)
        return h
    except ValueError:
        pass
    labels = h.rstrip(".").split(".")
    if not h or len(h) > 253 or not all(0 < len(x) <= 63 and x.replace("-", "").isalnum() for x in labels):
        raise ProvisionError(f"{h!r} is not a host name or IP address")
    return h


def check_kiosk_ids(kiosks: Sequence[str]) -> tuple[str, ...]:
    """Kiosk ids usable as broker logins: ``[A-Za-z0-9_-]``, at most 64, unique, not a service login."""
    seen: list[str] = []
    for k in kiosks:
        try:
            check_id(k, "kiosk id")
        except ProtocolError as exc:
            raise ProvisionError(str(exc)) from exc
        if k in RESERVED:
            raise ProvisionError(f"kiosk id {k!r} is a service login of the store broker; pick another")
        if k in seen:
            raise ProvisionError(f"kiosk id {k!r} given twice")
        seen.append(k)
    if not seen:
        raise ProvisionError("give at least one kiosk id")
    return tuple(seen)


def _write(path: Path, data: bytes | str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def provision_broker(
    out: Path,
    store: str,
    kiosks: Sequence[str],
    hosts: Sequence[str],
    templates: Path,
    *,
    homeassistant: bool = False,
) -> Provisioned:
    """Write everything a store broker and its clients need into ``out`` (which must not exist yet)."""
    try:
        check_id(store, "store id")
    except ProtocolError as exc:
        raise ProvisionError(str(exc)) from exc
    kiosk_ids = check_kiosk_ids(kiosks)
    if not hosts:
        raise ProvisionError("give the broker's host name(s) (--host): the kiosks' TLS checks them")
    hostnames = [_check_host(h) for h in hosts]
    conf_t, acl_t = templates / "storelens.conf", templates / "acl"
    for t in (conf_t, acl_t):
        if not t.is_file():
            raise ProvisionError(f"template {t} not found (--templates: the repository's deploy/mosquitto)")
    if out.exists() and any(out.iterdir()):
        raise ProvisionError(f"{out} already exists and is not empty: refusing to overwrite credentials")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    out.chmod(0o700)
    now = dt.datetime.now(dt.UTC)
    ca_key, ca = _ca(store, now)
    srv_key, srv = _server(ca_key, ca, hostnames, now)
    users = [*kiosk_ids, *SERVICE_USERS, *(["homeassistant"] if homeassistant else [])]
    passwords = {u: secrets.token_urlsafe(24) for u in users}
    ca_pem = _pem_cert(ca)
    url = f"mqtts://{hostnames[0]}:{TLS_PORT}"

    _write(out / "ca" / "ca.crt", ca_pem, 0o644)
    _write(out / "ca" / "ca.key", _pem_key(ca_key), 0o600)
    b = out / "broker"
    _write(b / "conf.d" / "storelens.conf", conf_t.read_bytes(), 0o644)
    _write(b / "storelens" / "acl", acl_t.read_text().replace("@STORE@", store), 0o640)
    hashed = "".join(f"{u}:{mosquitto_hash(p)}\n" for u, p in passwords.items())
    _write(b / "storelens" / "passwd", hashed, 0o640)
    _write(b / "storelens" / "tls" / "ca.crt", ca_pem, 0o644)
    _write(b / "storelens" / "tls" / "server.crt", _pem_cert(srv) + ca_pem, 0o644)
    _write(b / "storelens" / "tls" / "server.key", _pem_key(srv_key), 0o640)
    for k in kiosk_ids:
        d = out / "kiosks" / k
        _write(d / "kiosk.env", f"STORELENS_MQTT_PASSWORD={passwords[k]}\n", 0o600)
        _write(d / "ca.pem", ca_pem, 0o644)
        _write(d / "broker.toml", f'[broker]\ntransport = "paho"\nurl = "{url}"\nusername = "{k}"\n'
                                  'ca = "/etc/storelens/tls/ca.pem"\n', 0o644)  # fmt: skip
    c = out / "cloud"
    _write(c / "ca.pem", ca_pem, 0o644)
    _write(c / "cloud.toml", f'[broker]\nurl = "{url}"\nusername = "ops"\nca = "ca.pem"\n', 0o644)
    _write(c / "ops.env", f"STORELENS_MQTT_PASSWORD={passwords['ops']}\n", 0o600)
    _write(c / "feedback.env", f"STORELENS_STORE={store}\nSTORELENS_BROKER={url}\n"
                               f"STORELENS_MQTT_PASSWORD={passwords['collector']}\n", 0o600)  # fmt: skip
    _write(c / "dashboard.env", f"STORELENS_DASHBOARD_PASSWORD={passwords['dashboard']}\n", 0o600)
    if homeassistant:
        _write(c / "homeassistant.env", f"STORELENS_MQTT_PASSWORD={passwords['homeassistant']}\n", 0o600)
    return Provisioned(out, store, kiosk_ids, url, passwords)

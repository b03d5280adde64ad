"""Publishing: upload a snapshot archive to an artifact store, then announce it retained over MQTT.

Stores sit behind one small port (``file://DIR`` and ``s3://bucket/prefix``). Keys are
``<store>/v<version>/snapshot.tar``; publishing the same snapshot again uploads nothing new and announces
the same content (only ``ts`` differs). A version at or below the store's latest with other content is
refused, so versions stay monotonic per store.

S3 announcements carry a presigned HTTPS URL valid for ``PRESIGN_EXPIRY_S``; a kiosk whose announcement
is older than that should fetch the ``s3://`` key (``extra`` in the latest pointer) with its own credentials.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cloud.mqtt import BrokerSettings
from storelens import protocol
from storelens.archive import pack
from storelens.fsutil import atomic_write_bytes, sha256_file
from storelens.snapshot import (
    MANIFEST,
    SIGNATURE,
    SnapshotManifest,
    manifest_sha256,
    read_manifest_unverified,
)

_LOGGER = logging.getLogger(__name__)

PRESIGN_EXPIRY_S = 7 * 24 * 3600  # S3's maximum for SigV4; kiosks fall back to s3:// with own creds
PUBACK_TIMEOUT_S = 10.0  # a broker that has not acked a QoS 1 publish in 10 s is not going to
CONNECT_TIMEOUT_S = 10.0
ARCHIVE = "snapshot.tar"


class PublishError(Exception):
    """Upload or announcement failed, or the version would go backwards."""


class ArtifactStore(Protocol):
    """Where snapshot archives live; keys are '/'-separated relative paths."""

    def head(self, key: str) -> str | None: ...  # sha256 of the stored object, or None
    def put(self, key: str, path: Path, sha256: str) -> None: ...
    def url(self, key: str) -> str: ...
    def read_text(self, key: str) -> str | None: ...
    def write_text(self, key: str, text: str) -> None: ...


class FileStore:
    """A directory tree (local disk, NFS); URLs are file:// URLs."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def head(self, key: str) -> str | None:
        p = self.root / key
        side = p.with_name(p.name + ".sha256")
        if not p.is_file():
            return None
        return side.read_text().strip() if side.is_file() else sha256_file(p)

    def put(self, key: str, path: Path, sha256: str) -> None:
        dest = self.root / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        with open(fd, "wb") as out, open(path, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        Path(tmp).replace(dest)
        atomic_write_bytes(dest.with_name(dest.name + ".sha256"), (sha256 + "\n").encode())

    def url(self, key: str) -> str:
        return (self.root / key).as_uri()

    def read_text(self, key: str) -> str | None:
        p = self.root / key
        return p.read_text(encoding="utf-8") if p.is_file() else None

    def write_text(self, key: str, text: str) -> None:
        atomic_write_bytes(self.root / key, text.encode())


class S3Store:
    """An S3 bucket/prefix via boto3 (``endpoint_url`` for MinIO, moto, or a VPC endpoint)."""

    def __init__(
        self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, client: Any = None
    ) -> None:
        import boto3

        self.bucket, self.prefix = bucket, prefix.strip("/")
        from botocore.config import Config

        # SigV4: its presigned URLs carry X-Amz-Expires (max 7 days); SigV2 is deprecated by AWS.
        self._s3 = client or boto3.client(
            "s3", endpoint_url=endpoint_url, config=Config(signature_version="s3v4")
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def head(self, key: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            obj = self._s3.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise PublishError(f"S3 head {self._key(key)} failed: {exc}") from exc
        return str(obj.get("Metadata", {}).get("sha256", "")) or None

    def put(self, key: str, path: Path, sha256: str) -> None:
        self._s3.upload_file(
            str(path), self.bucket, self._key(key), ExtraArgs={"Metadata": {"sha256": sha256}}
        )

    def url(self, key: str) -> str:
        return str(
            self._s3.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": self._key(key)},
                ExpiresIn=PRESIGN_EXPIRY_S,
            )
        )

    def read_text(self, key: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            return str(self._s3.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read().decode())
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise PublishError(f"S3 read {self._key(key)} failed: {exc}") from exc

    def write_text(self, key: str, text: str) -> None:
        self._s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=text.encode())


def open_store(url: str, *, s3_endpoint: str | None = None, s3_client: Any = None) -> ArtifactStore:
    """``file:///dir``, a plain path, or ``s3://bucket/prefix``."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise PublishError(f"no bucket in {url!r}")
        return S3Store(parts.netloc, parts.path, endpoint_url=s3_endpoint, client=s3_client)
    if parts.scheme in ("", "file"):
        return FileStore(Path(parts.path if parts.scheme else url))
    raise PublishError(f"unsupported store URL scheme {parts.scheme!r} (file:// or s3://)")


@dataclass(frozen=True, slots=True)
class Published:
    announcement: protocol.SnapshotAnnouncement
    key: str
    uploaded: bool  # False when the same archive was already there


def _archive_of(snapshot: Path, workdir: Path) -> tuple[Path, SnapshotManifest, str]:
    """(archive path, manifest, manifest sha256) for a snapshot directory or an existing archive."""
    from storelens.archive import unpack
    from storelens.swap import recover_for_reading

    recover_for_reading(snapshot)  # a build a crash interrupted: finish or undo it first
    if not snapshot.exists():
        raise PublishError(f"snapshot {snapshot} does not exist")
    if snapshot.is_dir():
        missing = [n for n in (MANIFEST, SIGNATURE) if not (snapshot / n).is_file()]
        if missing:  # kiosks refuse it anyway: say so before anything is uploaded or announced
            raise PublishError(f"{snapshot} is not a signed snapshot (no {' or '.join(missing)}); "
                               "`catalog build` signs what it builds with --key")  # fmt: skip
        archive = workdir / ARCHIVE
        pack(snapshot, archive)
        return archive, read_manifest_unverified(snapshot), manifest_sha256(snapshot)
    tmp = workdir / "unpacked"
    unpack(snapshot, tmp, max_total_bytes=snapshot.stat().st_size)
    return snapshot, read_manifest_unverified(tmp), manifest_sha256(tmp)


def publish_snapshot(
    snapshot: Path,
    to: str,
    broker: str | BrokerSettings | None,
    *,
    s3_endpoint: str | None = None,
    s3_client: Any = None,
    timeout_s: float = PUBACK_TIMEOUT_S,
) -> Published:
    """Upload ``snapshot`` (dir or archive) to ``to`` and announce it retained on the store's topic."""
    store = open_store(to, s3_endpoint=s3_endpoint, s3_client=s3_client)
    with tempfile.TemporaryDirectory(prefix="storelens-publish-") as work:
        archive, m, msha = _archive_of(Path(snapshot), Path(work))
        sha, size = sha256_file(archive), archive.stat().st_size
        key = f"{m.store}/v{m.version}/{ARCHIVE}"
        latest_key = f"{m.store}/latest.json"
        latest = json.loads(store.read_text(latest_key) or "null")
        if (
            isinstance(latest, dict)
            and int(latest.get("version", 0)) >= m.version
            and not (latest.get("version") == m.version and latest.get("manifest_sha256") == msha)
        ):
            raise PublishError(f"version {m.version} <= published v{latest.get('version')} of {m.store}")
        existing = store.head(key)
        if existing is not None and existing != sha:
            raise PublishError(f"{key} already holds another archive (same version, other content)")
        if existing is None:
            store.put(key, archive, sha)
        url, url_until = _reuse_url(latest, msha)
        if url is None:
            url, url_until = store.url(key), time.time() + PRESIGN_EXPIRY_S
        entry = {"version": m.version, "manifest_sha256": msha, "sha256": sha, "size": size,
                 "key": key, "kind": m.kind, "base_version": m.base_version, "url": url,
                 "url_until": url_until}  # fmt: skip
        # The newest full snapshot rides along with every delta: a kiosk without the delta's base
        # installs it instead of staying behind (device/sync).
        full = entry if m.kind == "full" else _newest_full(latest, store)
        raw_model = m.extra.get("model")
        model: dict[str, Any] = raw_model if isinstance(raw_model, dict) else {}
        ann = protocol.SnapshotAnnouncement(
            store=m.store,
            version=m.version,
            kind=m.kind,
            base_version=m.base_version,
            model_id=m.model_id,
            manifest_sha256=msha,
            size=size,
            sha256=sha,
            url=url,
            full=None if m.kind == "full" or full is None else protocol.FullSnapshotRef.model_validate(full),
            model_name=str(model["name"])[:128] if model.get("name") else None,
            model_version=str(model["version"])[:64] if model.get("version") else None,
        )
        store.write_text(latest_key, json.dumps({**entry, "full": full}, sort_keys=True) + "\n")
    if broker:
        announce(broker, ann, timeout_s=timeout_s)
    _LOGGER.info(
        "published %s v%d (%d bytes, %s)",
        m.store,
        m.version,
        size,
        "uploaded" if existing is None else "already there",
    )
    return Published(ann, key, existing is None)


def _newest_full(latest: Any, store: ArtifactStore) -> dict[str, Any] | None:
    """latest.json's record of the newest full snapshot, with a URL that is still good for a while."""
    if not isinstance(latest, dict):
        return None
    full = latest if latest.get("kind") == "full" else latest.get("full")  # older files: latest was full
    if not isinstance(full, dict) or not full.get("key"):
        return None
    full = {k: full[k] for k in ("version", "manifest_sha256", "sha256", "size", "key", "url", "url_until")
            if k in full}  # fmt: skip
    url, until = _reuse_url(full, str(full.get("manifest_sha256")))
    if url is None:
        url, until = store.url(str(full["key"])), time.time() + PRESIGN_EXPIRY_S
    return {**full, "url": url, "url_until": until}


def _reuse_url(latest: Any, msha: str) -> tuple[str | None, float]:
    """The URL announced last time for this same snapshot, while it has over half its validity left."""
    if not isinstance(latest, dict) or latest.get("manifest_sha256") != msha or not latest.get("url"):
        return None, 0.0
    until = float(latest.get("url_until", 0))
    if until - time.time() < PRESIGN_EXPIRY_S / 2:
        return None, 0.0
    return str(latest["url"]), until


def announce(
    broker: str | BrokerSettings, ann: protocol.SnapshotAnnouncement, *, timeout_s: float = PUBACK_TIMEOUT_S
) -> None:
    """Publish the announcement retained, QoS 1, and wait for the broker's PUBACK (or IoT Core's 200)."""
    from cloud.iot_data import IotDataError, IotPublisher
    from cloud.mqtt import BrokerError, CloudClient, check

    topic = protocol.snapshot_topic(ann.store)
    try:
        settings = broker if isinstance(broker, BrokerSettings) else BrokerSettings(broker)
        check(settings)
        if settings.is_iot:
            IotPublisher.from_url(settings.url).publish(topic, ann.to_bytes(), retain=True)
            return
        client = CloudClient(settings, client_id=f"storelens-publish-{ann.store}-{ann.version}")
        client.client.on_socket_open = _nodelay
        client.connect(CONNECT_TIMEOUT_S)
        try:
            client.publish(topic, ann.to_bytes(), qos=1, retain=True, timeout_s=timeout_s)
        finally:
            client.close()
    except (BrokerError, IotDataError) as exc:
        raise PublishError(f"announcement not published: {exc}") from exc


def _nodelay(client: Any, userdata: Any, sock: Any) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket (a unix or TLS-wrapped one): nothing to tune
        pass

"""MQTT topics and payloads: the one definition the kiosk, the cloud and the dashboard share.

Topic tree (AWS topic-design conventions: dt/ telemetry, cmd/ commands, bc/ broadcasts):

    dt/storelens/{store}/{kiosk}/status         retained, also the last will (state "offline")
    dt/storelens/{store}/{kiosk}/health         retained, every health interval
    dt/storelens/{store}/{kiosk}/events/match   QoS 1, one per held item
    dt/storelens/{store}/{kiosk}/events/alert   QoS 1, camera lost, snapshot refused, outbox dropping...
    dt/storelens/{store}/{kiosk}/events/feedback QoS 1, a customer's answer + crop (storelens.feedback)
    dt/storelens/{store}/{kiosk}/update         retained, progress of a model/snapshot update
    bc/storelens/{store}/snapshot               retained, the store's current snapshot announcement
    cmd/storelens/{store}/{kiosk}/desired       retained, the release this kiosk should run (fleet)
    homeassistant/device/{kiosk}/config         retained, Home Assistant device discovery

Payloads are UTF-8 JSON objects with a common envelope (``v``, ``type``, ``ts``, ``kiosk``, ``store``);
consumers ignore unknown fields and reject messages whose known fields are wrong.
"""

from __future__ import annotations

import json
import re
import uuid
from enum import StrEnum
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from storelens.snapshot import utc_now_iso

SCHEMA_VERSION = 1
KNOWN_SCHEMA_VERSIONS = frozenset({1})  # a payload naming another ``v`` is refused (unsupported_schema)
APP = "storelens"
MAX_PAYLOAD_BYTES = 128 * 1024  # AWS IoT Core's limit; larger inbound payloads are refused unparsed
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SHA256 = r"^[0-9a-f]{64}$"
MAX_VERSION = 2**53  # versions and sequences stay exact in every JSON reader (and in the signed manifest)


class ProtocolError(ValueError):
    """A topic or payload that does not follow this protocol; ``reason`` names the kind of problem
    (``malformed``, ``too_large``, ``unsupported_schema``)."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


def check_id(value: str, what: str) -> str:
    """Store and kiosk ids appear in topics: letters, digits, '-' and '_' only (no wildcards, no '/')."""
    if not _ID.match(value):
        raise ProtocolError(f"{what} {value!r} must be 1-64 of [A-Za-z0-9_-]")
    return value


class Topics:
    """Topic names for one kiosk of one store."""

    def __init__(self, store: str, kiosk: str) -> None:
        self.store = check_id(store, "store id")
        self.kiosk = check_id(kiosk, "kiosk id")
        base = f"dt/{APP}/{store}/{kiosk}"
        self.status = f"{base}/status"
        self.health = f"{base}/health"
        self.match = f"{base}/events/match"
        self.alert = f"{base}/events/alert"
        self.feedback = f"{base}/events/feedback"  # storelens.feedback: the customer's answers
        self.update = f"{base}/update"
        self.desired = f"cmd/{APP}/{store}/{kiosk}/desired"
        self.snapshot = snapshot_topic(store)
        self.ha_discovery = f"homeassistant/device/{kiosk}/config"


def snapshot_topic(store: str) -> str:
    """The retained announcement topic of a store's snapshots (kiosks subscribe to it exactly)."""
    return f"bc/{APP}/{check_id(store, 'store id')}/snapshot"


def store_telemetry_filter(store: str) -> str:
    """Subscription filter for everything the kiosks of one store publish (dashboard, fleet)."""
    return f"dt/{APP}/{check_id(store, 'store id')}/#"


HA_STATUS_TOPIC = "homeassistant/status"


def parse_kiosk_topic(topic: str) -> tuple[str, str, str]:
    """Split ``dt/storelens/{store}/{kiosk}/{rest}`` into (store, kiosk, rest)."""
    parts = topic.split("/", 4)
    if len(parts) != 5 or parts[0] != "dt" or parts[1] != APP:
        raise ProtocolError(f"not a kiosk telemetry topic: {topic!r}")
    return parts[2], parts[3], parts[4]


# ---- payloads ----


class KioskState(StrEnum):
    STARTING = "starting"
    ONLINE = "online"
    DEGRADED = "degraded"
    UPDATING = "updating"
    OFFLINE = "offline"


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    TYPE: ClassVar[str] = ""
    v: int = SCHEMA_VERSION
    type: str = ""
    ts: str = Field(default_factory=utc_now_iso)
    kiosk: str
    store: str

    def model_post_init(self, __context: Any) -> None:
        if self.type != self.TYPE:
            object.__setattr__(self, "type", self.TYPE)

    def to_bytes(self) -> bytes:
        """Compact UTF-8 JSON, serialised by pydantic-core in one pass (0.05 ms for a 5-hit MatchEvent on a
        cold kiosk thread, against 0.14 for ``json.dumps(model_dump())``: it runs on the frame path)."""
        return self.model_dump_json().encode()


class Status(_Message):
    """Retained availability; the last will is the same message with state offline, reason 'lwt'."""

    TYPE: ClassVar[str] = "status"
    state: KioskState
    reason: str | None = None
    app: str = ""
    model: str | None = None
    snapshot: int | None = None
    since: str | None = None
    camera: str | None = None


class Health(_Message):
    """Flat numbers so Grafana and Home Assistant need no transforms."""

    TYPE: ClassVar[str] = "health"
    uptime_s: float
    camera: str
    frames_in: int
    frames_processed: int
    frames_dropped: int
    fps: float
    latency_ms: dict[str, dict[str, float]] = Field(default_factory=dict)  # stage -> {p50, p99}
    model: str | None = None
    snapshot: int | None = None
    outbox_depth: int = 0
    outbox_dropped: int = 0  # events dropped for good: outbox full by rows or age, or memory cap passed
    outbox_memory: int = 0  # events waiting in memory because the outbox cannot be written (disk full)
    interval_s: float = 30.0


class MatchItem(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    rank: int
    sku: str
    title: str = ""
    price: str | None = None
    location: str | None = None
    score: float
    thumbnail: str | None = None  # snapshot-relative path, resolved by the screen/dashboard


class MatchEvent(_Message):
    """One per held item. No frames, no embeddings: only what the catalog already knows."""

    TYPE: ClassVar[str] = "match"
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    seq: int = 0
    boot_id: str = ""
    matched: bool
    results: list[MatchItem]
    threshold: float
    frames: int  # steady frames aggregated into this answer
    model: str
    snapshot: int
    latency_ms: dict[str, float] = Field(default_factory=dict)


class Alert(_Message):
    TYPE: ClassVar[str] = "alert"
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    kind: Literal[
        "camera_lost", "camera_back", "snapshot_refused", "snapshot_applied", "outbox_dropping",
        "outbox_full", "update_failed", "rolled_back", "catalog_stale",
    ]
    detail: str = ""


UpdateStep = Literal[
    "idle", "download", "verify", "compile", "selftest", "switch", "probation", "done", "rolled_back",
    "failed",
]


class UpdateProgress(_Message):
    """Retained progress of a model+snapshot update on one kiosk (fleet and dashboard read it)."""

    TYPE: ClassVar[str] = "update"
    release: str
    step: UpdateStep
    ok: bool = True
    detail: str = ""
    model: str | None = None
    snapshot: int | None = None


class FullSnapshotRef(BaseModel):
    """Where the store's newest *full* snapshot is: what a kiosk installs when it lacks a delta's base."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)
    version: int = Field(ge=1, le=MAX_VERSION)
    manifest_sha256: str = Field(pattern=_SHA256)
    size: int = Field(ge=0, le=1 << 40)
    sha256: str = Field(pattern=_SHA256)  # of the archive
    url: str = Field(min_length=1, max_length=4096)


class SnapshotAnnouncement(BaseModel):
    """Retained on ``bc/storelens/{store}/snapshot``: where to fetch the newest snapshot.

    A delta names its ``base_version`` (the signed manifest names the exact base); ``full``, optional,
    points a kiosk that does not hold that base at the newest full snapshot instead. Strict types: the
    kiosk checks every field against the signed manifest (``device/sync/service.py``), so "2" or 2.0 for
    a version is refused rather than coerced.
    """

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)
    TYPE: ClassVar[str] = "snapshot"
    v: int = SCHEMA_VERSION
    type: Literal["snapshot"] = "snapshot"
    ts: str = Field(default_factory=utc_now_iso, max_length=64)
    store: str = Field(pattern=_ID.pattern)
    version: int = Field(ge=1, le=MAX_VERSION)
    kind: Literal["full", "delta"] = "full"
    base_version: int | None = Field(default=None, ge=1, le=MAX_VERSION)
    model_id: str = Field(min_length=1, max_length=128)
    manifest_sha256: str = Field(pattern=_SHA256)
    size: int = Field(ge=0, le=1 << 40)
    sha256: str = Field(pattern=_SHA256)  # of the archive
    url: str = Field(min_length=1, max_length=4096)
    full: FullSnapshotRef | None = None  # deltas only; absent from older publishers' announcements
    # The bundle's name and version (export time) for people (the dashboard); optional, shown only.
    model_name: str | None = Field(default=None, max_length=128)
    model_version: str | None = Field(default=None, max_length=64)

    def to_bytes(self) -> bytes:
        # Unset optional fields are left out: unchanged bytes for what publishers sent before.
        omit = {k for k in ("full", "model_name", "model_version") if getattr(self, k) is None}
        return json.dumps(self.model_dump(mode="json", exclude=omit), separators=(",", ":")).encode()

    def of_full(self) -> SnapshotAnnouncement:
        """The announcement of ``full`` (same store and model); ValueError when there is none."""
        if self.full is None:
            raise ValueError("the announcement names no full snapshot")
        ref = self.full
        return self.model_copy(
            update={"version": ref.version, "kind": "full", "base_version": None,
                    "manifest_sha256": ref.manifest_sha256, "size": ref.size, "sha256": ref.sha256,
                    "url": ref.url, "full": None}
        )


M = TypeVar("M", bound=BaseModel)


def decode(payload: bytes, cls: type[M]) -> M:
    """Parse a payload into ``cls``; any problem (size, UTF-8, JSON, schema version, fields) raises
    ProtocolError."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}", "too_large")
    try:
        raw = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(f"payload is not UTF-8 JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ProtocolError("payload is not a JSON object")
    v = raw.get("v", SCHEMA_VERSION)
    if type(v) is not int or v not in KNOWN_SCHEMA_VERSIONS:
        shown = v if type(v) is int and abs(v) < 10**6 else type(v).__name__
        raise ProtocolError(f"schema version v={shown!s} is not one this kiosk knows", "unsupported_schema")
    want = getattr(cls, "TYPE", "")
    if want and raw.get("type") != want:
        raise ProtocolError(f"payload type {raw.get('type')!r}, expected {want!r}")
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ProtocolError(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from exc


class DesiredRelease(_Message):
    """Retained on ``cmd/storelens/{store}/{kiosk}/desired`` (and the IoT Job document): run this release.

    A newer message replaces the old one; the kiosk abandons an update still running for the old one, and
    gives up on any update by ``deadline_s`` after it started, so one hung update never blocks the next.
    The kiosk refuses one naming another store or kiosk (``Updater.check_desired``).
    """

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)
    TYPE: ClassVar[str] = "desired"
    release: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    sequence: int = Field(ge=1, le=MAX_VERSION)
    url: str = Field(min_length=1, max_length=4096)  # release.json
    sig_url: str = Field(min_length=1, max_length=4096)  # release.sig
    deadline_s: float = Field(default=1800.0, gt=0, le=7 * 24 * 3600)
    probation_s: float | None = Field(default=None, ge=0, le=24 * 3600)  # None: the kiosk's own setting

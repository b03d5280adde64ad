"""The feedback store: accepted kiosk feedback, content-addressed and de-duplicated, plus staff decisions.

Layout under one root folder (one store's or many stores' feedback):

    records/{record_id}.json   the message minus its crop (vector kept), plus ``crop_sha256``, ``received``
    crops/{sha256}.jpg         the held item's crop, content-addressed (identical crops stored once)
    decisions.jsonl            append-only: one staff (or auto-rule) decision per line; the last line
                               for a record wins, so every decision is reversible and keeps who/when

``record_id`` is derived from (store, kiosk, message id): a replayed message is the same record. Every
write is atomic and fsynced before ``put`` returns, so a collector may acknowledge the message after it.

The same layout lives under an S3 prefix (``s3://bucket/prefix``, ``open_feedback_store``), except that
S3 cannot append: each decision is its own object, ``decisions/{time_ns}-{random}.json``, read in key
order (so the writers' clocks order decisions made on different machines). S3 acknowledges a PUT once the
object is stored, which is the durability the collector waits for. Records, decisions and crops never
change once written, so reads are cached: records and decisions in memory, crops as files in a local
cache folder (checked against the sha256 in their name) that the dashboard and the catalog build read.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import numpy as np

from storelens.feedback import FeedbackEvent, decode_vector
from storelens.fsutil import atomic_write_bytes, fsync_dir
from storelens.snapshot import utc_now_iso

Decision = Literal["approved", "rejected", "reassigned", "not_carried", "pending"]
Status = Literal["pending", "approved", "rejected", "not_carried", "unlabelled"]


class FeedbackStoreError(Exception):
    """A record or decision that cannot be read or written (names the record and the problem)."""


class CorruptCrop(FeedbackStoreError):
    """A stored crop whose bytes do not match the sha256 it is stored under."""


@dataclass(frozen=True, slots=True)
class DecisionEntry:
    record_id: str
    decision: Decision
    sku: str | None  # the product the photo shows after this decision (approved / reassigned)
    who: str  # a staff login, or "auto:<rule>"
    ts: str
    note: str = ""


@dataclass(frozen=True, slots=True)
class FeedbackRecord:
    """One accepted message and where review left it."""

    record_id: str
    store: str
    kiosk: str
    ts: str
    received: str
    answer: str
    chosen_sku: str | None
    shown: tuple[str, ...]
    top_score: float | None
    model: str
    snapshot: int
    crop_sha256: str
    status: Status
    label_sku: str | None  # the product this photo is a store photo of, once approved/reassigned
    decided_by: str | None
    decided_ts: str | None


def record_id_of(store: str, kiosk: str, message_id: str) -> str:
    """The de-duplication key of a message: its ids, not its bytes (a replay is the same record)."""
    return hashlib.sha256(f"{store}\0{kiosk}\0{message_id}".encode()).hexdigest()[:32]


DECISIONS_LOG = "decisions.jsonl"
_T = TypeVar("_T")


class _Backend(Protocol):
    """Where the layout lives: a local folder or an S3 prefix (keys are ``records/...``, ``crops/...``)."""

    where: str

    def exists(self, key: str) -> bool: ...
    def read(self, key: str) -> bytes | None: ...  # None when there is no such object
    def write(self, key: str, data: bytes) -> None: ...  # durable when it returns
    def names(self, folder: str) -> list[str]: ...  # object names directly under folder/, sorted
    def append_decision(self, line: bytes) -> None: ...
    def decision_lines(self) -> list[str]: ...
    def local_file(self, key: str) -> Path: ...  # a local file with the object (absent if it is absent)


class _Folder:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.where = str(root)
        for d in ("records", "crops"):
            (root / d).mkdir(parents=True, exist_ok=True)

    def exists(self, key: str) -> bool:
        return (self.root / key).exists()

    def read(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, key: str, data: bytes) -> None:
        atomic_write_bytes(self.root / key, data)

    def names(self, folder: str) -> list[str]:
        return sorted(p.name for p in (self.root / folder).iterdir() if p.is_file())

    def append_decision(self, line: bytes) -> None:
        fd = os.open(self.root / DECISIONS_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.root)

    def decision_lines(self) -> list[str]:
        log = self.root / DECISIONS_LOG
        return log.read_text(encoding="utf-8").splitlines() if log.exists() else []

    def local_file(self, key: str) -> Path:
        return self.root / key


_MISSING = ("404", "NoSuchKey", "NotFound")


class _S3Prefix:
    """The layout under ``s3://bucket/prefix`` via boto3 (endpoint from boto3's own settings, e.g.
    ``AWS_ENDPOINT_URL_S3``); every S3 failure becomes a FeedbackStoreError naming the key."""

    def __init__(self, bucket: str, prefix: str, cache_dir: Path, client: Any = None) -> None:
        import boto3

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.where = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._s3 = client or boto3.client("s3")
        self._cache_dir = cache_dir
        self._cached: dict[str, bytes] = {}  # immutable objects already read (records, decisions)
        self._call("reach the bucket", lambda: self._s3.head_bucket(Bucket=bucket))

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn: Callable[[], _T]) -> _T:
        """``fn()``, any S3 failure a FeedbackStoreError naming ``what``."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "?")
            raise FeedbackStoreError(f"{self.where}: cannot {what} (S3 {code}: {exc})") from exc
        except BotoCoreError as exc:
            raise FeedbackStoreError(f"{self.where}: cannot {what} ({exc})") from exc

    def _absent_is_none(self, fn: Callable[[], _T]) -> Callable[[], _T | None]:
        """``fn`` returning None where S3 says there is no such object."""
        from botocore.exceptions import ClientError

        def call() -> _T | None:
            try:
                return fn()
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in _MISSING:
                    return None
                raise

        return call

    def exists(self, key: str) -> bool:
        head = self._absent_is_none(lambda: self._s3.head_object(Bucket=self.bucket, Key=self._key(key)))
        return self._call(f"check {key}", head) is not None

    def read(self, key: str) -> bytes | None:
        if key in self._cached:
            return self._cached[key]
        get = self._absent_is_none(
            lambda: bytes(self._s3.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read())
        )
        data = self._call(f"read {key}", get)
        if data is not None and not key.startswith("crops/"):  # crops go to the file cache instead
            self._cached[key] = data
        return data

    def write(self, key: str, data: bytes) -> None:
        # Not cached: the collector writes for months and never reads back.
        self._call(
            f"write {key}", lambda: self._s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        )

    def names(self, folder: str) -> list[str]:
        base = self._key(folder) + "/"
        out: list[str] = []

        def walk() -> None:
            for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                out.extend(o["Key"][len(base):] for o in page.get("Contents", []))

        self._call(f"list {folder}/", walk)
        return sorted(n for n in out if n and "/" not in n)

    def append_decision(self, line: bytes) -> None:
        self.write(f"decisions/{time.time_ns():020d}-{secrets.token_hex(4)}.json", line)

    def decision_lines(self) -> list[str]:
        lines = []
        for name in self.names("decisions"):
            data = self.read(f"decisions/{name}")
            if data is not None:
                lines.append(data.decode("utf-8", "replace").strip())
        return lines

    def local_file(self, key: str) -> Path:
        path = self._cache_dir / key
        if path.is_file():
            return path
        data = self.read(key)
        if data is None:
            return path  # absent: callers check is_file()
        want = Path(key).stem
        if key.startswith("crops/") and hashlib.sha256(data).hexdigest() != want:
            raise CorruptCrop(f"{self.where}: {key} does not match its sha256 (corrupt object)")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
        return path


def default_cache_dir(location: str) -> Path:
    """Where crops of an S3 feedback store are cached locally: per bucket and prefix, under the user's
    cache folder (``XDG_CACHE_HOME``, else ``~/.cache``)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    tag = hashlib.sha256(location.encode()).hexdigest()[:16]
    return base / "storelens" / "feedback" / tag


def open_feedback_store(
    location: FeedbackSource, *, create: bool = False, cache_dir: Path | None = None, s3_client: Any = None
) -> FeedbackStore:
    """A feedback store at a folder or ``s3://bucket/prefix`` (one already open is returned as it is: a
    caller that reads it several times passes it on). A missing folder is created only with ``create``
    (the collector), else FeedbackStoreError, as is an S3 bucket that cannot be reached."""
    if isinstance(location, FeedbackStore):
        return location
    text = str(location)
    if text.startswith("s3://"):
        parts = urllib.parse.urlsplit(text)
        if not parts.netloc:
            raise FeedbackStoreError(f"no bucket in {text!r}")
        loc = text.rstrip("/")
        return FeedbackStore(
            backend=_S3Prefix(parts.netloc, parts.path, cache_dir or default_cache_dir(loc), s3_client)
        )
    if "://" in text:
        raise FeedbackStoreError(f"{text!r}: a feedback store is a folder or s3://bucket/prefix")
    root = Path(text)
    if not create and not root.is_dir():
        raise FeedbackStoreError(f"feedback folder {root} does not exist")
    return FeedbackStore(root)


class FeedbackStore:
    """Feedback records and decisions in a local folder (created if missing) or, through
    ``open_feedback_store``, under an S3 prefix (see the module doc for the layout)."""

    def __init__(self, root: Path | None = None, *, backend: _Backend | None = None) -> None:
        if backend is None:
            if root is None:
                raise ValueError("FeedbackStore needs a folder or a backend")
            backend = _Folder(Path(root))
        self._b = backend
        self._lock = threading.Lock()

    @property
    def where(self) -> str:
        """The folder or ``s3://`` location (for messages)."""
        return self._b.where

    @property
    def root(self) -> Path:
        """The local folder of a folder store (TypeError for an S3 one)."""
        if not isinstance(self._b, _Folder):
            raise TypeError(f"{self._b.where} is not a local folder")
        return self._b.root

    # ---- writing ----

    def put(self, msg: FeedbackEvent) -> tuple[str, bool]:
        """Store one verified message durably; returns (record_id, False when it was already stored)."""
        rid = record_id_of(msg.store, msg.kiosk, msg.id)
        key = f"records/{rid}.json"
        with self._lock:
            if self._b.exists(key):
                return rid, False
            crop = msg.crop_bytes()
            crop_sha = hashlib.sha256(crop).hexdigest()
            crop_key = f"crops/{crop_sha}.jpg"
            if not self._b.exists(crop_key):  # the crop first: a record never names a missing crop
                self._b.write(crop_key, crop)
            body = msg.model_dump(mode="json", exclude={"crop_jpeg"})
            body.update(record_id=rid, crop_sha256=crop_sha, received=utc_now_iso())
            self._b.write(key, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())
        return rid, True

    def decide(
        self, record_id: str, decision: Decision, *, who: str, sku: str | None = None, note: str = ""
    ) -> DecisionEntry:
        """Append a decision (approved/reassigned need the product's sku, taken from the record for
        approved when not given); ``pending`` undoes the earlier ones."""
        rec = self._read(record_id)
        if decision == "approved" and sku is None:
            chosen = rec.get("chosen_sku")
            sku = chosen if isinstance(chosen, str) else None
        if decision in ("approved", "reassigned") and not sku:
            raise FeedbackStoreError(f"{record_id}: {decision} needs a product sku")
        if decision in ("rejected", "not_carried", "pending"):
            sku = None
        entry = DecisionEntry(record_id, decision, sku, who, utc_now_iso(), note)
        line = json.dumps(_entry_dict(entry), separators=(",", ":")) + "\n"
        with self._lock:
            self._b.append_decision(line.encode())
        return entry

    # ---- reading ----

    def history(self, record_id: str | None = None) -> list[DecisionEntry]:
        """Every decision in order (of one record, when given); a torn last line is skipped."""
        out: list[DecisionEntry] = []
        for line in self._b.decision_lines():
            try:
                d = json.loads(line)
                entry = DecisionEntry(d["record_id"], d["decision"], d.get("sku"), d["who"], d["ts"],
                                      d.get("note", ""))
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a power cut mid-append
            if record_id is None or entry.record_id == record_id:
                out.append(entry)
        return out

    def records(self, store: str | None = None) -> list[FeedbackRecord]:
        """Every record (of one store), oldest first, with its review status applied."""
        last = {e.record_id: e for e in self.history()}
        out = []
        for rid in self._record_ids():
            raw = self._read(rid)
            if store is not None and raw["store"] != store:
                continue
            out.append(_record(raw, last.get(rid)))
        out.sort(key=lambda r: (r.ts, r.record_id))
        return out

    def get(self, record_id: str) -> FeedbackRecord:
        last = self.history(record_id)
        return _record(self._read(record_id), last[-1] if last else None)

    def crop_path(self, record_id: str) -> Path:
        """A local file with the record's crop (an S3 store's cached copy); absent if the crop is."""
        return self._b.local_file(f"crops/{self._read(record_id)['crop_sha256']}.jpg")

    def vector(self, record_id: str) -> np.ndarray:
        raw = self._read(record_id)
        return decode_vector(str(raw["vector"]), int(str(raw["dim"])))

    def approved(self, store: str | None = None) -> list[FeedbackRecord]:
        """Records that are store photos of a product (approved or reassigned)."""
        return [r for r in self.records(store) if r.status == "approved" and r.label_sku]

    def _record_ids(self) -> Iterator[str]:
        for name in self._b.names("records"):
            if name.endswith(".json") and not name.startswith("."):
                yield name[: -len(".json")]

    def _read(self, record_id: str) -> dict[str, object]:
        if not record_id.isalnum():
            raise FeedbackStoreError(f"{record_id!r} is not a record id")
        raw = self._b.read(f"records/{record_id}.json")
        if raw is None:
            raise FeedbackStoreError(f"no feedback record {record_id}")
        try:
            data: dict[str, object] = json.loads(raw.decode("utf-8"))
        except ValueError as exc:
            raise FeedbackStoreError(f"feedback record {record_id} is not JSON: {exc}") from exc
        return data


def _entry_dict(e: DecisionEntry) -> dict[str, object]:
    return {"record_id": e.record_id, "decision": e.decision, "sku": e.sku, "who": e.who, "ts": e.ts,
            "note": e.note}


def _record(raw: dict[str, object], last: DecisionEntry | None) -> FeedbackRecord:
    answer = str(raw["answer"])
    status: Status
    label: str | None = None
    if last is None or last.decision == "pending":
        status = "unlabelled" if answer == "no_answer" else "pending"
    elif last.decision in ("approved", "reassigned"):
        status, label = "approved", last.sku
    elif last.decision == "not_carried":
        status = "not_carried"
    else:
        status = "rejected"
    shown = raw.get("shown") or []
    top = raw.get("top_score")
    return FeedbackRecord(
        record_id=str(raw["record_id"]), store=str(raw["store"]), kiosk=str(raw["kiosk"]),
        ts=str(raw["ts"]), received=str(raw["received"]), answer=answer,
        chosen_sku=None if raw.get("chosen_sku") is None else str(raw["chosen_sku"]),
        shown=tuple(str(s) for s in shown) if isinstance(shown, list) else (),
        top_score=float(top) if isinstance(top, (int, float)) else None,
        model=str(raw["model"]), snapshot=int(str(raw["snapshot"])), crop_sha256=str(raw["crop_sha256"]),
        status=status, label_sku=label, decided_by=None if last is None else last.who,
        decided_ts=None if last is None else last.ts,
    )


FeedbackSource = str | Path | FeedbackStore  # where a feedback store is, or the store itself
